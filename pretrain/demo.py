"""``make demo``: the end-to-end job on a CPU, as far as this build goes.

Today: resolve the demo run config, build the tiny GatedDeltaProduct model and run one
packed batch forward and backward. Data, training with resume and evals join as they land.
"""
from __future__ import annotations

import sys

from .config_loader import CONFIGS_DIR, dump_config, load_config
from .dry_run import dry_run

DEMO_CONFIG = CONFIGS_DIR / "runs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(DEMO_CONFIG, list(argv if argv is not None else sys.argv[1:]))
    print(f"[demo] config {DEMO_CONFIG}:\n{dump_config(cfg)}", flush=True)
    r = dry_run(cfg)
    print(f"[demo] model: {r.parameters / 1e6:.2f}M parameters, layers {cfg.model.layer_types()}")
    print(f"[demo] forward+backward on {r.tokens} packed tokens: loss {r.loss:.4f} "
          f"(ln V = {__import__('math').log(cfg.model.vocab_size):.4f}), grad norm {r.grad_norm:.3f}, "
          f"{r.seconds:.2f}s")
    print("[demo] done. This build stops here: data preparation, DeepSpeed training with "
          "resume, export and evals are added by their own issues.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

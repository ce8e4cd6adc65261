"""``linrnn-train`` (also ``python -m pretrain``): the training entry point."""
from __future__ import annotations

import argparse
import sys

from .config_loader import ConfigError, dump_config, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linrnn-train",
        description="Pretrain a linear-RNN language model from a run config.",
        epilog="Example: linrnn-train configs/runs/demo.yaml optim.lr=1e-3 parallel.zero_stage=2",
    )
    parser.add_argument("config", help="run config YAML (see configs/runs/)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied in order")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model, run one synthetic packed batch forward and backward, and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("resolved config:\n" + dump_config(cfg), flush=True)
    if args.dry_run:
        from .dry_run import dry_run

        r = dry_run(cfg)
        print(f"dry run ok: {r.parameters / 1e6:.2f}M parameters, {r.tokens} tokens, "
              f"loss {r.loss:.4f}, grad norm {r.grad_norm:.3f}, {r.seconds:.2f}s forward+backward")
        return 0
    print("error: the DeepSpeed training engine is not in this build yet; "
          "use --dry-run to check a config and model", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: the whole job on a CPU in a few minutes, end to end.

1. data: fetch the Shakespeare demo corpus, train a sentencepiece tokenizer, write MDS
   shards (``data.demo.build_demo_data``; cached, so reruns skip it);
2. train the tiny GatedDeltaProduct with ``linrnn-train`` in a subprocess, and interrupt
   it with SIGTERM midway: it saves and exits with the requeue code 75, as on SLURM;
3. rerun the same command: it resumes from the newest complete checkpoint and finishes;
4. prove the resume is exact: replay the steps between the last periodic checkpoint and
   the interruption from that checkpoint and compare the losses bit for bit;
5. export (safetensors + config + tokenizer), load it without DeepSpeed, sample text;
6. evaluate the export on the held-out shards (`linrnn-eval --suite lm`);
7. print where everything is.

Everything is written under ``runs/demo/`` of the repository; checkpoints and exports
are recreated on every run, the data only when its settings change.
"""
from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config_loader import CONFIGS_DIR, load_config, save_config
from .preemption import REQUEUE_EXIT_CODE
from .run_log import read_metrics

REPO = CONFIGS_DIR.parent
DEMO_CONFIG = CONFIGS_DIR / "runs" / "demo.yaml"
OUT = REPO / "runs" / "demo"


def interrupt_step(cfg) -> int:
    """The step after which the demo sends SIGTERM: a third of the way between two periodic
    checkpoints near the middle of the run (35 of the 60 steps, checkpoints every 15), so the
    resume has a checkpoint behind it and steps to replay. Raises ValueError with the fix when
    overrides leave no such step."""
    every, steps = cfg.checkpoint.every_steps, cfg.max_steps
    if not every or not cfg.eval.every_steps:
        raise ValueError("the demo needs periodic checkpoints and validation: drop the overrides of "
                         "checkpoint.every_steps and eval.every_steps (or set them above 0)")
    step = every * max(1, steps // every // 2) + max(1, every // 3)
    if step + 2 > steps:
        raise ValueError(f"the demo stops the run after step {step} (between checkpoints every {every} steps) "
                         f"and resumes it, which needs max_steps >= {step + 2}, not {steps}: raise max_steps or "
                         "lower checkpoint.every_steps")
    return step


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _train_cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", str(config), *overrides]


def _run(cmd: list[str], log: Path) -> int:
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode


def _losses(log_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")}


def _fail(msg: str, log: Path) -> int:
    say(f"FAILED: {msg}; the trainer's output is in {log}")
    return 1


def main(argv: list[str] | None = None, out: Path = OUT) -> int:
    """The demo with ``key=value`` overrides of its config; everything goes under ``out``."""
    t_start = time.time()
    overrides = list(argv if argv is not None else sys.argv[1:])
    cfg = load_config(DEMO_CONFIG, [f"data.sources=[{{path: {out / 'data'}}}]",
                                    f"checkpoint.dir={out / 'checkpoints'}",
                                    f"data.cache_root={out / 'cache'}", *overrides])
    ckpt_dir = Path(cfg.checkpoint.dir)
    try:
        interrupt_after = interrupt_step(cfg)
    except ValueError as e:
        say(f"FAILED: {e}")
        return 2
    out.mkdir(parents=True, exist_ok=True)

    say("1/7 data: demo corpus -> tokenizer -> MDS shards")
    from data.demo import build_demo_data

    t = time.time()
    paths = build_demo_data(out, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len, progress=False)
    say(f"    corpus {paths['corpus']}, tokenizer {paths['tokenizer']}, shards {paths['data']} "
        f"({time.time() - t:.0f}s)")

    for d in (ckpt_dir, out / "verify", out / "export"):
        shutil.rmtree(d, ignore_errors=True)
    config = out / "demo.yaml"
    save_config(cfg, config)
    cmd = _train_cmd(config)
    log = out / "train.log"
    log.write_text("")
    metrics = ckpt_dir / "logs" / "metrics.jsonl"

    say(f"2/7 train {cfg.max_steps} steps: {' '.join(cmd[1:])}  (output: {log})")
    say(f"    will send SIGTERM after step {interrupt_after}, like a SLURM preemption")
    t = time.time()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if metrics.is_file() and any(r["step"] >= interrupt_after for r in read_metrics(metrics)):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        rc = proc.wait()
    if rc != REQUEUE_EXIT_CODE:
        return _fail(f"expected exit code {REQUEUE_EXIT_CODE} after SIGTERM, got {rc}", log)
    stopped = read_metrics(metrics, "preempted")[-1]["step"]
    say(f"    stopped at step {stopped} with exit code {rc} (requeue), checkpoint saved ({time.time() - t:.0f}s)")

    from .checkpoint import list_checkpoints

    earlier = [(s, p) for s, p, ok in list_checkpoints(ckpt_dir) if ok and s < stopped]
    base_step, base = earlier[-1]
    verify = out / "verify"
    shutil.copytree(base, verify / base.name)

    say(f"3/7 rerun the same command: resumes at step {stopped} and finishes")
    t = time.time()
    rc = _run(cmd, log)
    if rc != 0:
        return _fail(f"the resumed run exited with {rc}", log)
    main_losses = _losses(ckpt_dir / "logs")
    say(f"    done ({time.time() - t:.0f}s)")

    say(f"4/7 exact resume check: replay steps {base_step + 1}..{stopped} from {base.name}")
    t = time.time()
    rc = _run(_train_cmd(config, f"checkpoint.dir={verify}", f"faults.preempt_at_step={stopped}",
                         "eval.every_steps=0"), log)
    replay = _losses(verify / "logs")
    steps = list(range(base_step + 1, stopped + 1))
    exact = rc == REQUEUE_EXIT_CODE and all(replay.get(s) == main_losses.get(s) for s in steps)
    for s in steps:
        say(f"    step {s}: first run {main_losses.get(s)!r}  replay {replay.get(s)!r}")
    say(f"    {'identical' if exact else 'DIFFERENT'} ({time.time() - t:.0f}s)")

    say("5/7 export and load without DeepSpeed")
    from data.tokenizer import Tokenizer

    from .export import export_checkpoint, load_exported

    export = export_checkpoint(ckpt_dir, out / "export")
    model = load_exported(export)
    tok = Tokenizer.load(export / "tokenizer.model")
    import torch

    prompt = torch.tensor([tok.encode("ROMEO:\n")])
    sample = model.generate(prompt, 40, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
    say("    sample: " + repr(tok.decode(sample[0].tolist())))

    say("6/7 evaluate the export on the held-out shards (linrnn-eval --suite lm)")
    t = time.time()
    eval_dir = out / "eval"
    rc = _run([sys.executable, "-m", "evals.cli", str(export), "--suite", "lm", "--heldout", "run",
               "--out", str(eval_dir), "--max-tokens", "20000", "--no-progress"], log)
    if rc != 0:
        return _fail(f"the evaluation exited with {rc}", log)
    import json

    heldout = json.loads((eval_dir / "results.json").read_text())["results"]["heldout"]
    say(f"    perplexity {heldout['perplexity']:.1f}, {heldout['bits_per_byte']:.3f} bits/byte over "
        f"{heldout['tokens']} held-out tokens ({time.time() - t:.0f}s)")

    val = read_metrics(ckpt_dir / "logs" / "metrics.jsonl", "val")
    first, last = val[0], val[-1]
    fell = last["loss"] < first["loss"] - 1.0
    say("7/7 where everything is")
    say(f"    corpus:       {paths['corpus']}")
    say(f"    tokenizer:    {paths['tokenizer']}")
    say(f"    shards:       {paths['data']}")
    say(f"    run config:   {config}")
    say(f"    checkpoints:  {ckpt_dir}  (latest: {(ckpt_dir / 'latest').read_text().strip()})")
    say(f"    metrics:      {ckpt_dir / 'logs' / 'metrics.jsonl'}")
    if cfg.logging.tensorboard:
        say(f"    tensorboard:  tensorboard --logdir {ckpt_dir / 'logs' / 'tensorboard'}")
    say(f"    export:       {export}")
    say(f"    eval:         {eval_dir / 'results.md'}")
    say(f"    validation loss: {first['loss']:.3f} at step {first['step']} (ln V = "
        f"{math.log(cfg.model.vocab_size):.3f}) -> {last['loss']:.3f} at step {last['step']}")
    say(f"    total {time.time() - t_start:.0f}s")
    if not (exact and fell):
        return _fail("the resume was not exact" if not exact else "the validation loss did not fall", log)
    say("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

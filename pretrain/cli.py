"""``linrnn-train`` (also ``python -m pretrain``): the training entry point.

Exit codes (the launcher / sbatch script acts on them):
  0   finished (or nothing left to do: the newest checkpoint is at ``max_steps``)
  75  stopped early on SIGTERM/SIGUSR1 or the wall-clock budget, after saving a complete
      checkpoint: requeue the same command and it resumes there (EX_TEMPFAIL)
  1   training failed (e.g. too many non-finite steps in a row); the last good checkpoint
      is untouched
  2   bad input: config, data, tokenizer/vocab or checkpoint-directory mismatch; nothing
      was written
"""
from __future__ import annotations

import argparse
import sys

from .config_loader import ConfigError, dump_config, load_config
from .preemption import REQUEUE_EXIT_CODE, install_early_handlers
from .watchdog import HANG_EXIT_CODE

EXIT_BAD_INPUT = 2
DRY_RUN_MAX_PARAMS = 1_000_000_000  # above this the plan is printed without running the model


def print_plan(cfg) -> bool:
    """Parameters, FLOPs per token and memory per GPU for the layout; True if small enough
    to also run the model here."""
    from .ds_config import grad_accum_steps
    from .flops import flops_per_token
    from .memory import estimate_memory

    f = flops_per_token(cfg.model, cfg.data.seq_len)
    mem = estimate_memory(cfg)
    parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in f.mixers.items())
    print(f"plan: {mem.parameters / 1e6:.1f}M parameters; forward FLOPs/token {f.forward / 1e6:.1f}M "
          f"({parts}, mlp {f.mlp / 1e6:.1f}M, head {f.head / 1e6:.1f}M); training {f.train / 1e6:.1f}M")
    print("plan: " + mem.describe())
    pp, world = cfg.parallel.pipeline_stages, mem.world_size
    if pp > 1:
        from .pipeline import check_pipeline

        dp = check_pipeline(cfg, world)
    else:
        dp = world
    print(f"plan: layout {pp} pipeline stage(s) x {dp} data-parallel rank(s), ZeRO-{cfg.parallel.zero_stage}, "
          f"gradient accumulation {grad_accum_steps(cfg, dp)}")
    if not mem.fits:
        print(f"warning: the estimate exceeds parallel.gpu_memory_gb={cfg.parallel.gpu_memory_gb:g}: raise "
              "parallel.zero_stage, enable parallel.activation_checkpointing, lower micro_batch_size, or "
              "use more GPUs (parallel.plan_world_size)", file=sys.stderr)
    return mem.parameters <= DRY_RUN_MAX_PARAMS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linrnn-train",
        description="Pretrain a linear-RNN language model from a run config. Rerunning the same "
                    "command resumes from the newest complete checkpoint.",
        epilog=f"Example: linrnn-train configs/runs/demo.yaml optim.lr=1e-3 parallel.zero_stage=2. "
               f"Exit codes: 0 done, {REQUEUE_EXIT_CODE} preempted (checkpoint saved, requeue), "
               f"1 training failed, {EXIT_BAD_INPUT} bad input, {HANG_EXIT_CODE} a rank hung (no progress for "
               "hang_timeout_s; its stacks are in the log).",
    )
    parser.add_argument("config", help="run config YAML (see configs/runs/)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied in order")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model, run one synthetic packed batch forward and backward, and exit")
    parser.add_argument("--check", action="store_true",
                        help="check the data and the checkpoint directory as a start would (e.g. on a login "
                             "node before sbatch), say whether it would start fresh or resume, and exit: 0 if "
                             f"it would run, {EXIT_BAD_INPUT} with the reason if not")
    parser.add_argument("--rewind-to", type=int, metavar="STEP",
                        help="make the checkpoint of STEP the one this command resumes from (e.g. before a loss "
                             "spike; the later step directories move to <checkpoint.dir>/rewound/), and exit; "
                             "then submit the same command again. No job may be training into checkpoint.dir")
    parser.add_argument("--skip-steps", type=int, default=0, metavar="M",
                        help="with --rewind-to: the resume drops the next M steps' batches (the step count and "
                             "schedule go on from STEP, the data from M steps further)")
    return parser


def _rewind(cfg, step: int, skip_steps: int) -> int:
    from .checkpoint import CheckpointError
    from .rewind import rewind

    try:
        r = rewind(cfg.checkpoint.dir, step, skip_steps, cfg.logging.log_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if r.moved or r.moved_exports:
        exports = f" and their exports ({', '.join(r.moved_exports)})" if r.moved_exports else ""
        print(f"rewind: moved {', '.join(r.moved) or 'no step directories'}{exports} to {r.moved_to} (delete them "
              "when you no longer need them)")
    skip = (f"; it drops the next {r.skip_steps} steps' batches first (step and schedule go on from {step})"
            if r.skip_steps else "")
    print(f"rewind: the same training command now resumes from {r.target}{skip}")
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags may come between overrides
    if not (args.dry_run or args.check or args.rewind_to is not None):
        install_early_handlers()  # a signal during start-up becomes a save-and-requeue
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.skip_steps and args.rewind_to is None:
        print("error: --skip-steps goes with --rewind-to STEP (the checkpoint whose next steps' data is skipped)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.rewind_to is not None:
        return _rewind(cfg, args.rewind_to, args.skip_steps)
    if args.check:
        return _check(cfg)
    if _is_main():
        print("resolved config:\n" + dump_config(cfg), flush=True)
    if args.dry_run:
        from .dry_run import dry_run

        try:
            small = print_plan(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if not small:
            print("the synthetic forward/backward is skipped for models above "
                  f"{DRY_RUN_MAX_PARAMS / 1e9:.0f}B parameters on this machine")
            return 0
        r = dry_run(cfg)
        print(f"dry run ok: {r.parameters / 1e6:.2f}M parameters, {r.tokens} tokens, "
              f"loss {r.loss:.4f}, grad norm {r.grad_norm:.3f}, {r.seconds:.2f}s forward+backward")
        return 0
    from data.errors import DataError

    from .checkpoint import CheckpointError
    from .trainer import EXIT_FAILED, TrainError, train

    try:
        result = train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return result.exit_code


def _check(cfg) -> int:
    from data.errors import DataError

    from .checkpoint import CheckpointError
    from .run_checks import preflight

    try:
        lines = preflight(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in lines:
        print(f"check: {line}")
    print("check ok: a start would run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

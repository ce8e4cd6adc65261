"""Which checkpoint an eval job takes: ``python -m launch.checkpoints {list,count,pick} ...``.

``slurm/eval.sbatch`` gets a checkpoint root (a run's ``checkpoint.dir``), a step
directory, or an export. As a job array over a root, task i takes the i-th complete
checkpoint, oldest first; ``count`` gives the array size to submit
(``--array=0-$((count-1))``). Only complete checkpoints count (``pretrain.checkpoint``'s
marker), so a save torn by a kill is never evaluated.

A run still training prunes old checkpoints while array tasks wait in the queue, which
would shift "the i-th": ``slurm/eval_sweep.sh`` pins the list at submission (``names``),
and ``pick --names`` takes task i's own checkpoint from it, or says it is gone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXPORT_WEIGHTS = "model.safetensors"  # pretrain.export.WEIGHTS


def complete_checkpoints(root: str | Path) -> list[Path]:
    from pretrain.checkpoint import list_checkpoints

    return [p for _, p, ok in list_checkpoints(root) if ok]


def pick(path: str | Path, index: int | None, names: list[str] | None = None) -> Path:
    """An export or step directory as given, else the index-th (default newest) complete one
    (of ``names``, when the list was pinned at submission)."""
    from pretrain.checkpoint import MARKER

    p = Path(path)
    if (p / EXPORT_WEIGHTS).is_file() or (p / MARKER).is_file():
        if index not in (None, 0):
            raise ValueError(f"{p} is a single checkpoint, but array index {index} was asked for")
        return p
    if names:
        if index is None or not 0 <= index < len(names):
            raise ValueError(f"array index {index} but the sweep pinned {len(names)} checkpoints")
        chosen = p / names[index]
        if not (chosen / MARKER).is_file():
            raise ValueError(f"checkpoint {str(chosen)!r} (array task {index}) is gone: the training run removed "
                             "it (it keeps checkpoint.keep_last checkpoints) after the sweep was submitted; "
                             "raise checkpoint.keep_last to keep checkpoints until their evals run")
        return chosen
    found = complete_checkpoints(p)
    if not found:
        raise ValueError(f"no complete checkpoint (and no export) in {str(p)!r}")
    if index is None:
        return found[-1]
    if not 0 <= index < len(found):
        raise ValueError(f"array index {index} but {p} holds {len(found)} complete checkpoints "
                         f"(submit with --array=0-{len(found) - 1})")
    return found[index]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.checkpoints", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("list", "count", "names"):
        sub.add_parser(name).add_argument("root")
    pk = sub.add_parser("pick")
    pk.add_argument("path")
    pk.add_argument("index", nargs="?", type=int, default=None)
    pk.add_argument("--names", default="", help="comma-separated step directory names pinned by `names`")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pick":
            print(pick(args.path, args.index, [n for n in args.names.split(",") if n]))
        else:
            found = complete_checkpoints(args.root)
            print({"count": str(len(found)), "list": "\n".join(map(str, found)),
                   "names": ",".join(p.name for p in found)}[args.cmd])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Consolidated export: a DeepSpeed checkpoint -> a directory anyone loads without DeepSpeed.

Layout of an export::

    model.safetensors   fp32 weights (or --dtype), LanguageModel parameter names; with tied
                        embeddings the head is not stored twice (safetensors refuses aliases)
    config.yaml         the ModelConfig (``load_exported`` builds the model from it)
    run_config.yaml     the resolved run config the checkpoint was trained with
    tokenizer.model     the sentencepiece model of the training data (when found)
    export.json         step, tokens seen, tokenizer hash, source checkpoint; written last
                        (and removed first when re-exporting), so it marks a complete export

Weights are the fp32 master weights where the checkpoint has them: DeepSpeed's own ZeRO
consolidation (``zero_to_fp32``) without a pipeline, the stages' ZeRO-1 partitions with one
(``pipeline_master_weights``); else the module state (ZeRO-0; a pipeline checkpoint without
optimizer files, with a warning). Module files load with ``weights_only=True``, DeepSpeed's
optimizer files with its own classes. Loading an export runs no code: safetensors + YAML.

Console script: ``linrnn-export = pretrain.export:main``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from . import run_lock
from .config_loader import build_dataclass, dump_config
from .model_config import ModelConfig
from .models import LanguageModel, build_model
from .models.materialize import Placement, build_model_on

EXPORTS_DIR = "exports"  # <checkpoint.dir>/exports/step_*: where eval.sbatch and the sweep export steps
WEIGHTS, CONFIG, RUN_CONFIG, TOKENIZER, META = (
    "model.safetensors", "config.yaml", "run_config.yaml", "tokenizer.model", "export.json")


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a checkpoint root (-> its newest complete checkpoint)."""
    p = Path(path)
    if not p.is_dir():
        raise ckpt.CheckpointError(f"checkpoint {str(p)!r} does not exist ({p.absolute()}): give a step_XXXXXXXX "
                                   "directory or a run's checkpoint.dir")
    if (p / ckpt.MARKER).is_file():
        return p
    newest = ckpt.newest_complete(p)
    if newest is None:
        if p.is_dir() and (p / "run.json").is_file():
            raise ckpt.CheckpointError(f"{str(p)!r} is an incomplete checkpoint (no {ckpt.MARKER} marker)")
        raise ckpt.CheckpointError(f"no complete checkpoint in {str(p)!r}")
    return newest


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine names -> LanguageModel names: drop the ``lm.`` wrapper, and the ``.block`` that
    checkpoints of runs with activation checkpointing had before 2026-11-29 (a wrapper module
    then; now the names do not change)."""
    out = {}
    for k, v in sd.items():
        k = k[3:] if k.startswith("lm.") else k
        k = re.sub(r"^blocks\.(\d+)\.block\.", r"blocks.\1.", k)
        out[k] = v
    return out


_PIPE_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def pipeline_module_weights(ds_dir: Path, mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint's per-layer module files -> LanguageModel names (the modules'
    own dtype: bf16 in a bf16 run). A tied head is not saved as a layer of its own: the
    embedding layer holds its weight."""
    from .models.pipeline import lm_key

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(ds_dir.glob("layer_*-model_states.pt")):
        index = int(f.name.split("-")[0][len("layer_"):])
        for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
            sd[lm_key(index, name, mcfg)] = t
    return sd


def _pipeline_optimizer_files(ds_dir: Path) -> dict[int, list[Path]]:
    """stage -> its ZeRO-1 optimizer files in data-parallel rank order ({} when none were saved)."""
    found: dict[int, dict[int, Path]] = {}
    for f in ds_dir.iterdir():
        m = _PIPE_OPTIM.fullmatch(f.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    stages = len(list(ds_dir.glob("mp_rank_*_model_states.pt")))
    out = {}
    for stage in range(stages if found else 0):
        ranks = found.get(stage, {})
        if not ranks or sorted(ranks) != list(range(len(ranks))):
            raise ckpt.CheckpointError(
                f"pipeline checkpoint {str(ds_dir)!r} lacks optimizer files of stage {stage} (data-parallel ranks "
                f"found: {sorted(ranks)}): it is incomplete; export another checkpoint")
        out[stage] = [ranks[r] for r in range(len(ranks))]
    return out


def pipeline_master_weights(ds_dir: Path, mcfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of a pipeline checkpoint under LanguageModel names; None when it
    holds no optimizer state.

    Why by hand: ``zero_to_fp32`` does not read pipeline checkpoints. Each stage's data-parallel
    ranks hold consecutive slices of its flat fp32 groups; ``param_slice_mappings`` names each
    parameter's fragment in a rank's slice (what DeepSpeed's universal converter reads too), so
    a parameter is its fragments in rank order. The tied embedding/head is in the first and
    last stage alike (its gradient is all-reduced between them); the first stage's copy is taken."""
    from deepspeed.checkpoint.constants import (OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS,
                                                SINGLE_PARTITION_OF_FP32_GROUPS)

    from .pipeline import pipeline_param_to_lm

    files = _pipeline_optimizer_files(ds_dir)
    if not files:
        return None
    shapes = {k: v.shape for k, v in build_model(mcfg, device="meta").state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for stage, paths in files.items():
        pieces: dict[str, list[torch.Tensor]] = {}
        for path in paths:  # DeepSpeed's own files (they pickle its classes): not weights_only
            osd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)[OPTIMIZER_STATE_DICT]
            for flat, mapping in zip(osd[SINGLE_PARTITION_OF_FP32_GROUPS], osd[PARAM_SLICE_MAPPINGS]):
                for name, frag in mapping.items():
                    pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel).clone())
        for name, parts in pieces.items():
            key = pipeline_param_to_lm(name, mcfg)
            if key in out:
                continue  # the tied weight's copy on the last stage
            if key not in shapes or sum(p.numel() for p in parts) != shapes[key].numel():
                raise ckpt.CheckpointError(
                    f"pipeline checkpoint {str(ds_dir)!r}: optimizer state of {name!r} does not fit the model's "
                    f"{key!r} {tuple(shapes.get(key, ()))}: the checkpoint and its run.json disagree")
            out[key] = torch.cat(parts).view(shapes[key])
    return out


def pipeline_state_dict(ds_dir: Path, mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint's weights under LanguageModel names: the fp32 masters from the
    optimizer state (what training continues from; the module files hold their bf16 rounding
    in a bf16 run), else, with a warning, the module weights."""
    masters = pipeline_master_weights(ds_dir, mcfg)
    if masters is not None:
        return masters
    warnings.warn(f"pipeline checkpoint {str(ds_dir)!r} holds no optimizer state: exporting the module weights "
                  "(in the training precision, e.g. bf16) instead of the fp32 master weights", stacklevel=2)
    return pipeline_module_weights(ds_dir, mcfg)


def consolidated_state_dict(step_path: Path, mcfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Every weight of a complete checkpoint in fp32, under LanguageModel names."""
    ds_dir = step_path / ckpt.DS_TAG
    if any(ds_dir.glob("layer_*-model_states.pt")):
        if mcfg is None:
            mcfg = model_config_from(ckpt.read_run_state(step_path)["model"])
        sd = pipeline_state_dict(ds_dir, mcfg)
    elif any(ds_dir.glob("*optim_states.pt")) and any(ds_dir.glob("*zero*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(step_path), tag=ckpt.DS_TAG)
    else:
        states = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
        if not states:
            raise ckpt.CheckpointError(f"no DeepSpeed model state in {str(ds_dir)!r}")
        sd = torch.load(states[0], map_location="cpu", weights_only=True)["module"]
    return clean_state_dict({k: v.float() for k, v in sd.items()})


def model_config_from(d: dict) -> ModelConfig:
    return build_dataclass(ModelConfig, d, prefix="model")


def find_tokenizer(run_config: dict) -> Path | None:
    data = run_config.get("data", {})
    candidates = [data.get("tokenizer")] + [str(Path(s["path"]) / TOKENIZER) for s in data.get("sources", [])]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def export_is_current(step_path: Path, out_dir: str | Path, dtype: str | None = None) -> bool:
    """Whether ``out_dir`` holds a complete export of this very save of ``step_path``: not of
    an earlier save of the same step number (a run restarted, rewound, or resumed from an
    earlier checkpoint in the same directory saves ``step_N`` again, with other weights)."""
    try:
        meta = json.loads((Path(out_dir) / META).read_text())
        saved = ckpt.read_run_state(step_path).get("save_id")
    except (OSError, ValueError, ckpt.CheckpointError):
        return False
    if dtype is not None and meta.get("dtype") != dtype:
        return False
    return meta.get("save_id") == saved  # both None: checkpoints from before save ids


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Write the export of ``checkpoint`` (a step dir or a checkpoint root) to ``out_dir``.
    Exporting another save over an export removes that export's evaluations (``eval/``);
    ``export_is_current`` tells whether there is anything to do."""
    step_path = resolve_checkpoint(checkpoint)
    with ckpt.hold(step_path):  # a training run still saving into its root does not prune it meanwhile
        run_state = ckpt.read_run_state(step_path)
        run_config = yaml.safe_load((step_path / "config.yaml").read_text())
        mcfg = model_config_from(run_state["model"])
        sd = consolidated_state_dict(step_path, mcfg)
    expected = build_model(mcfg, device="meta").state_dict()
    missing = set(expected) - set(sd) - ({"lm_head.weight"} if mcfg.tie_embeddings else set())
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {str(step_path)!r} lacks parameters {sorted(missing)[:5]}")
    if mcfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sd = {k: v.to(torch_dtype).contiguous() for k, v in sd.items() if k in expected}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ckpt.CheckpointError(f"export target {str(out)!r} exists and is not a directory: choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    with run_lock.exclusive(out / ".export.lock") as turn:  # one export at a time into out
        if turn.waited and export_is_current(step_path, out, dtype):  # the export we waited for made this one
            return out
        if turn.held:  # no other export is at work here: temporaries left are a killed one's
            for stale in out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        _write_export(out, step_path, run_state, run_config, mcfg, sd, dtype)
    return out


def _write_export(out: Path, step_path: Path, run_state: dict, run_config: dict, mcfg: ModelConfig,
                  sd: dict[str, torch.Tensor], dtype: str) -> None:
    from safetensors.torch import save_file

    # export.json marks a complete export (written last, removed first when re-exporting);
    # every file is written whole under a temporary name and renamed, so a kill at any
    # moment leaves whole files and, until the end, no marker (slurm/eval.sbatch re-exports)
    if (out / META).is_file() and not export_is_current(step_path, out):
        shutil.rmtree(out / "eval", ignore_errors=True)  # scores of the weights about to be replaced
    (out / META).unlink(missing_ok=True)
    _write_whole(out / WEIGHTS, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    _write_whole(out / CONFIG, lambda tmp: tmp.write_text(dump_config(mcfg)))
    _write_whole(out / RUN_CONFIG, lambda tmp: shutil.copyfile(step_path / "config.yaml", tmp))
    tok = find_tokenizer(run_config)
    if tok is not None:
        _write_whole(out / TOKENIZER, lambda tmp: shutil.copyfile(tok, tmp))
    meta = {"step": run_state["step"], "tokens_seen": run_state["tokens_seen"],
            "tokenizer_hash": run_state.get("tokenizer_hash"), "source": str(step_path.resolve()),
            "dtype": dtype, "tokenizer_file": TOKENIZER if tok is not None else None,
            "save_id": run_state.get("save_id"),
            "add_bos": run_state.get("add_bos")}  # how the evals start a document (None: before it was recorded)
    _write_whole(out / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def _write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary sibling of ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # its own, also without the lock
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> LanguageModel:
    """Build the ``LanguageModel`` of an export and load its weights (no DeepSpeed)."""
    from safetensors.torch import load_file

    p = Path(path)
    mcfg = model_config_from(yaml.safe_load((p / CONFIG).read_text()))
    # every weight comes from the file: nothing drawn, made on the device in the wanted dtype
    model = build_model_on(mcfg, Placement(device, dtype or torch.float32, initialise=False))
    sd = load_file(str(p / WEIGHTS), device=str(device))
    result = model.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if mcfg.tie_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise ValueError(f"export {str(p)!r} does not match its config: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="linrnn-export",
        description="Consolidate a training checkpoint into safetensors + config + tokenizer.")
    parser.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a checkpoint.dir (newest complete)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--reuse", action="store_true",
                        help="keep an export already in OUT if it is of this very save of the checkpoint")
    args = parser.parse_args(argv)
    try:
        step_path = resolve_checkpoint(args.checkpoint)
        if args.reuse and export_is_current(step_path, args.out, args.dtype):
            print(f"kept {args.out}: it is the export of this save of {step_path}")
            return 0
        out = export_checkpoint(step_path, args.out, args.dtype)
    except ckpt.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source = json.loads((out / META).read_text())["source"]  # the step exported, even if newer ones came since
    print(f"exported {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

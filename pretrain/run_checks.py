"""Checks that refuse a run before it writes anything (so bad input damages nothing).

* the data: every source exists, is complete and matches ``data.seq_len`` and the
  tokenizer (``data.loader.data_info`` raises ``DataError`` naming the path);
* the model's vocabulary against the tokenizer the shards were written with;
* an existing checkpoint directory: its newest complete checkpoint must come from the
  same model shape and tokenizer, else resuming would load mismatched weights (or fail
  deep inside DeepSpeed) and the next save would overwrite another run's checkpoints; and
  from the same ZeRO stage, pipeline stages, precision, sequence length and global batch
  (the rank count and micro-batch size, and with them a pipeline's data-parallel degree,
  may change).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import RunConfig
from .config_loader import ConfigError, config_to_dict


def check_device(cfg: RunConfig) -> None:
    """What this machine cannot run (DeepSpeed would fail deep inside its engine)."""
    import torch

    if cfg.parallel.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("parallel.precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16): "
                          "use parallel.precision=bf16 or fp32 on the CPU")


def check_data(cfg: RunConfig) -> dict[str, Any]:
    from data.loader import data_info

    info = data_info(cfg.data)
    vocab = int(info["tokenizer"]["vocab_size"])
    if cfg.model.vocab_size != vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the shards in {info['sources'][0]['path']!r} "
            f"were tokenized with a {vocab}-token vocabulary: set model.vocab_size={vocab} (or prepare "
            "the data with the tokenizer this model was meant for)")
    return info


def _diff(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}.{k}")
        elif a != b:
            out.append(f"{prefix}.{k}: checkpoint {a!r}, config {b!r}")
    return out


def _saved_precision(step: Path) -> str | None:
    import yaml

    try:
        saved = yaml.safe_load((step / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return ((saved or {}).get("parallel") or {}).get("precision")


def check_resume(cfg: RunConfig, tokenizer_hash: str) -> Path | None:
    """The checkpoint to resume from (None: start fresh); raises if the directory is foreign."""
    root = Path(cfg.checkpoint.dir)
    if root.exists() and not root.is_dir():
        raise ckpt.CheckpointError(f"checkpoint.dir {str(root)!r} exists and is not a directory")
    newest = ckpt.newest_complete(root)
    if newest is None:
        return None
    if not cfg.checkpoint.resume:
        raise ckpt.CheckpointError(
            f"checkpoint.dir {str(root)!r} already holds checkpoints (newest {newest.name}) and "
            "checkpoint.resume is false: choose a new checkpoint.dir, or set checkpoint.resume=true")
    state = ckpt.read_run_state(newest)
    diffs = _diff(state.get("model", {}), config_to_dict(cfg.model))
    if diffs:
        raise ckpt.CheckpointError(
            f"checkpoint.dir {str(root)!r} holds a run of another model shape ({'; '.join(diffs[:4])}): "
            "use a new checkpoint.dir for this model, or restore the model config to resume that run")
    if state.get("tokenizer_hash") != tokenizer_hash:
        raise ckpt.CheckpointError(
            f"checkpoint {str(newest)!r} was trained with tokenizer {state.get('tokenizer_hash')}, the "
            f"data now has {tokenizer_hash}: resume with the original data, or use a new checkpoint.dir")
    why = {"zero_stage": "the optimizer state is laid out for the former",
           "pipeline_stages": "the model and optimizer state are split by stage (only the data-parallel degree, "
                              "i.e. the rank count, may change)",
           "precision": "DeepSpeed stores the optimizer state per precision (bf16/fp16 runs keep fp32 master "
                        "weights in their own files)"}
    for key, reason in why.items():
        saved = state.get(key, 1 if key == "pipeline_stages" else None)
        if key == "precision" and saved is None:  # run.json before 2026-11-29: the step's config
            saved = _saved_precision(newest)
        if saved is not None and saved != getattr(cfg.parallel, key):
            raise ckpt.CheckpointError(
                f"checkpoint {str(newest)!r} was saved with parallel.{key}={saved}, the config says "
                f"{getattr(cfg.parallel, key)}: {reason}; set parallel.{key}={saved} to resume, or use a "
                "new checkpoint.dir")
    if state.get("seq_len") not in (None, cfg.data.seq_len):
        raise ckpt.CheckpointError(
            f"checkpoint {str(newest)!r} was trained at data.seq_len={state['seq_len']}, the config "
            f"says {cfg.data.seq_len}: the data order would not continue; restore data.seq_len")
    if state.get("global_batch_size") not in (None, cfg.parallel.global_batch_size):
        raise ckpt.CheckpointError(
            f"checkpoint {str(newest)!r} was trained at parallel.global_batch_size="
            f"{state['global_batch_size']}, the config says {cfg.parallel.global_batch_size}: keep the "
            "global batch fixed across resumes (change micro_batch_size or the rank count instead)")
    return newest

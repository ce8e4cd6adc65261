"""Checks that refuse a run before it writes anything (so bad input damages nothing).

* the data: every source exists, is complete and matches ``data.seq_len`` and the
  tokenizer (``data.loader.data_info`` raises ``DataError`` naming the path);
* the model's vocabulary against the tokenizer the shards were written with;
* an existing checkpoint directory: its newest complete checkpoint must come from the
  same model shape and tokenizer, else resuming would load mismatched weights (or fail
  deep inside DeepSpeed) and the next save would overwrite another run's checkpoints; and
  from the same ZeRO stage, pipeline stages and precision (the rank count and micro-batch
  size, and with them a pipeline's data-parallel degree, may change);
* the data against the checkpoint's: other sources (or weights), sequence length, shuffle
  seed, canonical node count, the other settings that fix the sample order (shuffle,
  algorithm, block size, epoch size) or global batch are refused unless
  ``checkpoint.on_data_change`` says what to do ("continue": the
  same sources at a new global batch read on from the saved position; "restart": other
  data begins from its start). Unchanged data always resumes exactly, so a requeue after
  the first checkpoint of a new data stage does not restart the data again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import RunConfig
from .config_loader import ConfigError, config_to_dict
from .rewind import skip_request


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


# model settings that change how a result is computed, not the result or the weights: free
# to change at a resume (e.g. fewer saved SSD states after running out of memory)
COMPUTE_ONLY = frozenset({"model.mamba2.ssd_state_every"})


def model_diffs(saved: dict, current: dict, prefix: str = "model", defaults: dict | None = None) -> list[str]:
    """``"model.d_model: checkpoint 32, config 64"`` per setting that differs. A setting the
    saved config lacks (added to the code after it was written) counts as its default, which
    is what that code did; ``COMPUTE_ONLY`` settings never count."""
    if defaults is None:
        from .config_loader import config_to_dict as to_dict
        from .model_config import ModelConfig

        defaults = to_dict(ModelConfig())
    out = []
    for k in sorted(set(saved) | set(current)):
        name = f"{prefix}.{k}"
        a, b = saved.get(k, defaults.get(k)), current.get(k)
        if name in COMPUTE_ONLY:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += model_diffs(a, b, name, defaults.get(k) if isinstance(defaults.get(k), dict) else {})
        elif a != b:
            out.append(f"{name}: checkpoint {a!r}, config {b!r}")
    return out


def _saved_precision(step: Path) -> str | None:
    import yaml

    try:
        saved = yaml.safe_load((step / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return ((saved or {}).get("parallel") or {}).get("precision")


def schedule_change(step_dir: Path, cfg: RunConfig, step: int) -> str | None:
    """The learning-rate jump a resume makes because the schedule's settings changed (None:
    no jump, or the checkpoint's config is unreadable).

    Not refused: extending a warmup-stable-decay run or branching its decay from a stable
    checkpoint changes ``max_steps`` on purpose. A cosine run given more steps, though,
    jumps back up the curve, which users should see before it shows in the loss."""
    import math

    import yaml

    from .config import OptimizerConfig
    from .config_loader import build_dataclass
    from .schedule import lr_at

    try:
        saved = yaml.safe_load((step_dir / "config.yaml").read_text()) or {}
        optim = build_dataclass(OptimizerConfig, saved.get("optim") or {})
        max_steps = int(saved["max_steps"])
    except (OSError, yaml.YAMLError, ConfigError, KeyError, TypeError, ValueError):
        return None
    before, now = lr_at(step, optim, max_steps), lr_at(step, cfg.optim, cfg.max_steps)
    if math.isclose(before, now, rel_tol=1e-3):
        return None
    changed = [f"max_steps {max_steps} -> {cfg.max_steps}"] if max_steps != cfg.max_steps else []
    changed += [f"optim.{k} {getattr(optim, k)} -> {getattr(cfg.optim, k)}"
                for k in vars(optim) if getattr(optim, k) != getattr(cfg.optim, k)]
    return (f"the learning rate of step {step} is {now:.3g} under this config's schedule, {before:.3g} under the "
            f"checkpoint's ({', '.join(changed)}): the run continues on the new schedule from there")


@dataclass(frozen=True)
class ResumePoint:
    """Where a run resumes: the checkpoint, and what becomes of its data position.

    ``data`` is "exact" (the same data: read on from the saved position), "continue" (the
    same sources at another global batch: read on from the saved position) or "restart"
    (other data: begin the new data order from its start); ``changes`` names what differs.
    """

    path: Path
    data: str = "exact"
    changes: tuple[str, ...] = ()
    other_data: bool = False  # the sources, split or sequence length differ
    model_changes: tuple[str, ...] = ()  # model settings changed on purpose (checkpoint.on_model_change)


def _short_id(dataset_id: str) -> str:
    """``sha256:652d2f466b83`` of a dataset id: enough to tell datasets apart in a message."""
    kind, _, digest = dataset_id.partition(":")
    return f"{kind}:{digest[:12]}" if digest else dataset_id[:19]


def data_changes(state: dict, cfg: RunConfig, info: dict[str, Any]) -> tuple[list[str], bool]:
    """What differs between the checkpoint's data and this config's: (descriptions, whether
    the sources, split or sequence length differ, so that the saved position means nothing)."""
    from data.loader import mixture_key, order_changes, order_settings

    changes, other_data = [], False
    saved = state.get("data") or {}
    before, after = mixture_key(saved.get("sources") or []), mixture_key(info["sources"])
    if "sources" in saved and before != after:
        was, now = (", ".join(_short_id(i) if w is None else f"{_short_id(i)} x{w:.3g}" for i, w in key)
                    for key in (before, after))
        paths = [src["path"] for src in info["sources"] if "path" in src]
        if paths:
            now += " at " + ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")
        hint = ""
        if [i for i, _ in before] == [i for i, _ in after] and all(w is None for _, w in after):
            hint = (" - sources without weights read in proportion to their sizes (since 2026-11-29); "
                    "give each the weight it had to keep that mixture")
        changes.append(f"data.sources: checkpoint [{was}], config [{now}]{hint}")
        other_data = True
    if saved.get("split") not in (None, cfg.data.train_split):
        changes.append(f"data.train_split: checkpoint {saved['split']!r}, config {cfg.data.train_split!r}")
        other_data = True
    # the saved data order's own settings, which a resume would otherwise keep silently
    order = saved.get("streaming") or {}
    for key, value in (("shuffle_seed", cfg.data.shuffle_seed), ("num_canonical_nodes", cfg.data.num_canonical_nodes)):
        if value is not None and order.get(key) not in (None, value):
            changes.append(f"data.{key}: checkpoint {order[key]}, config {value}")
            other_data = True
    for key, was, now in order_changes(saved, order_settings(cfg.data)):  # shuffle, epoch_size, ...
        changes.append(f"data.{key}: checkpoint {was!r}, config {now!r}")
        other_data = True
    if state.get("seq_len") not in (None, cfg.data.seq_len):
        changes.append(f"data.seq_len: checkpoint {state['seq_len']}, config {cfg.data.seq_len}")
        other_data = True
    if state.get("global_batch_size") not in (None, cfg.parallel.global_batch_size):
        changes.append(f"parallel.global_batch_size: checkpoint {state['global_batch_size']}, "
                       f"config {cfg.parallel.global_batch_size}")
    return changes, other_data


def _data_mode(newest: Path, state: dict, cfg: RunConfig, info: dict[str, Any]) -> ResumePoint:
    """Apply ``checkpoint.on_data_change`` to what differs (module doc)."""
    changes, other_data = data_changes(state, cfg, info)
    if not changes:
        return ResumePoint(newest)
    policy = cfg.checkpoint.on_data_change
    listed = "; ".join(changes)
    if policy == "refuse":
        how = ("checkpoint.on_data_change=restart to train on the new data from its beginning (a new mixture "
               "or sequence length)") if other_data else (
               "checkpoint.on_data_change=continue to read on from the saved position at the new global batch")
        raise ckpt.CheckpointError(
            f"checkpoint {str(newest)!r} was trained on other data than the config's ({listed}): restore "
            f"the config to resume exactly, or set {how}")
    if policy == "continue" and other_data:
        raise ckpt.CheckpointError(
            f"checkpoint.on_data_change=continue keeps the saved data position, which means nothing in "
            f"other data ({listed}): set checkpoint.on_data_change=restart to begin the new data from "
            "its start, or restore the data config")
    return ResumePoint(newest, policy, tuple(changes), other_data)


def check_resume(cfg: RunConfig, info: dict[str, Any]) -> ResumePoint | None:
    """Where to resume (None: start fresh); raises if the directory is foreign.

    ``info`` is the data's ``data.loader.data_info`` (tokenizer hash, sources)."""
    tokenizer_hash = info["tokenizer_hash"]
    root = Path(cfg.checkpoint.dir)
    if root.exists() and not root.is_dir():
        raise ckpt.CheckpointError(f"checkpoint.dir {str(root)!r} exists and is not a directory")
    newest = agreed_newest(root)
    if newest is None:
        return None
    if not cfg.checkpoint.resume:
        raise ckpt.CheckpointError(
            f"checkpoint.dir {str(root)!r} already holds checkpoints (newest {newest.name}) and "
            "checkpoint.resume is false: choose a new checkpoint.dir, or set checkpoint.resume=true")
    state = ckpt.read_run_state(newest)
    diffs = model_diffs(state.get("model", {}), config_to_dict(cfg.model))
    if diffs:
        same_shapes = not shape_changes(state.get("model", {}), cfg)
        if not (same_shapes and cfg.checkpoint.on_model_change == "allow"):
            allow = (", or set checkpoint.on_model_change=allow to go on with these settings (the weights' "
                     "shapes are the same)") if same_shapes else ""
            raise ckpt.CheckpointError(
                f"checkpoint.dir {str(root)!r} holds a run of another model ({'; '.join(diffs[:4])}): use a new "
                f"checkpoint.dir for this model, or restore the model config to resume that run{allow}")
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
    point = _data_mode(newest, state, cfg, info)
    return dataclasses.replace(point, model_changes=tuple(diffs))


def agreed_newest(root: Path) -> Path | None:
    """Collective once the process group is up: the newest complete checkpoint as rank 0 sees
    it, on every rank. A node with a stale directory cache (NFS), or a checkpoint.dir that is
    not shared at all, would otherwise resume from another step and load mixed state."""
    import torch.distributed as dist

    from .distributed import broadcast_from_rank0, fail_together

    newest = ckpt.newest_complete(root)
    mine = str(newest) if newest is not None else ""
    chosen = broadcast_from_rank0(mine)
    seen = chosen == mine or bool(chosen and (Path(chosen) / ckpt.MARKER).is_file())  # late: a directory cache
    fix = "put checkpoint.dir on a file system that every node shares (not node-local disk)"
    rank = dist.get_rank() if dist.is_initialized() else 0
    fail_together(None if seen else ckpt.CheckpointError(
        f"rank 0 resumes from {chosen or 'nothing (a fresh start)'}, but rank {rank} sees "
        f"{mine or 'no complete checkpoint'} in checkpoint.dir {str(root)!r}: the nodes see different contents "
        f"there; {fix}"), lambda n: ckpt.CheckpointError(
        f"{n} other rank(s) see other checkpoints than rank 0 in checkpoint.dir {str(root)!r} (their messages "
        f"name them): {fix}"))
    return newest if chosen == mine else Path(chosen)


def shape_changes(saved_model: dict, cfg: RunConfig) -> list[str]:
    """Parameters whose name or shape differ between the checkpoint's model and the config's
    (built on the meta device: nothing allocated)."""
    from .export import model_config_from
    from .models import parameter_shapes

    try:
        a = parameter_shapes(model_config_from(saved_model))
    except (ConfigError, ValueError) as e:
        return [f"the checkpoint's model config does not build ({e})"]
    b = parameter_shapes(cfg.model)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _elastic_line(path: Path, state: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Whether the resume is elastic, for a job of ``parallel.plan_world_size`` (or
    $WORLD_SIZE) ranks; nothing when neither says (a login node knows no rank count)."""
    import os

    from .checkpoint import UNIVERSAL

    planned = cfg.parallel.plan_world_size or int(os.environ.get("WORLD_SIZE", "0"))
    saved = state.get("world_size")
    if not planned or saved in (None, planned) or cfg.parallel.zero_stage == 0:
        return []
    if (path / UNIVERSAL).is_dir():
        return [f"resume: elastic, {saved} -> {planned} ranks, from the universal checkpoint already made"]
    return [f"resume: elastic, {saved} -> {planned} ranks: the job first converts {path.name} to a universal "
            f"checkpoint (`python -m pretrain.universal {path}` does it now, outside the job)"]


def start_checks(cfg: RunConfig) -> tuple[dict[str, Any], ResumePoint | None]:
    """The checks a start runs before it touches anything (the device, the data, the
    checkpoint directory, ``checkpoint.init_from``): the data's info (with the export's
    ``init_from`` record) and where it would resume; raises what would stop it."""
    from .init_from import check_init_from

    check_device(cfg)
    info = check_data(cfg)
    point = check_resume(cfg, info)
    # a run resuming from its own checkpoint does not read init_from (the export may be gone)
    info["init_from"] = check_init_from(cfg, info["tokenizer_hash"]) if point is None else None
    return info, point


def layout_line(cfg: RunConfig, world: int | None = None) -> str:
    """The job's layout over ``world`` ranks (default ``parallel.plan_world_size``, or
    $WORLD_SIZE, else 1); raises ConfigError where the start would refuse it (a global batch
    the ranks cannot split, a pipeline the ranks or layers cannot hold). A start checks it
    before the process group exists, so every rank stops with the message and nothing else."""
    import os

    from .ds_config import grad_accum_steps
    from .pipeline import check_pipeline

    world = world or cfg.parallel.plan_world_size or int(os.environ.get("WORLD_SIZE", "1"))
    stages = cfg.parallel.pipeline_stages
    dp = check_pipeline(cfg, world) if stages > 1 else world
    return (f"layout: {world} rank(s), {stages} pipeline stage(s) x {dp} data-parallel, "
            f"gradient accumulation {grad_accum_steps(cfg, dp)}")


def preflight(cfg: RunConfig) -> list[str]:
    """What a start of ``cfg`` would do (``start_checks``, without the process group, the
    model or a lock): lines to print; raises what the start would raise."""
    info, point = start_checks(cfg)
    init = info["init_from"]
    sequences = sum(s["splits"][cfg.data.train_split]["sequences"] for s in info["sources"])
    lines = [layout_line(cfg),
             f"data: {len(info['sources'])} dataset(s), {sequences:,} training sequences of {cfg.data.seq_len} "
             f"tokens, tokenizer {info['tokenizer_hash'][:23]}..."]
    if point is None:
        lines.append(f"start: fresh, no checkpoint in {cfg.checkpoint.dir!r}"
                     + (f"; weights from {cfg.checkpoint.init_from} (step {init.get('step')} of its run)"
                        if init is not None else ""))
        if init and init.get("changed_settings"):
            lines.append("model settings other than the export's: " + "; ".join(init["changed_settings"]))
        return lines
    state = ckpt.read_run_state(point.path)
    data = point.data if not point.changes else f"{point.data} ({'; '.join(point.changes)})"
    lines.append(f"resume: from {point.path} at step {state['step']} ({state['tokens_seen']:,} tokens); data: {data}")
    lines += _elastic_line(point.path, state, cfg)
    skip = skip_request(point.path)
    if skip:
        lines.append(f"data: the resume first drops the next {skip} steps' batches (--rewind-to --skip-steps)")
    if point.model_changes:
        lines.append(f"model: settings changed ({'; '.join(point.model_changes)}), allowed by "
                     "checkpoint.on_model_change=allow")
    jump = schedule_change(point.path, cfg, state["step"])
    if jump:
        lines.append(f"warning: {jump}")
    return lines

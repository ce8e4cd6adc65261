"""Start a new run from another run's weights: ``checkpoint.init_from: <export dir>``.

Continued pretraining on new data, a long-context stage as its own run, or a released
checkpoint as the starting point: the weights come from an export (``linrnn-export``:
safetensors, so loading runs no code), the optimizer, schedule, step and data order start
fresh. Only a run with no checkpoint of its own starts this way; once it has saved, a
restart resumes from its own checkpoints (the setting can stay in the config).

The export must hold a tensor of the right shape for every parameter of the configured
model, nothing else, and come from data with the same tokenizer (``check_init_from``,
before anything is written); settings that leave shapes alone may differ (the run lists
them). Every parameter is then copied by name into the freshly built model, or pipeline
stage, before DeepSpeed wraps it (``load_init_weights``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from .checkpoint import CheckpointError
from .config import RunConfig
from .config_loader import ConfigError, config_to_dict
from .export import CONFIG, META, WEIGHTS



def check_init_from(cfg: RunConfig, tokenizer_hash: str) -> dict[str, Any] | None:
    """The export's ``export.json`` (None: no ``init_from``); CheckpointError when it is not a
    complete export of this model shape for this tokenizer."""
    if not cfg.checkpoint.init_from:
        return None
    from .export import model_config_from
    from .run_checks import model_diffs

    p = Path(cfg.checkpoint.init_from)
    where = f"checkpoint.init_from {str(p)!r}"
    if not p.is_dir():
        raise CheckpointError(f"{where} does not exist or is not a directory: give an export (linrnn-export)")
    if not (p / WEIGHTS).is_file():
        hint = (" (a training checkpoint: export it first, `linrnn-export CHECKPOINT OUT`, and give OUT)"
                if (p / "run.json").is_file() or (p / "latest").is_file() else "")
        raise CheckpointError(f"{where} has no {WEIGHTS}: give an export{hint}")
    try:
        meta = json.loads((p / META).read_text())
        model = model_config_from(yaml.safe_load((p / CONFIG).read_text()) or {})
    except (OSError, json.JSONDecodeError, yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{where} is not a complete export ({e}): rerun linrnn-export") from None
    clash = _shape_clash(p / WEIGHTS, cfg)
    if clash:
        diffs = model_diffs(config_to_dict(model), config_to_dict(cfg.model))
        why = f" ({'; '.join(diffs[:4])}, 'checkpoint' being the export)" if diffs else ""
        raise CheckpointError(f"{where} holds other weights than this model has ({'; '.join(clash[:4])}){why}: "
                              "set the model config to the export's shapes, or choose another export")
    if meta.get("tokenizer_hash") not in (None, tokenizer_hash):
        raise CheckpointError(f"{where} was trained with tokenizer {meta['tokenizer_hash']}, the data has "
                              f"{tokenizer_hash}: the embeddings would read other tokens; prepare the data with "
                              "the export's tokenizer.model")
    # settings that leave the weights' shapes alone may change on purpose (a longer attention
    # window or another RoPE base for a long-context stage, say): the run says which
    return {**meta, "changed_settings": model_diffs(config_to_dict(model), config_to_dict(cfg.model))}


def _shape_clash(weights: Path, cfg: RunConfig) -> list[str]:
    """How the export's tensors (read from the safetensors header, nothing loaded) differ
    from the configured model's parameters: missing, unexpected or of another shape."""
    from safetensors import safe_open

    from .models import parameter_shapes

    with safe_open(str(weights), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want = parameter_shapes(cfg.model)
    out = [f"{k}: export {list(have[k])}, model {list(want[k])}" for k in sorted(want.keys() & have.keys())
           if have[k] != want[k]]
    out += [f"{k}: not in the export" for k in sorted(want.keys() - have.keys())]
    return out + [f"{k}: not in the model" for k in sorted(have.keys() - want.keys())]


def load_init_weights(module: nn.Module, path: str | Path, name_of: Any, tied: bool) -> int:
    """Copy the export's weights into ``module``'s parameters; returns how many were set.

    ``name_of`` maps a parameter name of ``module`` to the LanguageModel's (a pipeline
    stage holds only its layers); ``tied``: the export stores the embedding once, for both
    the embedding and the output head."""
    from safetensors import safe_open

    missing = []
    count = 0
    with safe_open(str(Path(path) / WEIGHTS), framework="pt") as f, torch.no_grad():
        stored = {k: k for k in f.keys()}  # parameter name -> tensor name in the file
        if tied and "lm_head.weight" not in stored and "embed.weight" in stored:
            stored["lm_head.weight"] = "embed.weight"
        for name, param in module.named_parameters():
            key = name_of(name)
            if key not in stored or tuple(f.get_slice(stored[key]).get_shape()) != tuple(param.shape):
                missing.append(key)
                continue
            param.copy_(f.get_tensor(stored[key]))  # one tensor at a time: host memory peaks at the largest
            count += 1
    if missing:
        raise CheckpointError(f"checkpoint.init_from {str(path)!r} lacks (or has other shapes for) "
                              f"{sorted(missing)[:5]}: it does not match its own config.yaml; re-export it")
    return count

"""Load an exported checkpoint (``pretrain.export``: safetensors + config + tokenizer) for
evaluation, with one clear error per thing that can be missing."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from data.tokenizer import Tokenizer
from pretrain import export
from pretrain.models import LanguageModel


class CheckpointError(ValueError):
    """The checkpoint cannot be evaluated; the message names the missing piece and the fix."""


@dataclass
class LoadedCheckpoint:
    path: Path
    model: LanguageModel
    tokenizer: Tokenizer
    meta: dict[str, Any]
    train_context: int | None  # the run's data.seq_len, when the export carries its run config
    run_config: dict[str, Any] | None = None

    @property
    def bos(self) -> bool:
        """Whether the training documents began with BOS (``evals.prompts``); exports made
        before it was recorded say nothing, and ``linrnn-prepare``'s default is no BOS."""
        return bool(self.meta.get("add_bos"))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    need_tokenizer: bool = True) -> LoadedCheckpoint:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a directory: pass an export made by linrnn-export")
    for name in (export.CONFIG, export.WEIGHTS):
        if not (p / name).is_file():
            raise CheckpointError(f"checkpoint {str(p)!r} has no {name}: is it an export (linrnn-export "
                                  f"<checkpoint> <out>) rather than a training checkpoint?")
    tok_file = p / export.TOKENIZER
    if need_tokenizer and not tok_file.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} has no tokenizer ({export.TOKENIZER}); text evals need it: "
                              f"copy the run's tokenizer.model into the export")
    model = export.load_exported(p, device=device)
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} pieces but the model only "
                              f"{model.config.vocab_size} embeddings: wrong tokenizer for this checkpoint")
    meta = json.loads((p / export.META).read_text()) if (p / export.META).is_file() else {}
    if not meta and (p / export.RUN_CONFIG).is_file():  # made by linrnn-export, but not finished
        print(f"warning: {str(p)!r} has no {export.META}: an export that did not finish? rerun linrnn-export "
              "to complete it", file=sys.stderr)
    context, run = None, None
    if (p / export.RUN_CONFIG).is_file():
        run = yaml.safe_load((p / export.RUN_CONFIG).read_text()) or {}
        context = (run.get("data") or {}).get("seq_len")
    return LoadedCheckpoint(p, model, tokenizer, meta, int(context) if context else None, run)  # type: ignore[arg-type]

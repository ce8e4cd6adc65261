"""Load an exported checkpoint (``pretrain.export``: safetensors + config + tokenizer) for
evaluation, with one clear error per thing that can be missing."""
from __future__ import annotations

import json
import sys
import tempfile
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
    # whether the training documents began with BOS: export.json's record, or for exports made
    # before it was recorded the run's local datasets' manifests; None when neither says
    add_bos: bool | None = None

    @property
    def bos(self) -> bool:
        """Whether prompts start with BOS (``evals.prompts``); unknown reads as
        ``linrnn-prepare``'s default, no BOS."""
        return bool(self.add_bos)

    def bos_note(self) -> str:
        """The report's line on how documents start."""
        if self.add_bos is None:
            return ("documents start without BOS: the export does not record whether the training data had "
                    "one (linrnn-prepare's default is no BOS; re-export the checkpoint to record it)")
        return f"documents start {'with BOS' if self.add_bos else 'without BOS'}, as the training data's did"


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
    add_bos = meta.get("add_bos")
    add_bos = bool(add_bos) if add_bos is not None else _bos_of_local_sources(run)
    if add_bos is None and tokenizer is not None:
        print(f"warning: {str(p)!r} does not record whether the training documents began with BOS, and its run's "
              "datasets cannot be read here: prompts start without BOS (linrnn-prepare's default); re-export the "
              "checkpoint to record it", file=sys.stderr)
    return LoadedCheckpoint(p, model, tokenizer, meta, int(context) if context else None, run,  # type: ignore[arg-type]
                            add_bos)


def _bos_of_local_sources(run: dict[str, Any] | None) -> bool | None:
    """add_bos from the manifests of the run's datasets (exports made before export.json
    recorded it), as training read it: BOS if any source had it; None when none is readable
    here (remote sources are not fetched: an eval should not wait on an object store)."""
    from data.errors import DataError
    from data.manifest import is_remote, read_dataset

    found = None
    with tempfile.TemporaryDirectory(prefix="linrnn-eval-manifest-") as cache:
        for source in ((run or {}).get("data") or {}).get("sources") or []:
            path = source.get("path") if isinstance(source, dict) else None
            if not path or is_remote(str(path)):
                continue
            try:
                parts = read_dataset(str(path), cache)
            except (DataError, OSError, ValueError):
                continue
            found = bool(found) or any(bool(manifest.get("add_bos")) for _, manifest in parts)
    return found

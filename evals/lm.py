"""Language modelling on a text file: perplexity, bits per byte, and loss by position far
beyond the training context (the length-extrapolation curve).

The text is encoded once with the checkpoint's tokenizer, BOS first, and cut into
windows that overlap by one token, so every text token is predicted exactly once and
bits per byte divide by exactly the text's UTF-8 bytes. Each window starts from an empty
state (as in training).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.tokenizer import Tokenizer


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


def encode_text(tok: Tokenizer, text: str, max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """BOS + tokens (cut to ``max_tokens``) and the UTF-8 bytes of the text they cover."""
    ids = tok.encode(text)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tok.decode(ids)
    return torch.tensor([tok.bos_id, *ids], dtype=torch.long), len(text.encode("utf-8"))


@torch.no_grad()
def token_losses(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """ids [N, T+1] -> next-token losses [N, T] (nats)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, ids.shape[0], batch_size):
        chunk = ids[i:i + batch_size].to(device)
        logits = model(chunk[:, :-1])
        out.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").cpu())
    return torch.cat(out)


@dataclass
class PerplexityResult:
    tokens: int
    bytes: int
    context: int
    nll_per_token: float
    perplexity: float
    bits_per_byte: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: torch.Tensor, n_bytes: int, context: int,
               batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Windows of ``context`` predictions; the last may be shorter."""
    model.eval()
    n_pred = stream.numel() - 1
    total, count = 0.0, 0
    starts = list(range(0, n_pred, context))
    full = [s for s in starts if s + context <= n_pred]
    bar = tqdm(total=len(starts), desc="perplexity", disable=not progress, leave=False)
    for i in range(0, len(full), batch_size):
        rows = torch.stack([stream[s:s + context + 1] for s in full[i:i + batch_size]])
        losses = token_losses(model, rows, batch_size)
        total, count = total + float(losses.sum()), count + losses.numel()
        bar.update(rows.shape[0])
    tail = [s for s in starts if s + context > n_pred]
    for s in tail:
        losses = token_losses(model, stream[s:][None])
        total, count = total + float(losses.sum()), count + losses.numel()
        bar.update(1)
    bar.close()
    nll = total / max(count, 1)
    return PerplexityResult(count, n_bytes, context, nll, math.exp(min(nll, 700.0)), total / math.log(2) / max(n_bytes, 1))


@dataclass
class ExtrapolationResult:
    train_context: int
    length: int
    windows: int
    bucket_starts: list[int]
    bucket_loss: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def length_extrapolation(model: torch.nn.Module, stream: torch.Tensor, train_context: int, factor: int = 8,
                         buckets: int = 32, max_windows: int = 16, batch_size: int = 2) -> ExtrapolationResult:
    """Mean loss by position bucket over windows of ``factor * train_context`` tokens (shorter
    when the text is shorter): a flat curve past the training context means it extrapolates."""
    model.eval()
    length = min(factor * train_context, stream.numel() - 1)
    if length < buckets:
        raise ValueError(f"text too short for a length curve: {stream.numel() - 1} tokens")
    n = min(max_windows, (stream.numel() - 1) // length)
    rows = torch.stack([stream[i * length:i * length + length + 1] for i in range(n)])
    losses = token_losses(model, rows, batch_size).mean(0)
    width = math.ceil(length / buckets)
    starts = list(range(0, length, width))
    return ExtrapolationResult(train_context, length, n, starts,
                               [round(float(losses[s:s + width].mean()), 5) for s in starts])


def heldout_data_config(target: str, run_config: dict | None, cache_root: str | None = None):
    """The ``DataConfig`` to score: ``run`` = the run's own sources (its validation split), or a
    prepared dataset directory (its seq_len read from its manifest)."""
    import dataclasses

    from data.config import DataConfig, DataSource
    from data.manifest import read_manifest
    from pretrain.config_loader import build_dataclass

    if target == "run":
        if not run_config or not (run_config.get("data") or {}).get("sources"):
            raise ValueError("--heldout run: the export has no run_config.yaml with data.sources; "
                             "pass a prepared dataset directory instead")
        cfg = build_dataclass(DataConfig, run_config["data"], prefix="data")
    else:
        manifest = read_manifest(target)
        cfg = DataConfig(sources=[DataSource(path=target)], seq_len=int(manifest["seq_len"]))
    return dataclasses.replace(cfg, drop_last=False, num_workers=0, shuffle=False,
                               cache_root=cache_root or cfg.cache_root)


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, tok: Tokenizer, data_cfg, max_batches: int = 50,
                       batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Loss on the validation split of prepared shards, packed documents kept apart
    (``cu_seqlens``) exactly as in training; bytes are those of the decoded target tokens."""
    from data.loader import TokenLoader

    model.eval()
    device = next(model.parameters()).device
    total, count, n_bytes = 0.0, 0, 0
    with TokenLoader(data_cfg, batch_size, split=data_cfg.val_split, rank=0, world_size=1) as loader:
        for i, batch in enumerate(tqdm(loader, desc="held-out shards", disable=not progress, leave=False)):
            if i >= max_batches:
                break
            labels = batch["labels"]
            logits = model(batch["input_ids"].to(device), cu_seqlens=batch["cu_seqlens"].to(device))
            total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(device),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
            n_bytes += sum(len(tok.decode(row[row != -100].tolist()).encode("utf-8")) for row in labels)
    if count == 0:
        raise ValueError(f"the {data_cfg.val_split!r} split has no tokens to score")
    nll = total / count
    return PerplexityResult(count, n_bytes, data_cfg.seq_len, nll, math.exp(min(nll, 700.0)),
                            total / math.log(2) / max(n_bytes, 1))

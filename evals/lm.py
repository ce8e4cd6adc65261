"""Language modelling on a text file: perplexity, bits per byte, and loss by position far
beyond the training context (the length-extrapolation curve).

The text is encoded once with the checkpoint's tokenizer (BOS first where training had it)
and cut into windows that overlap by one token, so every token after the first is predicted
exactly once and bits per byte divide by exactly those tokens' UTF-8 bytes. Each window
starts from an empty state (as in training).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from data.tokenizer import Tokenizer
from kernels.varlen import offsets_to

from .prompts import PromptCoder
from .sharding import Shard


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


def encode_text(tok: Tokenizer, text: str, max_tokens: int | None = None,
                bos: bool = False) -> tuple[torch.Tensor, int]:
    """The text as one document (``evals.prompts``: BOS first if training had it; tokens cut
    to ``max_tokens``) and the UTF-8 bytes of what is scored: every token after the first of
    the stream, so without BOS the first token's bytes do not count."""
    ids = tok.encode(text)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tok.decode(ids)
    n_bytes = len(text.encode("utf-8"))
    if not bos:
        n_bytes -= len(tok.decode(ids[:1]).encode("utf-8"))
    return torch.tensor(PromptCoder(tok, bos).start + ids, dtype=torch.long), n_bytes


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
    stopped_by_time_limit: bool = False  # then tokens and bytes cover the scored prefix only

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: torch.Tensor, n_bytes: int, context: int,
               batch_size: int = 8, progress: bool = True, deadline: float | None = None,
               prefix_bytes: Callable[[int], int] | None = None, shard: Shard = Shard()) -> PerplexityResult:
    """Windows of ``context`` predictions; the last may be shorter. Past ``deadline`` (after
    the first batch) scoring stops: the result covers the predicted prefix, whose bytes
    ``prefix_bytes(n_tokens)`` counts (windows are scored in text order)."""
    model.eval()
    n_pred = stream.numel() - 1
    starts = list(range(0, n_pred, context))
    full = [s for s in starts if s + context <= n_pred]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s + context > n_pred]  # the shorter tail window

    def score(batch: list[int]) -> tuple[float, int]:
        rows = torch.stack([stream[s:s + min(context, n_pred - s) + 1] for s in batch])
        losses = token_losses(model, rows, batch_size)
        return float(losses.sum()), losses.numel()

    scored, stopped = shard.score(batches, score, deadline=deadline, desc="perplexity", progress=progress)
    total, count = sum(s for s, _ in scored), sum(n for _, n in scored)
    if stopped:
        if prefix_bytes is None:
            raise ValueError("perplexity: a deadline needs prefix_bytes to count the bytes of a partial score")
        n_bytes = prefix_bytes(count)
    nll = total / max(count, 1)
    return PerplexityResult(count, n_bytes, context, nll, math.exp(min(nll, 700.0)),
                            total / math.log(2) / max(n_bytes, 1), stopped)


@dataclass
class ExtrapolationResult:
    train_context: int
    length: int
    windows: int
    bucket_starts: list[int]
    bucket_loss: list[float]
    stopped_by_time_limit: bool = False  # then ``windows`` is the number scored

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def length_extrapolation(model: torch.nn.Module, stream: torch.Tensor, train_context: int, factor: int = 8,
                         buckets: int = 32, max_windows: int = 16, batch_size: int = 2,
                         deadline: float | None = None, shard: Shard = Shard()) -> ExtrapolationResult:
    """Mean loss by position bucket over windows of ``factor * train_context`` tokens (shorter
    when the text is shorter): a flat curve past the training context means it extrapolates.
    Past ``deadline`` (after the first batch) the curve averages the windows scored so far."""
    model.eval()
    length = min(factor * train_context, stream.numel() - 1)
    if length < buckets:
        raise ValueError(f"text too short for a length curve: {stream.numel() - 1} tokens")
    n = min(max_windows, (stream.numel() - 1) // length)
    rows = torch.stack([stream[i * length:i * length + length + 1] for i in range(n)])
    parts, _ = shard.score([rows[i:i + batch_size] for i in range(0, n, batch_size)],
                           lambda batch: token_losses(model, batch, batch_size), deadline=deadline, progress=False)
    losses = torch.cat(parts)
    scored = losses.shape[0]
    losses = losses.mean(0)
    width = math.ceil(length / buckets)
    starts = list(range(0, length, width))
    return ExtrapolationResult(train_context, length, scored, starts,
                               [round(float(losses[s:s + width].mean()), 5) for s in starts], scored < n)


def heldout_data_config(target: str, run_config: dict | None, cache_root: str | None = None):
    """The ``DataConfig`` to score: ``run`` = the run's own sources (its validation split), or a
    prepared dataset directory (its seq_len read from its manifest)."""
    import dataclasses
    import tempfile

    from data.config import DataConfig, DataSource
    from data.manifest import read_dataset
    from pretrain.config_loader import build_dataclass

    if target == "run":
        if not run_config or not (run_config.get("data") or {}).get("sources"):
            raise ValueError("--heldout run: the export has no run_config.yaml with data.sources; "
                             "pass a prepared dataset directory instead")
        cfg = build_dataclass(DataConfig, run_config["data"], prefix="data")
    else:
        with tempfile.TemporaryDirectory(prefix="linrnn-heldout-") as cache:
            manifest = read_dataset(target, cache)[0][1]  # a dataset, or the first of its parts
        cfg = DataConfig(sources=[DataSource(path=target)], seq_len=int(manifest["seq_len"]))
    return dataclasses.replace(cfg, drop_last=False, num_workers=0, shuffle=False, pin_memory=False,
                               cache_root=cache_root or cfg.cache_root)


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, tok: Tokenizer, data_cfg, max_batches: int = 50,
                       batch_size: int = 8, progress: bool = True, deadline: float | None = None,
                       shard: Shard = Shard()) -> PerplexityResult:
    """Loss on ``max_batches * batch_size`` sequences of the validation split of prepared
    shards, spread evenly over it (all of it when it is smaller; the sequences training's
    validation picks, ``pretrain.validation.val_indices``), packed documents kept apart
    (``cu_seqlens``) exactly as in training; bytes are those of the decoded target tokens.
    Past ``deadline`` (after the first batch) the batches scored so far count."""
    from data.loader import TokenLoader
    from pretrain.validation import val_indices

    model.eval()
    device = next(model.parameters()).device

    def score(indices: list[int]) -> tuple[float, int, int]:
        batch = loader.batch_at(indices)
        labels = batch["labels"]
        logits = model(batch["input_ids"].to(device), cu_seqlens=offsets_to(batch["cu_seqlens"], device))
        loss = float(F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(device), ignore_index=-100,
                                     reduction="sum"))
        n_bytes = sum(len(tok.decode(row[row != -100].tolist()).encode("utf-8")) for row in labels)
        return loss, int((labels != -100).sum()), n_bytes

    # every rank opens the split (the loader's shared-memory set-up counts the node's ranks)
    with TokenLoader(data_cfg, batch_size, split=data_cfg.val_split,
                     skip_sources_without_split=True) as loader:  # the run's datasets that have one
        indices = val_indices(loader.num_samples, max_batches * batch_size)
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        scored, stopped = shard.score(batches, score, deadline=deadline, desc="held-out shards", progress=progress)
    total, count, n_bytes = (sum(x[k] for x in scored) for k in range(3))
    if count == 0:
        raise ValueError(f"the {data_cfg.val_split!r} split has no tokens to score")
    nll = total / count
    return PerplexityResult(count, n_bytes, data_cfg.seq_len, nll, math.exp(min(nll, 700.0)),
                            total / math.log(2) / max(n_bytes, 1), stopped)

"""Griffin / Hawk recurrent block (De et al., 2024) with the RG-LRU.

Block: ``out_proj(GeLU(linear_y(x)) * RG_LRU(Conv4(linear_x(x))))``. The RG-LRU is

    gate_x = σ(W_x x + b_x),  gate_a = σ(W_a x + b_a)      (block-diagonal W, num_heads blocks)
    log a_t = -c · gate_a · softplus(Λ),  c = 8
    h_t = a_t · h_{t-1} + sqrt(1 - a_t²) · (gate_x · x_t)

The sqrt(1 - a²) factor keeps the state's scale roughly constant as a → 1; its derivative
blows up there, so (as recurrentgemma does) the backward is capped at 1000 to keep bf16
training finite. The scan runs in ``kernels.linear_recurrence`` with an fp32 state.

At a reset position (the first token of a document, where h_{t-1} is zeroed) the multiplier
is 1 instead, as in recurrentgemma (``reset + ~reset · sqrt(1 - a²)``): h_t = gate_x · x_t.
Resets are t = 0 of every row, every document start under ``cu_seqlens``, and, when
decoding, the first token a fresh cache sees (the cache's ``started`` flag); a prefill or
step that continues a started cache does not reset.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import kernels
from kernels.reference.rg_lru_gates import sqrt_bound_denominator

from ..model_config import ModelConfig
from .base import MixerCache, check_cache_or_packed
from .layers import ShortConvolution
from .lean_autograd import gated_activation

RGLRU_C = 8.0
MAX_SQRT_GRADIENT = 1000.0
A_INIT_RANGE = (0.9, 0.999)  # a at gate_a = 1, uniform in a²


class SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) whose derivative 1/(2 sqrt x) is capped at ``MAX_SQRT_GRADIENT``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_out / sqrt_bound_denominator(x, MAX_SQRT_GRADIENT)


def sqrt_bound_derivative(x: torch.Tensor) -> torch.Tensor:
    return SqrtBoundDerivative.apply(x)


def rg_lru_inputs(x: torch.Tensor, gx_logits: torch.Tensor, ga_logits: torch.Tensor, a_param: torch.Tensor,
                  reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃, a) in fp32: ``x̃ = x·σ(gx)·sqrt(1 - a²)`` (1 at resets), ``a = exp(-c·σ(ga)·softplus(Λ))``
    (0 at resets): ``kernels.rg_lru_gates``, which keeps only its half-precision inputs for
    backward (one fused Triton kernel each way on CUDA tensors)."""
    return kernels.rg_lru_gates(x, gx_logits, ga_logits, a_param, reset, c=RGLRU_C,
                                max_sqrt_gradient=MAX_SQRT_GRADIENT)


class BlockDiagLinear(nn.Module):
    """``y = x W + b`` with W block-diagonal (``num_blocks`` blocks): per-head gates, cheap."""

    def __init__(self, width: int, num_blocks: int):
        super().__init__()
        if width % num_blocks != 0:
            raise ValueError(f"rglru: lru_width {width} must be divisible by rglru.num_heads {num_blocks}")
        self.num_blocks, self.block_width = num_blocks, width // num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, self.block_width, self.block_width))
        self.bias = nn.Parameter(torch.empty(num_blocks, self.block_width))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """recurrentgemma: weights N(0, 1/block_width), zero bias."""
        nn.init.normal_(self.weight, std=math.sqrt(1.0 / self.block_width))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.unflatten(-1, (self.num_blocks, self.block_width))
        y = torch.einsum("...hi,hij->...hj", xb, self.weight) + self.bias
        return y.flatten(-2)


class RGLRUBlock(nn.Module):
    """Griffin's temporal-mixing block; Hawk stacks only these, Griffin mixes in attention."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.rglru
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.lru_width = cfg.lru_width or config.d_model
        self.linear_y = nn.Linear(self.d_model, self.lru_width)
        self.linear_x = nn.Linear(self.d_model, self.lru_width)
        self.conv = ShortConvolution(self.lru_width, cfg.conv_size, activation=None, bias=True)
        self.input_gate = BlockDiagLinear(self.lru_width, cfg.num_heads)
        self.a_gate = BlockDiagLinear(self.lru_width, cfg.num_heads)
        self.a_param = nn.Parameter(torch.empty(self.lru_width))
        self.a_init = cfg.a_init
        self.a_param._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.lru_width, self.d_model)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        """Λ so that a = exp(-c·softplus(Λ)) at gate 1 is uniform in a² over [0.9², 0.999²]
        (the paper); with ``rglru.a_init=recurrentgemma`` a = exp(-softplus(Λ)) is (its code).

        Also re-draws the block-diagonal gates and zeroes the biases of the projections
        (the LM's generic init only touches the ``nn.Linear`` weights).
        """
        lo, hi = A_INIT_RANGE
        a2 = torch.empty(self.lru_width, device=self.a_param.device, dtype=torch.float64).uniform_(lo**2, hi**2)
        # softplus(Λ) = -log(a) / c for the decay at gate 1 (paper), -log(a) for the base (code)
        softplus_lambda = -0.5 * torch.log(a2) / (RGLRU_C if self.a_init == "paper" else 1.0)
        self.a_param.copy_(torch.log(torch.expm1(softplus_lambda)))  # inverse softplus
        self.input_gate.reset_parameters()
        self.a_gate.reset_parameters()
        for lin in (self.linear_y, self.linear_x, self.out_proj):
            nn.init.zeros_(lin.bias)
        if self.conv.bias is not None:
            self.conv.bias.zero_()

    def activation_bytes_per_token(self, elem: int, seq_len: int) -> float:
        """Bytes per token kept for backward (``elem``: bytes of an activation element).

        The input; linear_y's output (the GeLU gate); the conv's input and output; the two
        gate logits; the scan's fp32 decay and state; the state cast to ``elem`` for the
        output gate (the state itself in fp32); the output projection's input; the reset flag.
        """
        W = self.lru_width
        return elem * (self.d_model + (7 if elem != 4 else 6) * W) + 4 * 2 * W + 1

    def _rg_lru_inputs(self, x: torch.Tensor, reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised input x̃, decay a), both fp32, from the conv output ``x``.

        ``reset`` (bool, broadcastable to ``x[..., :1]``) marks document starts: there the
        input is not scaled and a = 0, so nothing from before the start can leak in.
        """
        return rg_lru_inputs(x, self.input_gate(x), self.a_gate(x), self.a_param, reset)

    def rg_lru(
        self,
        x: torch.Tensor,
        reset: torch.Tensor,
        *,
        initial_state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The RG-LRU over the conv output ``x`` [B, T, W]: (h fp32, final state or None)."""
        x_norm, a = self._rg_lru_inputs(x, reset)
        return kernels.linear_recurrence(
            x_norm, a,
            initial_state=initial_state,
            output_final_state=initial_state is not None,
            cu_seqlens=cu_seqlens,
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: MixerCache | None = None,
    ) -> torch.Tensor:
        check_cache_or_packed("rglru", cache, cu_seqlens)
        y_branch = self.linear_y(x)
        xb = self.conv(self.linear_x(x), cu_seqlens=cu_seqlens, cache=cache)
        reset = reset_mask(x.shape[0], x.shape[1], x.device, cu_seqlens=cu_seqlens,
                           started=cache["started"] if cache is not None else None)
        h, final = self.rg_lru(xb, reset, initial_state=cache["h"] if cache is not None else None,
                               cu_seqlens=cu_seqlens)
        if cache is not None:
            cache["h"].copy_(final)
            if x.shape[1] > 0:
                cache["started"].fill_(True)
        return self.out_proj(gated_activation(y_branch, h.to(x.dtype), "gelu"))

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixerCache:
        """fp32 state ``h``, the conv window, and ``started`` (False: the next token is a reset)."""
        return {
            "conv": self.conv.init_state(batch_size, device, dtype),
            "h": torch.zeros(batch_size, self.lru_width, device=device, dtype=torch.float32),
            "started": torch.zeros(batch_size, device=device, dtype=torch.bool),
        }

    def step(self, x: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        """One token ``[B, d_model]``: h = a·h + x̃ on the fp32 cached state."""
        y_branch = self.linear_y(x)
        xb = self.conv.step(self.linear_x(x), cache)
        x_norm, a = self._rg_lru_inputs(xb, ~cache["started"][:, None])
        h = a * cache["h"] + x_norm
        cache["h"].copy_(h)
        cache["started"].fill_(True)
        return self.out_proj(gated_activation(y_branch, h.to(x.dtype), "gelu"))


def reset_mask(
    batch: int,
    length: int,
    device: torch.device,
    *,
    cu_seqlens: torch.Tensor | None = None,
    started: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[B, T, 1]``: True where the RG-LRU restarts (a document's first token).

    Packed (``cu_seqlens``): every document start. Otherwise t = 0 of each row, unless a
    decoding cache has ``started`` for that row. Built on device without a host sync.
    """
    if cu_seqlens is not None:
        # One spare slot absorbs starts equal to T (empty trailing documents). index_fill_
        # takes True as a kernel argument; ``flags[idx] = True`` would upload it from pageable
        # memory first, a blocking copy that waits for the GPU's queue in every layer.
        flags = torch.zeros(length + 1, device=device, dtype=torch.bool)
        flags.index_fill_(0, cu_seqlens[:-1].to(device=device, dtype=torch.long), True)
        return flags[:length].expand(batch, length)[..., None]
    reset = torch.zeros(batch, length, 1, device=device, dtype=torch.bool)
    if length > 0:
        reset[:, 0, 0] = True if started is None else ~started
    return reset

"""flash-linear-attention's Gated DeltaProduct kernels behind our op's signature (benchmarks only).

Both bench scripts compare our ``kernels.gated_delta_product`` with fla's kernels; this is
the one place that converts between the two calls. fla is optional and only imported by
``load_fla_kernel``.

Layouts. Ours: q [B,T,H,K], k [B,T,n_h,H,K], v [B,T,n_h,H,V], beta [B,T,n_h,H]. fla's
``chunk_gated_delta_product`` (fla-core 0.6.0) takes the n_h Householder steps interleaved
along time, k [B,T*n_h,H,K], v [B,T*n_h,H,V], beta [B,T*n_h,H] with step j of token t at
row t*n_h + j, plus ``num_householder=n_h``: a reshape of our tensors, so no copy. The rest
means the same in both: g [B,T,H] is the per-token log decay applied before the token's
steps (or None), ``scale`` multiplies q, states are [N,H,K,V] fp32, and ``cu_seqlens`` counts
tokens (fla scales it by n_h itself). It is passed through unchanged, so the tensor the
model hands every layer keeps hitting fla's per-tensor cache of chunk indices.
``chunk_gated_delta_rule`` is the n_h = 1 case with 4-D k, v and 3-D beta and a required g.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Iterator

import torch

Tensor = torch.Tensor
# Our op's backend signature: (q, k, v, beta, g, *, scale, initial_state, output_final_state,
# cu_seqlens) -> (o [B,T,H,V], final state [N,H,K,V] or None)
GdpKernel = Callable[..., tuple[Tensor, Tensor | None]]
OP = "gated_delta_product"


def to_fla_steps(k: Tensor, v: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B,T,n_h,H,...] -> [B,T*n_h,H,...]: token t's n_h steps become rows t*n_h .. t*n_h+n_h-1."""
    B, T, n_h, H = beta.shape
    return (k.reshape(B, T * n_h, H, k.shape[-1]), v.reshape(B, T * n_h, H, v.shape[-1]),
            beta.reshape(B, T * n_h, H))


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def product_adapter(fla_fn: GdpKernel) -> GdpKernel:
    """Our op's call on top of fla's ``chunk_gated_delta_product`` (or anything with its contract)."""
    def gated_delta_product(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                            scale: float | None = None, initial_state: Tensor | None = None,
                            output_final_state: bool = False,
                            cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        kf, vf, bf = to_fla_steps(k, v, beta.to(q.dtype))  # in q's dtype, as fla's own layer gives it
        return fla_fn(q=q, k=kf, v=vf, g=g, beta=bf, num_householder=k.shape[2], scale=_scale(q, scale),
                      initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens)
    return gated_delta_product


def delta_rule_adapter(fla_fn: GdpKernel) -> GdpKernel:
    """Our op's call (n_h = 1 only) on top of fla's ``chunk_gated_delta_rule`` (GatedDeltaNet)."""
    def gated_delta_product(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                            scale: float | None = None, initial_state: Tensor | None = None,
                            output_final_state: bool = False,
                            cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if k.shape[2] != 1:
            raise ValueError(f"fla's chunk_gated_delta_rule is the n_h = 1 case, got n_h = {k.shape[2]}: "
                             "compare with fla's chunk_gated_delta_product (kernel 'fla') instead")
        if g is None:  # fla's delta rule always takes a gate; log decay 0 is no decay
            g = q.new_zeros(q.shape[:3], dtype=torch.float32)
        return fla_fn(q=q, k=k[:, :, 0], v=v[:, :, 0], g=g, beta=beta[:, :, 0].to(q.dtype), scale=_scale(q, scale),
                      initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens)
    return gated_delta_product


# kernel name -> (fla module, function, adapter)
FLA_KERNELS: dict[str, tuple[str, str, Callable[[GdpKernel], GdpKernel]]] = {
    "fla": ("fla.ops.gated_delta_product", "chunk_gated_delta_product", product_adapter),
    "fla_gdn": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", delta_rule_adapter),
}


def load_fla_kernel(name: str) -> GdpKernel:
    """fla's kernel ``name`` (a key of FLA_KERNELS) with our op's signature; raises if fla is absent."""
    if name not in FLA_KERNELS:
        raise ValueError(f"unknown fla kernel {name!r}: choose from {sorted(FLA_KERNELS)}")
    module, function, adapter = FLA_KERNELS[name]
    return adapter(getattr(importlib.import_module(module), function))


def fla_import_error() -> str | None:
    """None when every fla kernel imports, else why not (fla's import can fail in many ways)."""
    for name in FLA_KERNELS:
        try:
            load_fla_kernel(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, a Triton mismatch, a CUDA probe...
            return f"{type(exc).__name__}: {str(exc)[:160]}"
    return None


@contextlib.contextmanager
def route_gated_delta_product(kernel: GdpKernel) -> Iterator[None]:
    """Within the block, ``kernel`` is the Triton backend of ``kernels.gated_delta_product``.

    The op's front end (input checks, default scale) and every other op stay as they are,
    so a model run inside the block differs from one outside only in this kernel. Calls
    reach it wherever the op picks Triton: ``backend="auto"`` on CUDA tensors (how the
    model calls it), or ``backend="triton"``. The kernel registered before (or none) is
    restored on exit, also when the block raises.
    """
    from kernels import dispatch

    if os.environ.get(dispatch.ENV_VAR, "").strip().lower() == "torch":
        raise RuntimeError(f"{dispatch.ENV_VAR}=torch sends every op to the torch path, so the "
                           f"routed {OP} kernel would never run: unset {dispatch.ENV_VAR}")
    previous = dispatch.triton_impl(OP) if dispatch.triton_available(OP) else None
    dispatch.register_triton(OP, kernel)
    try:
        yield
    finally:
        if previous is not None:
            dispatch.register_triton(OP, previous)
        else:  # dispatch has no public unregister; without Triton there was nothing to restore
            dispatch._TRITON_IMPLS.pop(OP, None)

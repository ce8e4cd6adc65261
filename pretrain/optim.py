"""AdamW with weight decay only where it regularises: matrices, not norms/biases/gates.

Decaying a norm's gain or a bias pulls it towards zero for no benefit, and the recurrent
gate parameters (``A_log``, ``dt_bias``, Griffin's ``a_param``, Mamba2's ``D``) are
marked ``_no_weight_decay`` by the models because decay would move the forget rates.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import OptimizerConfig
from .models.layers import RMSNorm


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that take no weight decay."""
    out: set[str] = set()
    norm_types = (RMSNorm, nn.LayerNorm, nn.GroupNorm)
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, norm_types) or p_name == "bias" or getattr(p, "_no_weight_decay", False):
                out.add(full)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups (decay / no decay), each parameter once (tied weights are one tensor)."""
    skip = no_decay_names(model)
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch's AdamW (no DeepSpeed C++ op to compile); DeepSpeed/ZeRO wraps it."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

"""Triton kernels. Each module registers its op with ``kernels.dispatch`` when imported.

Imports are guarded so a machine without Triton (or with a broken install) keeps the
pure-PyTorch paths working.
"""
import importlib

for _module in ("linear_recurrence", "causal_conv1d", "ssd", "gated_delta_product", "rms_norm",
                "gated_activation", "l2_normalize", "rg_lru_gates"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ImportError:
        pass

"""Triton kernels. Each module registers its op with ``kernels.dispatch`` when imported.

Imports are guarded so a machine without Triton (or with a broken install) keeps the
pure-PyTorch paths working.
"""
try:
    from . import linear_recurrence  # noqa: F401
except ImportError:
    pass
try:
    from . import causal_conv1d  # noqa: F401
except ImportError:
    pass
try:
    from . import ssd  # noqa: F401
except ImportError:
    pass
try:
    from . import gated_delta_product  # noqa: F401
except ImportError:
    pass
try:
    from . import rms_norm  # noqa: F401
except ImportError:
    pass
try:
    from . import gated_activation  # noqa: F401
except ImportError:
    pass

"""Suite-wide settings: no network, hardware-dependent markers skip cleanly, and the Triton
interpreter's half-precision arithmetic made to match a GPU's."""
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models and per-token oracles run far faster on one intra-op thread: on a busy
    2-core box OpenMP threads only spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seeded_single_thread(single_thread):
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted reference run of the single-process training tests (once per session:
    test_train_faults.py and test_train_stages.py share it)."""
    from test_train_common import reference_run

    return reference_run(tmp_path_factory.mktemp("ref"))


# Kernel tests under TRITON_INTERPRET=1: the interpreter's half-precision casts and dots as a
# GPU computes them (used by the GatedDeltaProduct and SSD interpreter tests).
@pytest.fixture
def rtne_bf16(monkeypatch):
    """The interpreter's fp32 -> bf16 cast rounding to nearest even, as the compiled one does.

    ``x.to(tl.bfloat16)`` compiles to a round-to-nearest-even conversion, but triton 3.8's
    interpreter truncates (``InterpreterBuilder.cast_impl`` converts bits with no rounding
    mode; fp16 goes through numpy and rounds). Truncation's bias piles up through the
    state: with half intermediates it tripled the output's error here (9e-3 vs 2.8e-3), so
    the bf16 tolerances would measure the interpreter, not the kernels.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


@pytest.fixture
def half_dots(monkeypatch):
    """The interpreter's ``tl.dot`` on bf16 operands as a GPU computes it: the exact
    products of the bf16 values, summed in fp32. Returns the list of operand dtypes of every
    dot taken. triton 3.6-3.8's interpreter holds bf16 as uint16 bits and multiplies those
    bits as integers (fp16 it holds as numpy float16, which ``np.matmul`` handles)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    seen: list = []

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = np.ascontiguousarray(x.data).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.append((a.dtype.scalar, b.dtype.scalar))
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return seen


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)

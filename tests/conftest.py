"""Suite-wide settings: no network, and hardware-dependent markers skip cleanly."""
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


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)

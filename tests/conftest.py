"""Test-wide set-up: Triton in interpreter mode without a GPU, seeded RNG, the gpu marker, hypothesis profiles."""

import os

import pytest

# Must happen before anything imports triton: without a GPU, Triton kernels run on CPU tensors.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


from hypothesis import settings  # noqa: E402  (after TRITON_INTERPRET: hypothesis imports nothing of triton)

# CI=true (.ci/run): derandomized, so a CI failure reproduces from the same examples on any machine; the blob
# printed with a failure replays it exactly. Elsewhere hypothesis draws fresh examples each run (the header
# says which profile ran; a failure prints its blob).
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)  # no timing flakes on CI
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")


def pytest_report_header(config):
    seed = config.getoption("hypothesis_seed", None)
    how = "derandomized" if settings.default.derandomize else f"seed {seed if seed is not None else 'random'}"
    return f"hypothesis profile: {settings._current_profile} ({how})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def devices() -> list[str]:
    return ["cpu", "cuda"] if _HAS_CUDA else ["cpu"]

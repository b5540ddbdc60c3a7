"""Kernel tests: on a CPU-only machine the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before ds_plugins.kernels (and its @triton.jit kernels) is
imported, which is why this happens here, at collection of tests/kernels, and not in a fixture.
Tests marked `gpu` run the same checks on CUDA where a GPU exists.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("device") == "cuda":
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

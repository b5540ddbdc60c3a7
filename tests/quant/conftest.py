"""msModelSlim loader tests. On a CPU-only machine the Triton kernels run in Triton's interpreter,
so TRITON_INTERPRET is set here, at collection, before ds_plugins.kernels is imported.

Marker `npu`: needs an Ascend NPU with torch_npu (the CPU suite checks the same formulas through the
portable paths). Marker `gpu`: needs CUDA.
"""

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_NPU = importlib.util.find_spec("torch_npu") is not None
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "npu: needs an Ascend NPU with torch_npu (CANN)")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("npu") and not HAS_NPU:
            item.add_marker(pytest.mark.skip(reason="needs an Ascend NPU with torch_npu; run on Ascend"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The real-engine environments (vllm_env, parametrized over the live vLLM versions) of tests/engines.
from tests.engines.conftest import pytest_generate_tests, vllm_env  # noqa: E402,F401

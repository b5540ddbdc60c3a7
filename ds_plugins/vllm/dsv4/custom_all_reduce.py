"""custom_all_reduce=off: vLLM's `--disable-custom-all-reduce`, set for the user on GPUs without NVLink.

vLLM turns its custom all-reduce on for tensor parallelism between two GPUs without NVLink when CUDA's
P2P check passes; on PCIe-only SM12x workstation boxes (RTX PRO 6000) its CUDA IPC then fails
(`Failed: Cuda error .../custom_all_reduce.cuh:455 'invalid argument'`; vllm#47266, known failure
custom_all_reduce_p2p). The policy decides `off` only there (vLLM, SM120/SM121, more than one visible GPU,
NVML reporting no NVLink between them), or where DS_PLUGINS_CUSTOM_ALL_REDUCE=off asks for it.

The seam is `ParallelConfig.__post_init__` (vllm/config/parallel.py), which runs where the engine
arguments become a ParallelConfig (`EngineArgs.create_engine_config`, in the process that parses them).
That ParallelConfig travels inside the VllmConfig to the engine core and every worker, where
`init_worker_distributed_environment` calls `set_custom_all_reduce(not parallel_config.disable_custom_all_reduce)`
before the tensor-parallel group (the only one that uses custom all-reduce) is built. The wrapper runs
vLLM's own __post_init__ first, then sets `disable_custom_all_reduce = True` only where
`tensor_parallel_size > 1` and the field is still False, and logs one line. A user's
`--disable-custom-all-reduce` (True) is kept as it is; an explicit `--no-disable-custom-all-reduce` cannot
be told from vLLM's default (both are False), so the opt-out is DS_PLUGINS_CUSTOM_ALL_REDUCE=upstream,
which the line names.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ...patching import Patch, Target, replace_attribute

_log = logging.getLogger("vllm.ds_plugins")
FIELDS = ("disable_custom_all_reduce", "tensor_parallel_size")
ISSUE = "vllm-project/vllm#47266"


def disable_for_tensor_parallel(parallel_config: Any) -> bool:
    """Set disable_custom_all_reduce where tensor_parallel_size > 1 and it is not set; True if it changed it."""
    tp = getattr(parallel_config, "tensor_parallel_size", 1)
    if not isinstance(tp, int) or tp <= 1 or getattr(parallel_config, "disable_custom_all_reduce", True):
        return False
    parallel_config.disable_custom_all_reduce = True
    _log.info(
        "ds-plugins: --disable-custom-all-reduce set for tensor_parallel_size=%d: %s; NCCL all-reduces "
        "instead. DS_PLUGINS_CUSTOM_ALL_REDUCE=upstream leaves vLLM's choice alone.",
        tp,
        _why(),
    )
    return True


def _why() -> str:
    from ...settings import ConfigError, value

    try:
        asked = value("DS_PLUGINS_CUSTOM_ALL_REDUCE") == "off"
    except ConfigError:  # reported by registration already; this line only words the reason
        asked = False
    if asked:
        return "DS_PLUGINS_CUSTOM_ALL_REDUCE=off asks for it"
    return f"NVML finds no NVLink between these SM12x GPUs, where vLLM's custom all-reduce fails in CUDA IPC ({ISSUE})"


def _check(target: Target) -> str | None:
    code = getattr(target.value, "__code__", None)
    if code is None or code.co_argcount != 1:
        return "expected ParallelConfig.__post_init__(self)"
    fields = getattr(target.owner, "__dataclass_fields__", {})
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        return f"ParallelConfig has no {', '.join(missing)} field"
    return None


def _wrap(original: Any):
    @functools.wraps(original)
    def __post_init__(self) -> None:
        original(self)
        disable_for_tensor_parallel(self)

    return __post_init__


PATCH = Patch(
    id="vllm.custom_all_reduce.off",
    engine="vllm",
    module="vllm.config.parallel",
    attribute="ParallelConfig.__post_init__",
    versions=">=0.20",
    implements=("custom_all_reduce", ("off",)),
    why="vLLM turns its custom all-reduce on for tensor parallelism between GPUs without NVLink when CUDA's P2P "
    "check passes, and its CUDA IPC then fails on PCIe-only SM12x boxes (vllm#47266)",
    retire="vLLM stops enabling custom all-reduce where CUDA IPC between the GPUs fails (or keeps it off on "
    "PCIe-only SM12x GPUs itself)",
    check=_check,
    install=replace_attribute(_wrap),
    how="ParallelConfig.__post_init__ sets disable_custom_all_reduce for tensor parallel > 1 where the user did "
    "not set it, with one log line",
    upstream=("vllm-project/vllm#47266", "vllm-project/vllm#48466"),
    evidence=("tests/engines/test_vllm_custom_all_reduce.py", "tests/contract/test_vllm_seams.py"),
)

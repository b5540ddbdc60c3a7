"""DS_PLUGINS_CUDAGRAPH=off: CUDA graphs off for a DeepSeek-V4 model on the ds-plugins path, nothing else.

The switch vLLM itself honours is `model_config.enforce_eager`: VllmConfig.__post_init__ derives the
cudagraph mode and the compile mode from it. The patch sets it just before __post_init__ runs, only when
the model's architectures are the hooked V4 ones, and says so once. VllmConfig is built in the process
that parses the arguments and travels to the engine core and the workers, so this one place covers them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ...patching import Patch, Target, replace_attribute
from .registry import ARCHITECTURES

_log = logging.getLogger("vllm.ds_plugins")


def architectures_of(vllm_config: Any) -> tuple[str, ...]:
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    return tuple(getattr(hf_config, "architectures", None) or ())


def make_eager_if_hooked(vllm_config: Any) -> bool:
    """Set enforce_eager on a V4 model config; True if it changed something."""
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None or getattr(model_config, "enforce_eager", True):
        return False
    if not set(architectures_of(vllm_config)) & set(ARCHITECTURES):
        return False
    model_config.enforce_eager = True
    _log.info(
        "ds-plugins: CUDA graphs off for DeepSeek-V4 on the ds-plugins kernel path "
        "(DS_PLUGINS_CUDAGRAPH=off; as if --enforce-eager)"
    )
    return True


def _check(target: Target) -> str | None:
    code = getattr(target.value, "__code__", None)
    if code is None or code.co_argcount < 1:
        return "expected VllmConfig.__post_init__(self)"
    fields = getattr(target.owner, "__dataclass_fields__", {})
    if "model_config" not in fields:
        return "VllmConfig has no model_config field"
    return None


def _wrap(original: Any):
    @functools.wraps(original)
    def __post_init__(self, *args: Any, **kwargs: Any) -> Any:
        make_eager_if_hooked(self)
        return original(self, *args, **kwargs)

    return __post_init__


PATCH = Patch(
    id="vllm.dsv4_model.cudagraph_off",
    engine="vllm",
    module="vllm.config.vllm",
    attribute="VllmConfig.__post_init__",
    versions=">=0.20",
    implements=("cudagraph", ("off",)),
    why="DS_PLUGINS_CUDAGRAPH=off asks for eager execution of DeepSeek-V4 on the ds-plugins kernel path "
    "without turning graphs off for other models",
    retire="never: it is a user switch",
    check=_check,
    install=replace_attribute(_wrap),
    how="VllmConfig.__post_init__ sets enforce_eager for a DeepSeek-V4 model on the ds-plugins path, before vLLM "
    "derives its CUDA-graph mode from it",
    evidence=("tests/engines/test_vllm_dsv4_hookup.py", "tests/contract/test_vllm_seams.py"),
)

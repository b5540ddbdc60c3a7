"""`--kv-cache-dtype auto` (vLLM's default) for DeepSeek-V4 on vLLM 0.20-0.28: fp8, where vLLM would assert.

V4's FlashMLA-shaped attention stores its KV cache in the fp8_ds_mla layout and asserts that the KV-cache
dtype starts with "fp8" (0.20-0.23: in the attention layer's __init__; 0.24-0.28: in
`_resolve_dsv4_kv_cache_dtype`, for the classes with `use_fp8_ds_mla_layout`). "auto" does not, so a plain
`vllm serve` fails while the model is built (upstream vllm#47174; 0.30 maps auto to fp8 itself). On the
SM12x every V4 attention class vLLM picks (the FlashMLA-shaped one ds-plugins' Triton path runs, and
0.24+'s FlashInfer SM120 one) uses that layout, so there "auto" always meets the assert; the policy's
`kv_cache_dtype=fp8` (derived from the path manifest's KV-dtype rows) selects this patch, which turns
"auto" (only "auto") into "fp8", what the assert asks the user to pass, which vLLM then rewrites to
fp8_ds_mla itself, and says so in one line. SM90/SM100 are left as shipped (upstream's recipes pass
--kv-cache-dtype fp8 there).

The seam is V4's own config hook, `DeepseekV4ForCausalLMConfig.verify_and_update_config`, which
`VllmConfig.__post_init__` calls (through `try_verify_and_update_config`) for the model's architecture,
in the process that parses the arguments, before the cache config travels to the engine core and workers.
The class inherits a no-op from VerifyAndUpdateConfig; the patch gives it one of its own.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ...patching import Patch, Target, parameters, replace_attribute

_log = logging.getLogger("vllm.ds_plugins")
ARCHITECTURE = "DeepseekV4ForCausalLM"


def choose_fp8_for_auto(vllm_config: Any) -> bool:
    """Set cache_config.cache_dtype = "fp8" where it is "auto"; True if it changed something."""
    cache_config = getattr(vllm_config, "cache_config", None)
    if cache_config is None or getattr(cache_config, "cache_dtype", None) != "auto":
        return False
    cache_config.cache_dtype = "fp8"
    _log.info(
        "ds-plugins: --kv-cache-dtype auto -> fp8 for DeepSeek-V4 (its fp8_ds_mla KV-cache layout "
        "accepts only fp8 on this vLLM; vllm#47174)"
    )
    return True


def _check(target: Target) -> str | None:
    if not isinstance(target.value, staticmethod) or parameters(target.value.__func__) != ("vllm_config",):
        return "expected a staticmethod verify_and_update_config(vllm_config)"
    mapping = getattr(target.module, "MODELS_CONFIG_MAP", {})
    if mapping.get(ARCHITECTURE) is not target.owner:
        return f"MODELS_CONFIG_MAP does not send {ARCHITECTURE} to {target.owner.__name__}"
    return None


def _wrap(original: staticmethod) -> staticmethod:
    inner = original.__func__

    @functools.wraps(inner)
    def verify_and_update_config(vllm_config):
        inner(vllm_config)
        choose_fp8_for_auto(vllm_config)

    return staticmethod(verify_and_update_config)


PATCH = Patch(
    id="vllm.dsv4_model.kv_cache_fp8",
    engine="vllm",
    module="vllm.model_executor.models.config",
    attribute="DeepseekV4ForCausalLMConfig.verify_and_update_config",
    versions=">=0.20,<0.30",
    implements=("kv_cache_dtype", ("fp8",)),
    why="V4's fp8_ds_mla KV-cache layout asserts the KV-cache dtype starts with fp8, so vLLM's default "
    "--kv-cache-dtype auto fails while the model is built (vllm#47174)",
    retire="vLLM maps auto to fp8 for the fp8_ds_mla layout itself (0.30.0 does)",
    check=_check,
    install=replace_attribute(_wrap),
    how="after V4's own verify_and_update_config, kv_cache_dtype auto becomes fp8, with one log line",
    upstream=("vllm-project/vllm#47174",),
    evidence=("tests/engines/test_vllm_covers_kv_cache.py", "tests/contract/test_vllm_seams.py"),
)

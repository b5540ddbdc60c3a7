"""`--quantization ascend` on stock vLLM: msModelSlim checkpoints through ds-plugins' own loader.

`install(plan, log)` registers a QuantizationConfig named "ascend" with vLLM's public
`register_quantization_config`, in the process it runs in. vLLM calls general plugins at the top of
`AsyncEngineArgs.add_cli_args`, before `--quantization` is added, and checks the method against
`QUANTIZATION_METHODS` (the list the registration appends to) when the config is verified, so the
registration made here is what lets `vllm serve <dir> --quantization ascend` through.

vllm-ascend owns the name where it is installed (it registers the same name; vLLM would replace
one class with the other): the policy then says `vllm-ascend` and nothing is registered here.
No runtime patch is needed, so PATCHES is empty.
"""

from __future__ import annotations

import logging

NAME = "ascend"
PATCHES: tuple = ()

_state: str | None = None


def install(plan, log: logging.Logger) -> str:
    """Register (or not) per plan.value("ascend_quant"); idempotent, never raises. Returns a state line."""
    global _state
    try:
        value = plan.value("ascend_quant")
    except Exception as exc:  # a plan without the decision: say so, change nothing
        return f"off (no ascend_quant decision: {exc})"
    if value != "ds_plugins":
        return {
            "vllm-ascend": "deferred to vllm-ascend (it registers --quantization ascend itself)",
            "off": "off",
            "upstream": "upstream",
            "unsupported": "unsupported",
        }.get(value, f"off ({value})")
    if _state is not None:
        return _state
    try:
        _state = _register()
    except Exception as exc:
        log.warning(
            "ds-plugins: could not register --quantization %s (%s: %s); vLLM is left as shipped",
            NAME,
            type(exc).__name__,
            exc,
        )
        return f"failed: {type(exc).__name__}: {exc}"
    log.debug("ds-plugins: %s", _state)
    return _state


def _register() -> str:
    from vllm.model_executor.layers import quantization as q

    from .config import AscendQuantConfig

    current = getattr(q, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {}).get(NAME)
    if current is AscendQuantConfig:
        return f"registered {NAME!r}"
    if current is not None or NAME in q.QUANTIZATION_METHODS:
        owner = getattr(current, "__module__", "vLLM")
        return f"deferred: {NAME!r} is already registered by {owner}"
    q.register_quantization_config(NAME)(AscendQuantConfig)
    return f"registered {NAME!r}"

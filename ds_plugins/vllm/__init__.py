"""The vLLM adapter: what ds-plugins changes in vLLM, and when, one folder per feature.

- `dsv4/`: DeepSeek-V4 on SM12x (the model hook-up, the kernel routes, and the covers on its path: the
  DeepGEMM gate, block-FP8 scales, KV-cache dtype, CUDA graphs, custom all-reduce).
- `ascend/`: `--quantization ascend` for msModelSlim checkpoints.
- `mooncake/`: the Mooncake P/D connector vLLM loads by `kv_connector_module_path`.
- `patches.py`: every vLLM patch; `startup_log.py`: the start-up line where vLLM configures logging late.

vLLM calls general plugins in the API server, the engine core, every worker and
the model-inspection subprocess; `register` runs the shared registration in each.
"""

from __future__ import annotations

import logging

# A child of vLLM's "vllm" logger: our lines get vLLM's format, level and handlers.
LOGGER_NAME = "vllm.ds_plugins"


def declared_patches():
    from .patches import PATCHES

    return PATCHES


def adapter_carriers() -> dict[tuple[str, str], str]:
    """Decision values this adapter carries with no runtime patch (see ds_plugins.effects)."""
    return {
        (
            "mooncake_connector",
            "ds_plugins",
        ): "ds_plugins.vllm.mooncake.connector, imported by vLLM itself (kv_connector_module_path)",
        ("ascend_quant", "ds_plugins"): "AscendConfig, registered through vLLM's public register_quantization_config",
    }


def register() -> None:
    from ..registration import register as run
    from .startup_log import Holding

    log = logging.getLogger(LOGGER_NAME)
    reg = run(
        "vllm",
        via="vllm.general_plugins",
        patches=declared_patches,
        log=Holding(log),  # type: ignore[arg-type]  # Logger-like
        carriers=adapter_carriers,
    )
    if reg.state == "registered" and reg.plan is not None and reg.plan.status == "supported":
        _ascend_quant(reg, log)


# vLLM checks a --quantization name when it builds a ModelConfig, i.e. after `vllm.config` is imported
# in full. The quantization package itself is imported halfway through `vllm.config` (a circular
# import our config class cannot join), so the package that completes later is the trigger.
CONFIG = "vllm.config"


def _ascend_quant(reg, log: logging.Logger) -> None:
    """`--quantization ascend`, in every process: registered the moment vLLM has imported `vllm.config`
    (before any ModelConfig can check the name), never by importing vLLM modules ourselves at plugin
    time: that would load torch into every vLLM process, also where nobody uses the method."""
    if reg.plan.value("ascend_quant") != "ds_plugins" or "ascend_quant" in reg.notes:
        return
    from ..importhook import when_imported

    def install(_module) -> None:
        from .ascend.install import install as run

        reg.notes["ascend_quant"] = run(reg.plan, log)  # never raises

    reg.notes["ascend_quant"] = f"armed: registers when vLLM has imported {CONFIG}"
    when_imported(CONFIG, install)  # runs at once if vLLM has imported it already

"""Point vLLM's DeepSeek-V4 architectures at the ds-plugins hook-up, through the public register_model.

The target is the `ModelRegistry` instance in `vllm.model_executor.models.registry`; the patch runs when
vLLM imports that module (in every process that resolves a model: API server, engine core, workers, the
model-inspection subprocess). vLLM's own entry for each architecture (module, class) is kept in
`ORIGINALS`, the hook-up subclasses exactly that class; undo puts the entries back.
"""

from __future__ import annotations

from typing import Any

from ...patching import Patch, Target

HOOKUP = "ds_plugins.vllm.dsv4.hookup"
# architecture -> class name in vLLM (and in our hook-up, which keeps the name)
ARCHITECTURES = ("DeepseekV4ForCausalLM", "DeepSeekV4MTPModel")

# architecture -> (vLLM module, vLLM class), filled when the patch is installed in this process
ORIGINALS: dict[str, tuple[str, str]] = {}


def _entry(registry: Any, arch: str) -> tuple[str, str] | None:
    entry = getattr(registry, "models", {}).get(arch)
    module, cls = getattr(entry, "module_name", None), getattr(entry, "class_name", None)
    return (module, cls) if isinstance(module, str) and isinstance(cls, str) else None


def _check(target: Target) -> str | None:
    registry = target.value
    if not callable(getattr(registry, "register_model", None)):
        return "ModelRegistry has no register_model()"
    if not isinstance(getattr(registry, "models", None), dict):
        return "ModelRegistry.models is not a dict"
    missing = [a for a in ARCHITECTURES if _entry(registry, a) is None]
    if missing:
        return f"no lazily registered vLLM entry for {', '.join(missing)}"
    return None


def _install(target: Target):
    registry = target.value
    previous = {arch: registry.models[arch] for arch in ARCHITECTURES}
    for arch in ARCHITECTURES:
        module, cls = _entry(registry, arch)  # type: ignore[misc]  # not None: _check saw every entry
        if module == HOOKUP:  # already ours (a second copy of the registry module): keep the first original
            continue
        ORIGINALS[arch] = (module, cls)
        registry.register_model(arch, f"{HOOKUP}:{cls}")

    def undo() -> None:
        registry.models.update(previous)

    return undo


PATCH = Patch(
    id="vllm.dsv4_model.registry",
    engine="vllm",
    module="vllm.model_executor.models.registry",
    attribute="ModelRegistry",
    versions=">=0.20",
    implements=("dsv4_model", ("ds_plugins",)),
    why="vLLM has no SM12x kernels for DeepSeek-V4's sparse attention or indexer (or lacks the FlashInfer / "
    "DeepGEMM build that has them): the architectures go to a subclass of vLLM's own V4 model that checks "
    "the ds-plugins kernel routes are in place",
    retire="the vLLM version and installed kernel libraries serve V4 on SM12x themselves "
    "(policy: sparse_mla=upstream and indexer=upstream)",
    check=_check,
    install=_install,
    how="DeepSeek-V4's architectures in vLLM's ModelRegistry name a ds-plugins subclass of vLLM's own V4 model, "
    "which refuses to start, naming the route, when a selected route is not in place",
    upstream=("vllm-project/vllm#40802", "vllm-project/vllm#40821", "vllm-project/vllm#41063"),
    evidence=("tests/engines/test_vllm_dsv4_hookup.py", "tests/contract/test_vllm_seams.py"),
)

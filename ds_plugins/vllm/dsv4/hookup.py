"""vLLM's own DeepSeek-V4 classes, as subclasses that refuse to start on a half-routed SM12x path.

vLLM imports `ds_plugins.vllm.dsv4.hookup:<class>` lazily (registry.py registered the string), so this
module is imported only where the model is resolved or built. Each class is built on first access
(PEP 562 `__getattr__`) from the vLLM class that the registry held before us, and differs from it in
one thing: before any layer is built it checks that every kernel route the plan selected is in place in
this process (routes.py). A route that was skipped (vLLM moved a seam) would otherwise surface as a
crash inside FlashMLA or DeepGEMM much later, on a GPU they do not support; here it is one clear error
that names the route and the way out (DS_PLUGINS_DSV4_MODEL=upstream).
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

from . import registry

_built: dict[str, type] = {}
_log = logging.getLogger("vllm.ds_plugins")


class RoutesMissing(RuntimeError):
    """The plan sends DeepSeek-V4 to ds-plugins' kernels but a route is not in place."""


def _class_names() -> dict[str, str]:
    """class name -> architecture, for the entries registry.py replaced in this process."""
    return {cls: arch for arch, (_, cls) in registry.ORIGINALS.items()}


def _upstream(arch: str) -> type:
    module_name, class_name = registry.ORIGINALS[arch]
    return getattr(importlib.import_module(module_name), class_name)


def require_routes() -> None:
    """Raise RoutesMissing unless every route the plan selected is applied (or armed) here."""
    from . import routes

    problems = routes.problems()
    if problems:
        raise RoutesMissing(
            "ds-plugins routes DeepSeek-V4's kernels to Triton on this GPU, but "
            + "; ".join(problems)
            + ". vLLM's own kernels have no SM12x build here, so the model cannot run on this path. "
            "Set DS_PLUGINS_DSV4_MODEL=upstream to use vLLM's path anyway, and see `ds-plugins doctor`."
        )


def _build(class_name: str, arch: str) -> type:
    base = _upstream(arch)

    # wraps: vLLM's loader reads inspect.signature(cls.__init__) and builds only classes that take
    # (vllm_config, prefix) the new way; the signature must stay vLLM's own.
    @functools.wraps(base.__init__)  # type: ignore[misc]  # base is the class: its own __init__
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_routes()
        _log.info(
            "ds-plugins: %s runs on the ds-plugins SM12x kernel path (`ds-plugins doctor` lists the routes)", arch
        )
        base.__init__(self, *args, **kwargs)  # type: ignore[misc]  # base is the class: its own __init__

    hooked = type(base)(
        class_name,
        (base,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": class_name,
            "__doc__": f"vLLM's {base.__module__}.{base.__qualname__}, built after ds-plugins checked its "
            f"SM12x kernel routes.",
            "ds_plugins_upstream": base,
        },
    )
    return hooked


def __getattr__(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    arch = _class_names().get(name)
    if arch is None:
        known = ", ".join(sorted(_class_names())) or "none (the registry patch did not run in this process)"
        raise AttributeError(f"{__name__} has no DeepSeek-V4 class {name!r}; hooked classes: {known}")
    if name not in _built:
        _built[name] = _build(name, arch)
    return _built[name]

"""The path manifests (one per engine): every GPU kernel on DeepSeek-V4's path, per version and
device class, with its provider, the evidence for it, and ds-plugins' cover where upstream has none.
Data in `vllm.py` / `sglang.py`; model in `model.py`; checked against the wheels by
tests/contract/test_path_manifest.py and rendered by ci/compat.py into docs/paths/."""

from __future__ import annotations

from collections.abc import Callable

from .model import Blockers, Row, device_class, uncovered


def rows(engine: str) -> tuple[Row, ...]:
    if engine == "vllm":
        from .vllm import ROWS
    elif engine == "sglang":
        from .sglang import ROWS
    else:
        raise ValueError(f"no path manifest for engine {engine!r}")
    return ROWS


def blockers(
    engine: str,
    version: str,
    capability: tuple[int, int] | None,
    values: dict[str, str],
    has: Callable[[str, str], bool] = lambda library, feature: False,
) -> Blockers:
    """The blockers on `engine` `version` on a GPU of `capability` that the decision `values` do not
    cover and the installed libraries (`has(library, feature)`) do not lift (empty off the manifest's
    device classes)."""
    device = device_class(capability)
    if device is None:
        return Blockers((), None)
    return uncovered(rows(engine), version, device, values, has)


__all__ = ["Blockers", "Row", "blockers", "device_class", "rows"]

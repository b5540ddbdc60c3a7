"""A msModelSlim checkpoint directory, validated up front, with tensors read on demand.

`Checkpoint(dir)` parses the description, reads every safetensors header and the model's layout
(config.json, when the directory has one, or `layout` given), validates them against each other
(schemes.validate, structure.check) and checks the scales' values (values.check): every error is
raised there, before any weight is placed; of the tensor data only scales and a bounded sample of
W4A8 weight rows are read. `check_json(dir)` is the part of these checks the JSON files allow alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import checkpoint, description, schemes, structure, values
from . import layout as model_layout
from .errors import AscendFormatError


def check_json(directory: str | Path) -> tuple[description.Description, model_layout.Layout | None]:
    """The checks a checkpoint's JSON files allow on their own, with no safetensors file at hand (a hub id
    before its weights are fetched): the description, config.json's layout, the safetensors index against
    the description both ways, and the description's layers and MTP layers against config.json. Every
    other check needs the safetensors files and runs in Checkpoint()."""
    directory = Path(directory)
    desc = description.parse(directory)
    lay = model_layout.read(directory)
    indexed: dict[str, Path] = {}
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    for index in indexes:
        weight_map = checkpoint.read_weight_map(index)
        for key in weight_map:
            if key not in desc.types:
                raise AscendFormatError(str(index), key, f"the index lists this tensor but {desc.path} does not")
            indexed[key] = index
    if indexes:
        for key in desc.types:
            if key not in indexed:
                raise AscendFormatError(
                    desc.path,
                    key,
                    f"listed in the description but not in the safetensors "
                    f"index ({', '.join(i.name for i in indexes)})",
                )
    if lay is not None:
        structure.check_keys(desc, lay)
    return desc, lay


class Checkpoint:
    def __init__(
        self,
        directory: str | Path,
        fused: Mapping[str, Iterable[str]] = schemes.DEFAULT_FUSED,
        layout: model_layout.Layout | None = None,
    ):
        self.directory = Path(directory)
        self.description = description.parse(self.directory)
        self.tensors = checkpoint.scan(self.directory)
        self.layout = layout if layout is not None else model_layout.read(self.directory)
        self.modules = schemes.validate(self.description, self.tensors, fused, self.layout)
        values.check(self.modules)
        self._handles: dict[str, Any] = {}  # safetensors' safe_open handles

    def scheme_of(self, module: str) -> str:
        spec = self.modules.get(module)
        return spec.scheme if spec else "FLOAT"

    def read(self, key: str):
        """One tensor, as stored (dtype and layout untouched)."""
        from safetensors import safe_open

        file = self.tensors[key].file
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt")
        return handle.get_tensor(key)

    def module_tensors(self, module: str) -> dict:
        spec = self.modules[module]
        return {suffix: self.read(info.key) for suffix, info in spec.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def quantized_nbytes(self) -> int:
        return sum(s.nbytes for s in self.modules.values())

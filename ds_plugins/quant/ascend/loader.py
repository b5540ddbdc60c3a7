"""A msModelSlim checkpoint directory, validated up front, with tensors read on demand.

`Checkpoint(dir)` parses the description, reads every safetensors header and validates the two
against each other (schemes.validate): every error is raised there, before any weight is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from . import checkpoint, description, schemes


class Checkpoint:
    def __init__(self, directory: str | Path, fused: Mapping[str, Iterable[str]] = schemes.DEFAULT_FUSED):
        self.directory = Path(directory)
        self.description = description.parse(self.directory)
        self.tensors = checkpoint.scan(self.directory)
        self.modules = schemes.validate(self.description, self.tensors, fused)
        self._handles: dict[str, object] = {}

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

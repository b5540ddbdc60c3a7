"""The one error type of the msModelSlim loader: it names the file and the tensor key at fault."""

from __future__ import annotations


class AscendFormatError(ValueError):
    """A msModelSlim checkpoint is malformed or uses something this loader does not support.

    Raised while reading the description and the safetensors headers, i.e. before any weight
    is placed in a model.
    """

    def __init__(self, file: str, key: str | None, problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        where = f"{self.file}" + (f", key {key!r}" if key is not None else "")
        super().__init__(f"msModelSlim checkpoint: {where}: {problem}")

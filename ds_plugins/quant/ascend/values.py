"""The checks that need tensor values, run with the header checks, before any weight is placed:
scales finite and positive (a NaN or zero scale loads without an error and turns the layer's output
into NaN or zeros), and W4A8 `scale_bias` against the weights it was computed from (it exposes an
int4 packing that differs from msModelSlim's, e.g. swapped nibbles, which no header shows).

Only small tensors are read, through safetensors (each a slice of the memory-mapped file): every
per-channel scale, and for `scale_bias` a bounded sample (SAMPLE_MODULES modules spread over the
checkpoint, SAMPLE_ROWS packed weight rows each): the cost grows with the number of modules (a few
small reads each), not with the size of the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import arith
from .errors import AscendFormatError
from .schemes import ModuleSpec

# Scale tensors, per scheme: (suffix, must be > 0).
SCALES = {
    "W8A8_DYNAMIC": (("weight_scale", True),),
    "W4A8_DYNAMIC": (("weight_scale", True),),
    "W8A8": (("input_scale", True), ("input_offset", False), ("deq_scale", True), ("weight_scale", True)),
}
SAMPLE_MODULES = 64
SAMPLE_ROWS = 4  # packed rows: output channels 0 .. 2*SAMPLE_ROWS-1
RTOL = 1e-3  # scale_bias is stored in fp32; a packing error is off by whole int4 values


class _Files:
    """One safetensors handle per file, opened on first use."""

    def __init__(self):
        self.handles = {}

    def _handle(self, info):
        from safetensors import safe_open

        h = self.handles.get(info.file)
        if h is None:
            h = self.handles[info.file] = safe_open(info.file, framework="pt")
        return h

    def tensor(self, info) -> torch.Tensor:
        return self._handle(info).get_tensor(info.key)

    def slice(self, info):
        return self._handle(info).get_slice(info.key)


BATCH = 4096  # scale tensors checked together (one pass of torch ops); a failing batch is checked one by one


def check(specs: Mapping[str, ModuleSpec]) -> None:
    files = _Files()
    batch: list[tuple] = []
    for module, spec in sorted(specs.items()):
        for suffix, positive in SCALES.get(spec.scheme, ()):
            info = spec.tensors.get(suffix)
            if info is not None:
                batch.append((info, files.tensor(info), positive))
        if spec.scheme == "W8A8":
            _check_offset_range(spec.tensors["input_offset"], files.tensor(spec.tensors["input_offset"]))
        if len(batch) >= BATCH:
            _check_scales(batch)
            batch = []
    _check_scales(batch)
    w4 = [s for _, s in sorted(specs.items()) if s.scheme == "W4A8_DYNAMIC" and "scale_bias" in s.tensors]
    step = max(1, -(-len(w4) // SAMPLE_MODULES))
    for spec in w4[::step]:
        _check_scale_bias(spec, files)


def _check_scales(batch: list[tuple]) -> None:
    if not batch:
        return
    flat = torch.cat([_decoded(info, t).reshape(-1) for info, t, _ in batch])
    strict = torch.cat([torch.full((t.numel(),), p, dtype=torch.bool) for _, t, p in batch])
    if bool(torch.isfinite(flat).all()) and bool(((flat > 0) | ~strict).all()):
        return
    for info, t, positive in batch:
        _check_scale(info, t, positive)


def _decoded(info, t: torch.Tensor) -> torch.Tensor:
    return arith.decode_deq_scale(t) if info.key.endswith(".deq_scale") else t.float()


def _check_scale(info, t: torch.Tensor, positive: bool) -> None:
    v = _decoded(info, t)
    finite = torch.isfinite(v)
    if not bool(finite.all()):
        n = int((~finite).sum())
        raise AscendFormatError(
            info.file, info.key, f"{n} of {v.numel()} values are NaN or infinite (the layer's output would be NaN)"
        )
    if positive and not bool((v > 0).all()):
        bad = v[v <= 0]
        raise AscendFormatError(
            info.file,
            info.key,
            f"{bad.numel()} of {v.numel()} values are not positive (e.g. {float(bad[0])!r}); scales must be > 0",
        )


def _check_offset_range(info, t: torch.Tensor) -> None:
    v = t.float()
    if not bool(((v >= -128) & (v <= 127)).all()):
        raise AscendFormatError(
            info.file,
            info.key,
            f"static activation offset {v.reshape(-1).tolist()[:4]} is outside the int8 range [-128, 127]",
        )


def _check_scale_bias(spec: ModuleSpec, files: _Files) -> None:
    w_info, sb_info = spec.tensors["weight"], spec.tensors["scale_bias"]
    rows = min(SAMPLE_ROWS, w_info.shape[0])
    inp = spec.in_features
    chunks = sb_info.shape[1] if len(sb_info.shape) == 2 else 1
    if rows == 0 or inp % chunks:
        return
    w = arith.unpack_int4(files.slice(w_info)[0:rows]).double()  # [2*rows, in]
    s = files.slice(spec.tensors["weight_scale"])[0 : 2 * rows].double().reshape(-1, 1)
    stored = files.slice(sb_info)[0 : 2 * rows].double().reshape(2 * rows, chunks)
    parts = w.reshape(2 * rows, chunks, inp // chunks)
    want = 8.0 * s * parts.sum(-1)
    tol = RTOL * 8.0 * s * parts.abs().sum(-1) + 1e-30
    bad = ~((stored - want).abs() <= tol)
    if bool(bad.any()):
        n, g = (int(i) for i in torch.nonzero(bad)[0])
        raise AscendFormatError(
            w_info.file,
            w_info.key,
            f"W4A8 scale_bias disagrees with the unpacked weight "
            f"(channel {n}{f', chunk {g}' if chunks > 1 else ''}: "
            f"stored {float(stored[n, g]):.6g}, "
            f"8*s*sum(W) = {float(want[n, g]):.6g}): the int4 packing is not msModelSlim's "
            "(packed[j] = W[2j+1] << 4 | W[2j] & 0xF; nibbles swapped?)",
        )

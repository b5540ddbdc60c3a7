"""Where a kernel runs, and the argument checks every public kernel does before launching.

Triton decides at decoration time whether `@triton.jit` kernels are compiled for a
GPU or run by its CPU interpreter (TRITON_INTERPRET=1), so this module reads the
variable once, at import, the same way. Dispatch for the public functions:

- CUDA tensors: the Triton kernel.
- CPU tensors with TRITON_INTERPRET=1 set before ds_plugins.kernels was imported:
  the same Triton kernel, run by the interpreter (what the CPU test suite does).
- CPU tensors otherwise: the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


class KernelInputError(ValueError):
    """A kernel argument has the wrong dtype, shape or device. Raised before any launch."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch planning (plain Python: the indexer's planning must work without triton)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


# A capability the launch planners use instead of the device's (launch_target): lets an SM90 GPU run
# the SM12x launch configurations, and the offline compile check plan launches for any target.
_forced_capability: tuple[int, int] | None = None


@contextlib.contextmanager
def launch_target(capability: tuple[int, int] | None):
    """Plan launches inside this block as for a GPU of this compute capability, e.g. (12, 0)
    (None: the device's own). Only tile sizes and warps change; the math is the same."""
    global _forced_capability
    # tuple() of the (major, minor) pair is a pair; mypy widens it to tuple[int, ...]
    previous, _forced_capability = _forced_capability, (tuple(capability) if capability is not None else None)  # type: ignore[assignment]
    try:
        yield
    finally:
        _forced_capability = previous


def target_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability launches are planned for: launch_target's, else a CUDA device's own,
    else None (CPU: the interpreter or the reference)."""
    if _forced_capability is not None:
        return _forced_capability
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    return None


def use_triton(t: torch.Tensor) -> bool:
    """True if the Triton kernel should run for tensors on t's device (else: the reference)."""
    if not HAVE_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and INTERPRET


def expect(
    name: str,
    t,
    *,
    dtype=None,
    ndim: int | None = None,
    shape: tuple | None = None,
    last_dim: int | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> None:
    """Check one argument; the error names it and says what was expected and what came.

    dtype may be one dtype or a tuple of allowed dtypes; shape entries of None are free.
    """
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            want = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise KernelInputError(f"{name}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise KernelInputError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(w is not None and w != g for w, g in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise KernelInputError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise KernelInputError(f"{name}: expected last dimension {last_dim}, got shape {list(t.shape)}")
    if device is not None and t.device != device:
        raise KernelInputError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise KernelInputError(f"{name}: expected a contiguous tensor")

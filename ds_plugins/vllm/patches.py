"""Every runtime patch ds-plugins applies to vLLM (each documented in patches/<id>.toml).

Grouped by what they implement; each is selected by one policy decision and applies in every vLLM
process (general plugins run in the API server, the engine core, every worker and the model-inspection
subprocess), at the moment vLLM imports the target module.
"""

from __future__ import annotations

from ..patching import Patch
from . import startup_log
from .dsv4 import cudagraph, custom_all_reduce, deepgemm_gate, fp8_block_scales, kv_cache, registry, routes

PATCHES: tuple[Patch, ...] = (
    *deepgemm_gate.PATCHES,  # deepgemm=off|on
    registry.PATCH,  # dsv4_model=ds_plugins
    *routes.PATCHES,  # sparse_mla=triton, indexer=triton
    cudagraph.PATCH,  # cudagraph=off
    custom_all_reduce.PATCH,  # custom_all_reduce=off: --disable-custom-all-reduce on GPUs without NVLink
    kv_cache.PATCH,  # kv_cache_dtype=fp8 (vLLM 0.20-0.29): --kv-cache-dtype auto -> fp8
    fp8_block_scales.PATCH,  # indexer=triton: block-FP8 linears' e8m0 scales -> float32 for CUTLASS
    startup_log.PATCH,  # every plan: the start-up line where vLLM configures logging late
)

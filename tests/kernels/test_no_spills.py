"""No launch variant of any ds-plugins kernel spills registers, and each fits the target's shared
memory, as ptxas reports it under Triton's own flags (`-v --regAllocOptLevel=2 --gpu-name=sm_XXXa`)
for sm_90a (H100/H200), sm_120a (RTX PRO 6000) and sm_121a (DGX Spark). No GPU is needed:
tests/kernels/offline_compile.py compiles every variant the wrappers choose at DeepSeek-V4's real
shapes with the ptxas Triton bundles, in a subprocess without TRITON_INTERPRET.

A cold run compiles about 80 kernels (3 minutes on a 2-core box); ptxas reports are cached under
~/.cache/ds-plugins/ptxas-reports by kernel source, specialisation, options, target and Triton
version, so a run after an unchanged kernel takes seconds."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("90", "120", "121")
# Opt-in shared memory per block: 227 KiB on SM90, 99 KiB on SM120/SM121.
SMEM_LIMIT = {"90": 232448, "120": 101376, "121": 101376}
MAX_REGISTERS = 255


def _launched_kernels() -> set[str]:
    """Every @triton.jit function named *_kernel in ds_plugins/kernels (the ones wrappers launch),
    read from the source so the list cannot drift from what the test compiles."""
    names = set()
    for path in (ROOT / "ds_plugins" / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.endswith("_kernel")
                and any(ast.unparse(d) == "triton.jit" for d in node.decorator_list)
            ):
                names.add(node.name)
    return names


def _compile_report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "kernels" / "offline_compile.py"),
            "--targets",
            ",".join(TARGETS),
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_variant_spills_and_each_fits_shared_memory_on_sm90a_sm120a_sm121a():
    result = _compile_report()
    assert set(result["ptxas"]) == set(TARGETS) and all(Path(t["path"]).is_file() for t in result["ptxas"].values())
    reports = result["reports"]
    kernels = _launched_kernels()
    assert len(kernels) == 10, kernels
    for target in TARGETS:
        mine = [r for r in reports if r["target"] == target]
        assert {r["kernel"] for r in mine} == kernels, target
        # each planning branch compiles: prefill head blocks, decode (one split, two, MTP + combine),
        # indexer FP8/FP4 x ragged/paged x logits/top-k (top-k also split), mHC, einsum batch tiers x
        # scale recipes: 30 distinct binaries on sm_120a/sm_121a, 32 on sm_90a (Triton 3.9)
        assert len(mine) >= 30, (target, len(mine))
    bad = [
        f"sm_{r['target']}a {r['kernel']} [{r['variant']}] ({r['case']}): {r['registers']} registers, "
        f"spill {r['spill_stores']}/{r['spill_loads']} bytes, smem {r['smem']}"
        for r in reports
        if r["spill_stores"]
        or r["spill_loads"]
        or r["registers"] > MAX_REGISTERS
        or r["smem"] > SMEM_LIMIT[r["target"]]
    ]
    assert not bad, "\n".join(bad)

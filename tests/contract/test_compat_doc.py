import pytest

from ci import compat

pytestmark = pytest.mark.contract


def test_docs_compat_md_is_generated_from_the_matrix():
    assert compat.DOC.read_text() == compat.render(), "docs/compat.md is stale: run `python ci/compat.py write`"


def test_stock_vllm_rows_read_what_the_wheels_ship():
    # vLLM 0.27.0 re-vendored a DeepGEMM without SM120 kernels while its gate claims DeepGEMM on SM12x:
    # exactly the `Unknown SF transformation` case the DeepGEMM decision is for.
    assert compat.decisions_cell("vllm", "0.27.0", "SM120").startswith("deepgemm=off")
    assert compat.decisions_cell("vllm", "0.28.0", "SM120") == "upstream"
    assert "sparse_mla=triton" in compat.decisions_cell("vllm", "0.22.1", "SM121")
    assert compat.decisions_cell("vllm", "0.22.1", "SM90") == "upstream"

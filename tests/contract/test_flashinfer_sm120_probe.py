"""The probe's reading of FlashInfer's SM120 DeepSeek-V4 decode, on the real FlashInfer wheels vLLM pins.

vLLM >= 0.28 refuses an SM120 decode shape that FlashInfer's dispatch table lacks; the probe reads the same
table (source, no import) so that the policy can route V4 to ds-plugins' kernels instead.
"""

import shutil

import pytest

from ci import upstream
from ds_plugins.probe import DSV4_SM120_DECODE_SHAPES, _missing_dsv4_decode_shapes, flashinfer_at

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


def test_flashinfer_without_a_literal_table_keeps_the_entry_point_answer():
    # 0.6.12/0.6.13 (vLLM 0.24-0.27 pins) have no table; 0.7.2 computes it: vLLM checks only the entry point there
    for version in ("0.6.12", "0.7.2.post1"):
        root = _wheel(version)
        assert _missing_dsv4_decode_shapes(root) == ()
        assert flashinfer_at(root, version).has("sm120_sparse_mla")

"""Issue #17 items 1-4: every named malformed checkpoint (malformed.py) is refused by Checkpoint()
with one AscendFormatError line naming the file and the key, before any weight is placed: of the
tensor data only scales and a few packed W4A8 rows are read (test_format's recorder checks that).
Each case was seen to pass silently or raise another exception with the loader before #17."""

import shutil

import pytest
import torch
from safetensors import SafetensorError, safe_open

from ds_plugins.quant.ascend import AscendFormatError, values
from ds_plugins.quant.ascend.loader import Checkpoint
from ds_plugins.quant.ascend.modules import QuantExperts

from . import malformed
from .fixtures import layer_checkpoint
from .test_format import _Reads


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine")
    layer_checkpoint(d)
    return d


@pytest.fixture
def ckpt(pristine, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(pristine, d)
    return d


def _expect(case, d, monkeypatch):
    file_part, key, problem = case(d)
    reads = _Reads(monkeypatch)
    with pytest.raises(AscendFormatError) as info:
        Checkpoint(d)
    reads.assert_small()
    err = info.value
    msg = str(err)
    assert "\n" not in msg and msg.startswith(f"msModelSlim checkpoint: {err.file}"), msg
    assert file_part in err.file, msg
    if key is None:
        assert err.key is None, msg
    else:
        assert err.key is not None and key in err.key and repr(err.key) in msg, msg
    assert problem in msg, msg
    return err


@pytest.mark.parametrize("case", malformed.CASES, ids=[c.__name__ for c in malformed.CASES])
def test_malformed_checkpoint_is_refused_naming_file_and_key(case, ckpt, monkeypatch):
    _expect(case, ckpt, monkeypatch)


def test_header_over_the_limit_is_one_safetensors_refuses(ckpt):
    """The limit is safetensors' own: the library refuses the file we refuse."""
    file_part, _, _ = malformed.header_over_safetensors_limit(ckpt)
    with pytest.raises(SafetensorError):
        safe_open(str(ckpt / file_part), "pt")


def test_n_mtp_layers_is_a_known_global_key(ckpt):
    malformed.set_desc(ckpt, {**malformed.desc(ckpt), "n_mtp_layers": 1})
    c = Checkpoint(ckpt)
    assert c.description.extras["n_mtp_layers"] == 1


def test_scale_bias_is_checked_on_a_bounded_sample(ckpt, monkeypatch):
    """The good checkpoint passes the scale_bias check; the weight rows read are SAMPLE_ROWS per sampled module."""
    reads = _Reads(monkeypatch)
    c = Checkpoint(ckpt)
    reads.assert_small()
    weight_reads = [(k, s) for k, s in reads.log if k.endswith(".weight")]
    w4 = [m for m, s in c.modules.items() if s.scheme == "W4A8_DYNAMIC"]
    assert len(weight_reads) == min(len(w4), values.SAMPLE_MODULES) and all(
        s[0] == values.SAMPLE_ROWS for _, s in weight_reads
    )


def test_missing_expert_in_layer_names_that_expert(pristine):
    """Asked for more experts than the checkpoint has, the layer names the first one missing."""
    c = Checkpoint(pristine)
    with pytest.raises(AscendFormatError) as info:
        QuantExperts(c, "layers.0.ffn.experts", 5, swiglu_limit=10.0)
    assert "layers.0.ffn.experts.4" in info.value.key, str(info.value)


def test_good_checkpoint_still_loads(pristine):
    c = Checkpoint(pristine)
    layer = QuantExperts(c, "layers.0.ffn.experts", 4, swiglu_limit=10.0)
    assert torch.isfinite(layer.s13).all()

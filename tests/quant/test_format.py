"""Description + safetensors headers: the good path, and every bad input raising AscendFormatError that
names the file and the tensor key, before any weight is placed; of the tensor data only scales and a
few packed W4A8 rows are read (safe_open is wrapped to record every read)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ds_plugins.quant.ascend import AscendFormatError, description
from ds_plugins.quant.ascend.loader import Checkpoint

from . import writer
from .fixtures import layer_checkpoint

DESC = "quant_model_description.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    layer_checkpoint(d)
    return d


@pytest.fixture
def ckpt(good, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(good, d)
    return d


class _Reads:
    """Records what validation reads through safetensors: (key, rows read or None for the whole tensor)."""

    def __init__(self, monkeypatch):
        import safetensors

        self.log: list[tuple[str, tuple]] = []
        real = safetensors.safe_open
        reads = self

        class Slice:
            def __init__(self, inner, key):
                self.inner, self.key = inner, key

            def __getitem__(self, idx):
                t = self.inner[idx]
                reads.log.append((self.key, tuple(t.shape)))
                return t

        class Handle:
            def __init__(self, *a, **k):
                self.inner = real(*a, **k)

            def get_tensor(self, key):
                t = self.inner.get_tensor(key)
                reads.log.append((key, tuple(t.shape)))
                return t

            def get_slice(self, key):
                return Slice(self.inner.get_slice(key), key)

        monkeypatch.setattr(safetensors, "safe_open", Handle)

    def assert_small(self):
        """Only scales (and offsets) whole, and W4A8 weights as a few packed rows: never a whole weight."""
        from ds_plugins.quant.ascend import values

        for key, shape in self.log:
            if key.endswith(".weight"):
                assert shape[0] <= values.SAMPLE_ROWS, (key, shape)
            else:
                assert key.rpartition(".")[2] in (
                    "weight_scale",
                    "input_scale",
                    "input_offset",
                    "deq_scale",
                    "scale_bias",
                ), key


def _refuse_tensor_reads(monkeypatch):
    """Validation reads only small tensors; returns the recorder (checked by assert_small)."""
    return _Reads(monkeypatch)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    reads = _Reads(monkeypatch)
    yield reads
    reads.assert_small()


def test_good_checkpoint_validates_from_headers(good, no_tensor_reads):
    c = Checkpoint(good)
    assert c.description.version == "1.0.0" and c.description.group_size == 0 and c.description.is_deepseek_native
    assert c.scheme_of("layers.0.attn.wq_a") == "W8A8_DYNAMIC"
    assert c.scheme_of("layers.0.attn.wo_a") == "W8A8"
    assert c.scheme_of("layers.0.ffn.experts.3.w2") == "W4A8_DYNAMIC"
    assert c.scheme_of("layers.0.attn.wo_b") == "FLOAT"
    spec = c.modules["layers.0.ffn.experts.0.w1"]
    assert (spec.out_features, spec.in_features) == (32, 64)  # packed [16, 64] holds 32 output channels
    assert c.tensors["layers.0.attn.wo_a.deq_scale"].dtype == "int64"
    assert len({t.file for t in c.tensors.values()}) == 2  # sharded, with an index


def _desc(d):
    return json.loads((d / DESC).read_text())


def _set_desc(d, data):
    (d / DESC).write_text(json.dumps(data))


def _rewrite_tensor(d, key, tensor):
    """Replace one tensor in whichever shard holds it."""
    from safetensors import safe_open

    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys = list(h.keys())
            if key not in keys:
                continue
            data = {k: h.get_tensor(k) for k in keys}
        data[key] = tensor
        save_file(data, str(f))
        return f
    raise KeyError(key)


def _drop_tensor(d, key):
    from safetensors import safe_open

    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys = list(h.keys())
            if key in keys:
                data = {k: h.get_tensor(k) for k in keys if k != key}
        if key in keys:
            save_file(data, str(f))
            idx = d / "quant_model_weights.safetensors.index.json"
            m = json.loads(idx.read_text())
            del m["weight_map"][key]
            idx.write_text(json.dumps(m))
            return f


def _listed_absent(d):
    data = _desc(d)
    data["layers.0.attn.wq_b.weight"] = "W8A8_DYNAMIC"
    _set_desc(d, data)
    return DESC, "layers.0.attn.wq_b.weight", "no safetensors file holds it"


def _present_unlisted(d):
    data = _desc(d)
    del data["layers.0.attn_norm.weight"]
    _set_desc(d, data)
    return ".safetensors", "layers.0.attn_norm.weight", "not listed"


def _missing_required(d):
    _drop_tensor(d, "layers.0.attn.wkv.weight_scale")
    data = _desc(d)
    del data["layers.0.attn.wkv.weight_scale"]
    _set_desc(d, data)
    return DESC, "layers.0.attn.wkv.weight_scale", "lacks its weight_scale"


def _mixed_fused(d):
    _rewrite_tensor(d, "layers.0.attn.wkv.weight", torch.randn(32, 64).to(torch.bfloat16))
    for suffix in ("weight_scale", "weight_offset"):
        _drop_tensor(d, f"layers.0.attn.wkv.{suffix}")
    data = _desc(d)
    for k in list(data):
        if k.startswith("layers.0.attn.wkv."):
            data[k] = "FLOAT"
    data = {
        k: v for k, v in data.items() if k in ("layers.0.attn.wkv.weight",) or not k.startswith("layers.0.attn.wkv.")
    }
    _set_desc(d, data)
    return DESC, "weight", "mixed quant types inside one fused module"


def _mixed_experts(d):
    data = _desc(d)
    w = writer.w8a8_dynamic(torch.randn(32, 64))
    for suffix in ("weight", "weight_scale", "weight_offset"):
        _rewrite_tensor(d, f"layers.0.ffn.experts.2.w1.{suffix}", w[suffix])
        data[f"layers.0.ffn.experts.2.w1.{suffix}"] = "W8A8_DYNAMIC"
    _drop_tensor(d, "layers.0.ffn.experts.2.w1.scale_bias")
    del data["layers.0.ffn.experts.2.w1.scale_bias"]
    _set_desc(d, data)
    return DESC, "layers.0.ffn.experts", "mix quant types"


def _type_mismatch_in_module(d):
    data = _desc(d)
    data["layers.0.attn.wq_a.weight_scale"] = "W8A8"
    _set_desc(d, data)
    return DESC, "layers.0.attn.wq_a.weight_scale", "differs from its module"


def _unknown_type(d):
    data = _desc(d)
    data["layers.0.attn.wkv.weight"] = "W3A7"
    _set_desc(d, data)
    return DESC, "layers.0.attn.wkv.weight", "unknown quant type 'W3A7'"


def _known_unsupported_type(d):
    data = _desc(d)
    data["layers.0.attn.wkv.weight"] = "W8A16"
    _set_desc(d, data)
    return DESC, "layers.0.attn.wkv.weight", "not implemented by ds-plugins"


def _wrong_weight_dtype(d):
    _rewrite_tensor(d, "layers.0.attn.wq_a.weight", torch.zeros(32, 64, dtype=torch.float16))
    return ".safetensors", "layers.0.attn.wq_a.weight", "must be int8, got float16"


def _wrong_scale_shape(d):
    _rewrite_tensor(d, "layers.0.attn.wq_a.weight_scale", torch.ones(31, 1))
    return ".safetensors", "layers.0.attn.wq_a.weight_scale", "must have shape [32, 1] or [32], got [31, 1]"


def _wrong_packed_shape(d):
    _rewrite_tensor(d, "layers.0.ffn.experts.1.w2.weight_scale", torch.ones(32, 1))  # packed [32, 32] -> out 64
    return ".safetensors", "layers.0.ffn.experts.1.w2.weight_scale", "got [32, 1]"


def _deq_scale_dtype(d):
    _rewrite_tensor(d, "layers.0.attn.wo_a.deq_scale", torch.ones(32, dtype=torch.float16))
    return ".safetensors", "layers.0.attn.wo_a.deq_scale", "must be float32 or int64"


def _per_group_w4a8(d):
    data = _desc(d)
    data["group_size"] = 256
    _set_desc(d, data)
    return DESC, "group_size", "per-group W4A8"


def _per_group_tensor(d):
    data = _desc(d)
    key = "layers.0.ffn.experts.0.w1.weight_scale_second"
    data[key] = "W4A8_DYNAMIC"
    _set_desc(d, data)
    save_file({key: torch.ones(32, 1)}, str(d / "extra.safetensors"))
    idx = d / "quant_model_weights.safetensors.index.json"
    m = json.loads(idx.read_text())
    m["weight_map"][key] = "extra.safetensors"
    idx.write_text(json.dumps(m))
    return ".safetensors", key, "per-group W4A8 tensors are not supported"


def _w4a8_linear(d):
    data = _desc(d)
    for k in list(data):
        if k.startswith("layers.0.attn.wq_a."):
            data[k] = "W4A8_DYNAMIC"
    _set_desc(d, data)
    return DESC, "layers.0.attn.wq_a", "MoE experts only"


def _kv_cache_quant(d):
    data = _desc(d)
    data["kv_cache_type"] = "C8"
    _set_desc(d, data)
    return DESC, "kv_cache_type", "not supported"


def _malformed_json(d):
    (d / DESC).write_text('{"layers.0.attn.wq_a.weight": "W8A8_DYNAMIC",')
    return DESC, None, "not valid JSON"


def _json_not_object(d):
    (d / DESC).write_text('["W8A8"]')
    return DESC, None, "expected a JSON object"


def _non_string_type(d):
    data = _desc(d)
    data["layers.0.attn.wq_a.weight"] = 8
    _set_desc(d, data)
    return DESC, "layers.0.attn.wq_a.weight", "must be a string"


def _missing_json(d):
    (d / DESC).unlink()
    return DESC, None, "not found"


def _index_disagrees(d):
    idx = d / "quant_model_weights.safetensors.index.json"
    m = json.loads(idx.read_text())
    key = "layers.0.attn.wkv.weight"
    files = sorted({v for v in m["weight_map"].values()})
    m["weight_map"][key] = next(f for f in files if f != m["weight_map"][key])
    idx.write_text(json.dumps(m))
    return "index.json", key, "index points to"


def _not_safetensors(d):
    (d / "broken.safetensors").write_bytes(b"abc")
    return "broken.safetensors", None, "not a safetensors file"


CASES = [
    _listed_absent,
    _present_unlisted,
    _missing_required,
    _mixed_fused,
    _mixed_experts,
    _type_mismatch_in_module,
    _unknown_type,
    _known_unsupported_type,
    _wrong_weight_dtype,
    _wrong_scale_shape,
    _wrong_packed_shape,
    _deq_scale_dtype,
    _per_group_w4a8,
    _per_group_tensor,
    _w4a8_linear,
    _kv_cache_quant,
    _malformed_json,
    _json_not_object,
    _non_string_type,
    _missing_json,
    _index_disagrees,
    _not_safetensors,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_is_a_clear_error_before_any_weight(case, ckpt, monkeypatch):
    file_part, key, problem = case(ckpt)
    reads = _refuse_tensor_reads(monkeypatch)
    with pytest.raises(AscendFormatError) as info:
        Checkpoint(ckpt)
    reads.assert_small()
    err = info.value
    assert file_part in err.file, (err.file, str(err))
    if key is not None:
        assert err.key is not None and key in err.key, str(err)
        assert repr(err.key) in str(err)
    assert problem in str(err), str(err)
    assert isinstance(err, ValueError)  # vLLM reports ValueErrors from config building as user errors


def test_description_globals_are_read():
    d = description.from_dict(
        {
            "version": "1.0.0",
            "model_quant_type": "W8A8_DYNAMIC",
            "group_size": 0,
            "metadata": {"quarot": True},
            "a.weight": "W8A8_DYNAMIC",
            "embed.weight": "FLOAT",
        }
    )
    assert d.model_quant_type == "W8A8_DYNAMIC" and d.extras["metadata"] == {"quarot": True}
    assert d.type_of("a.weight") == "W8A8_DYNAMIC" and d.type_of("nope") is None
    assert not d.is_deepseek_native

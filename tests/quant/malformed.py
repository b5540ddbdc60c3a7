"""Named malformed msModelSlim checkpoints (issue #17, items 1-4), each a function that damages a
copy of the fixture checkpoint (fixtures.layer_checkpoint) in one way and returns what the error
must say: (a part of the file name, a part of the key ("" where any tensor key will do, None for
a whole-file error), a part of the message). Shared by test_malformed.py (one test each) and
test_fuzz.py (the same oracle).

The damage is done at the byte level (safetensors headers rewritten by hand) where the case is one
that safetensors' own writer cannot produce.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import writer

DESC = "quant_model_description.json"
INDEX = "quant_model_weights.safetensors.index.json"


# --- helpers --------------------------------------------------------------------------------------
def desc(d: Path) -> dict:
    return json.loads((d / DESC).read_text())


def set_desc(d: Path, data: dict) -> None:
    (d / DESC).write_text(json.dumps(data))


def shard_of(d: Path, key: str) -> Path:
    return d / json.loads((d / INDEX).read_text())["weight_map"][key]


def read_raw(file: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(file: Path, header, data: bytes) -> None:
    h = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(h)) + h + data)


def edit_entry(d: Path, key: str, fn) -> Path:
    """Rewrite one header entry in place: fn(entry) -> new entry (data untouched)."""
    f = shard_of(d, key)
    header, data = read_raw(f)
    header[key] = fn(dict(header[key]))
    write_raw(f, header, data)
    return f


def rewrite_tensors(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace tensors (same keys) in whichever shard holds each."""
    by_file: dict[Path, dict] = {}
    for key, t in tensors.items():
        by_file.setdefault(shard_of(d, key), {})[key] = t
    for f, new in by_file.items():
        with safe_open(str(f), "pt") as h:
            data = {k: h.get_tensor(k) for k in h.keys()}
        data.update({k: t.contiguous() for k, t in new.items()})
        save_file(data, str(f))


def add_tensors(d: Path, tensors: dict[str, torch.Tensor], qtype: str, file: str = "extra.safetensors") -> None:
    """New tensors in a new shard, listed in the description and the index."""
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(d / file))
    idx = json.loads((d / INDEX).read_text())
    idx["weight_map"].update({k: file for k in tensors})
    (d / INDEX).write_text(json.dumps(idx))
    data = desc(d)
    data.update({k: qtype for k in tensors})
    set_desc(d, data)


def drop_tensors(d: Path, keys) -> None:
    """Remove tensors from their shards, the index and the description."""
    keys = set(keys)
    idx = json.loads((d / INDEX).read_text())
    for f in {shard_of(d, k) for k in keys}:
        with safe_open(str(f), "pt") as h:
            data = {k: h.get_tensor(k) for k in h.keys() if k not in keys}
        save_file(data, str(f))
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k not in keys}
    (d / INDEX).write_text(json.dumps(idx))
    set_desc(d, {k: v for k, v in desc(d).items() if k not in keys})


def set_config(d: Path, **values) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(values)
    (d / "config.json").write_text(json.dumps(cfg))


def module_keys(d: Path, module: str) -> list[str]:
    return [k for k in desc(d) if k.startswith(module + ".")]


# --- item 1: tracebacks instead of a clear error --------------------------------------------------
def header_is_a_json_list(d):
    f = shard_of(d, "layers.0.attn_norm.weight")
    header, data = read_raw(f)
    write_raw(f, [header], data)
    return f.name, None, "expected a JSON object, got a JSON list"


def entry_without_shape(d):
    key = "layers.0.attn.wkv.weight"
    f = edit_entry(d, key, lambda e: {k: v for k, v in e.items() if k != "shape"})
    return f.name, key, "no 'shape'"


def entry_is_a_number(d):
    key = "layers.0.attn_norm.weight"
    f = edit_entry(d, key, lambda e: 7)
    return f.name, key, "expected an object with dtype, shape and data_offsets"


def string_dimension(d):
    key = "layers.0.attn.wq_a.weight_scale"
    f = edit_entry(d, key, lambda e: {**e, "shape": [str(e["shape"][0]), e["shape"][1]]})
    return f.name, key, "shape must be a list of non-negative integers"


def unknown_dtype(d):
    key = "layers.0.attn_norm.weight"
    f = edit_entry(d, key, lambda e: {**e, "dtype": "F7"})
    return f.name, key, "dtype 'F7' is not one of"


def down_input_differs_from_gate_output(d):
    """Every expert's w2 takes 48 inputs while w1/w3 give 32: each module is self-consistent."""
    g = torch.Generator().manual_seed(5)
    new = {}
    for e in range(4):
        w2 = writer.w4a8_dynamic(torch.randn(64, 48, generator=g), "down")
        new.update({f"layers.0.ffn.experts.{e}.w2.{s}": t for s, t in w2.items() if not s.startswith("_")})
    rewrite_tensors(d, new)
    key = "layers.0.ffn.experts.0.w2.weight"
    return shard_of(d, key).name, key, "the down part must be [64, 32]"


def one_expert_of_another_shape(d):
    """Expert 3's gate and up give 48 outputs, the others' 32 (torch.stack would fail at load)."""
    g = torch.Generator().manual_seed(6)
    new = {}
    for proj, shape, kind in (("w1", (48, 64), "gate"), ("w3", (48, 64), "up"), ("w2", (64, 48), "down")):
        parts = writer.w4a8_dynamic(torch.randn(*shape, generator=g), kind)
        new.update({f"layers.0.ffn.experts.3.{proj}.{s}": t for s, t in parts.items() if not s.startswith("_")})
    rewrite_tensors(d, new)
    key = "layers.0.ffn.experts.3.w1.weight"
    return shard_of(d, key).name, key, "differs from expert 0's [32, 64]"


def fused_inputs_differ(d):
    """wq_a and wkv (one fused layer in vLLM) read inputs of different sizes."""
    parts = writer.w8a8_dynamic(torch.randn(32, 48))
    rewrite_tensors(d, {f"layers.0.attn.wkv.{s}": t for s, t in parts.items()})
    key = "layers.0.attn.wkv.weight"
    return shard_of(d, key).name, key, "input size 48 differs"


# --- item 2: caught only at weight load ----------------------------------------------------------
def truncated_data(d):
    f = shard_of(d, "layers.0.attn.wq_a.weight")
    raw = f.read_bytes()
    f.write_bytes(raw[:-100])
    return f.name, "", "reach past the end of the file's"


def offsets_past_the_end(d):
    key = "layers.0.attn.wq_a.weight"
    f = shard_of(d, key)
    header, data = read_raw(f)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    b, e = header[last]["data_offsets"]
    header[last]["data_offsets"] = [b + 64, e + 64]
    write_raw(f, header, data)
    return f.name, last, "reach past the end"


def overlapping_offsets(d):
    key = "layers.0.attn.wq_a.weight_scale"
    f = shard_of(d, key)
    header, data = read_raw(f)
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (b1, e1), k1 = spans[1]
    header[k1]["data_offsets"] = [b1 - 4, e1 - 4]  # starts inside the tensor before it
    write_raw(f, header, data)
    return f.name, k1, "overlaps the tensor before it"


def header_over_safetensors_limit(d):
    """A valid header of 100,000,016 bytes: over safetensors' 100,000,000, under the old 100 MiB."""
    f = shard_of(d, "layers.0.attn.wq_a.weight")
    header, data = read_raw(f)
    h = json.dumps(header).encode()
    h += b" " * (100_000_016 - len(h))
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return f.name, None, "exceeds safetensors' limit of 100,000,000 bytes"


# --- item 3: silently accepted --------------------------------------------------------------------
def _scale(d, key, fn):
    with safe_open(str(shard_of(d, key)), "pt") as h:
        t = h.get_tensor(key)
    rewrite_tensors(d, {key: fn(t.clone())})
    return shard_of(d, key).name, key


def _set_first(v):
    def fn(t):
        t.view(-1)[0] = v
        return t

    return fn


def nan_weight_scale(d):
    return (*_scale(d, "layers.0.attn.wq_a.weight_scale", _set_first(float("nan"))), "NaN or infinite")


def nan_expert_scale(d):
    return (*_scale(d, "layers.0.ffn.experts.2.w2.weight_scale", _set_first(float("nan"))), "NaN or infinite")


def zero_weight_scale(d):
    return (*_scale(d, "layers.0.attn.wkv.weight_scale", _set_first(0.0)), "not positive")


def negative_weight_scale(d):
    return (*_scale(d, "layers.0.ffn.experts.1.w1.weight_scale", _set_first(-0.01)), "not positive")


def zero_input_scale(d):
    return (*_scale(d, "layers.0.attn.wo_a.input_scale", _set_first(0.0)), "not positive")


def inf_input_scale(d):
    return (*_scale(d, "layers.0.attn.wo_a.input_scale", _set_first(float("inf"))), "NaN or infinite")


def nan_deq_scale(d):
    """The int64 form: the fp32 bit pattern of NaN."""
    nan_bits = int(np.array([np.nan], dtype=np.float32).view(np.uint32)[0])
    return (*_scale(d, "layers.0.attn.wo_a.deq_scale", _set_first(nan_bits)), "NaN or infinite")


def nibbles_swapped(d):
    """Expert 1's w1 packed high nibble first; its scale_bias is that of the true weights."""
    key = "layers.0.ffn.experts.1.w1.weight"
    with safe_open(str(shard_of(d, key)), "pt") as h:
        p = h.get_tensor(key)
    b = p.numpy().view(np.uint8)
    swapped = ((b << 4) | (b >> 4)).astype(np.uint8).view(np.int8)
    rewrite_tensors(d, {key: torch.from_numpy(swapped.copy())})
    return shard_of(d, key).name, key, "nibbles swapped?"


def int8_labelled_float(d):
    key = "layers.0.attn_norm.weight"
    rewrite_tensors(d, {key: torch.ones(64, dtype=torch.int8)})
    return shard_of(d, key).name, key, "FLOAT tensors must be float32 or bfloat16 or float16, got int8"


def float16_in_a_bfloat16_model(d):
    key = "layers.0.attn.wo_b.weight"
    with safe_open(str(shard_of(d, key)), "pt") as h:
        t = h.get_tensor(key)
    rewrite_tensors(d, {key: t.view(torch.float16)})  # the same bytes, read as float16
    return shard_of(d, key).name, key, "float16 tensor in a bfloat16 model"


def layer_that_does_not_exist(d):
    add_tensors(d, {"layers.5.attn_norm.weight": torch.ones(64)}, "FLOAT")
    return DESC, "layers.5.attn_norm.weight", "layer 5 does not exist"


def expert_that_does_not_exist(d):
    set_config(d, n_routed_experts=4)
    parts = writer.w4a8_dynamic(torch.randn(32, 64), "gate")
    add_tensors(
        d, {f"layers.0.ffn.experts.4.w1.{s}": t for s, t in parts.items() if not s.startswith("_")}, "W4A8_DYNAMIC"
    )
    return DESC, "layers.0.ffn.experts.4.w1", "expert 4 does not exist"


def layer_without_tensors(d):
    set_config(d, num_hidden_layers=2)
    return DESC, "layers.1", "no tensor belongs to layer 1"


def experts_fewer_than_config(d):
    set_config(d, n_routed_experts=6)
    return DESC, "layers.0.ffn.experts.4.w1", "routed expert 4"


def index_omits_a_key(d):
    idx = json.loads((d / INDEX).read_text())
    del idx["weight_map"]["layers.0.attn.wkv.weight_scale"]
    (d / INDEX).write_text(json.dumps(idx))
    return INDEX, "layers.0.attn.wkv.weight_scale", "the index does not list it"


# --- item 4: misleading messages ------------------------------------------------------------------
def unknown_global_key(d):
    set_desc(d, {**desc(d), "quant_recipe": {"name": "custom"}})
    return DESC, "quant_recipe", "unknown global key"


def bad_n_mtp_layers(d):
    set_desc(d, {**desc(d), "n_mtp_layers": "one"})
    return DESC, "n_mtp_layers", "must be a non-negative integer"


def mtp_layer_beyond_n_mtp_layers(d):
    set_desc(d, {**desc(d), "n_mtp_layers": 1})
    set_config(d, num_nextn_predict_layers=2)
    add_tensors(d, {"mtp.1.enorm.weight": torch.ones(64)}, "FLOAT")
    return DESC, "mtp.1.enorm.weight", "n_mtp_layers=1"


def weight_packed(d):
    """A compressed-tensors name where msModelSlim writes `weight`."""
    old = "layers.0.attn.wq_a.weight"
    f = shard_of(d, old)
    header, data = read_raw(f)
    header["layers.0.attn.wq_a.weight_packed"] = header.pop(old)
    write_raw(f, header, data)
    idx = json.loads((d / INDEX).read_text())
    idx["weight_map"]["layers.0.attn.wq_a.weight_packed"] = idx["weight_map"].pop(old)
    (d / INDEX).write_text(json.dumps(idx))
    data_ = desc(d)
    data_["layers.0.attn.wq_a.weight_packed"] = data_.pop(old)
    set_desc(d, data_)
    return DESC, "layers.0.attn.wq_a.weight", "compressed-tensors"


def non_ascii_suffix(d):
    old, new = "layers.0.attn.wkv.weight", "layers.0.attn.wkv.w\u0435ight"  # Cyrillic e
    f = shard_of(d, old)
    header, data = read_raw(f)
    header[new] = header.pop(old)
    write_raw(f, header, data)
    idx = json.loads((d / INDEX).read_text())
    idx["weight_map"][new] = idx["weight_map"].pop(old)
    (d / INDEX).write_text(json.dumps(idx))
    data_ = desc(d)
    data_[new] = data_.pop(old)
    set_desc(d, data_)
    return DESC, "layers.0.attn.wkv.w", "non-ASCII"


def missing_routed_expert(d):
    drop_tensors(
        d, [k for e in (2,) for p in ("w1", "w3", "w2") for k in module_keys(d, f"layers.0.ffn.experts.{e}.{p}")]
    )
    return DESC, "layers.0.ffn.experts.2.w1", "routed expert 2"


def missing_expert_part(d):
    drop_tensors(d, module_keys(d, "layers.0.ffn.experts.1.w3"))
    return DESC, "layers.0.ffn.experts.1.w3", "has no w3 tensors"


CASES = [
    header_is_a_json_list,
    entry_without_shape,
    entry_is_a_number,
    string_dimension,
    unknown_dtype,
    down_input_differs_from_gate_output,
    one_expert_of_another_shape,
    fused_inputs_differ,
    truncated_data,
    offsets_past_the_end,
    overlapping_offsets,
    header_over_safetensors_limit,
    nan_weight_scale,
    nan_expert_scale,
    zero_weight_scale,
    negative_weight_scale,
    zero_input_scale,
    inf_input_scale,
    nan_deq_scale,
    nibbles_swapped,
    int8_labelled_float,
    float16_in_a_bfloat16_model,
    layer_that_does_not_exist,
    expert_that_does_not_exist,
    layer_without_tensors,
    experts_fewer_than_config,
    index_omits_a_key,
    unknown_global_key,
    bad_n_mtp_layers,
    mtp_layer_beyond_n_mtp_layers,
    weight_packed,
    non_ascii_suffix,
    missing_routed_expert,
    missing_expert_part,
]

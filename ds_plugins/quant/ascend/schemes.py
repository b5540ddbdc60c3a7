"""Which tensors each scheme stores, with their dtypes and shapes (research §1.5-1.8, §2).

`validate` turns a description plus the safetensors headers into one `ModuleSpec` per quantized
module, or raises `AscendFormatError` naming the file and key. Nothing here touches tensor data;
the checks across modules (experts, fused layers, the model's layers) are in structure.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .checkpoint import TensorInfo
from .description import Description
from . import structure
from .errors import AscendFormatError
from .layout import Layout

FLOATS = ("float32", "bfloat16", "float16")
# FLOAT tensors that are integer by nature: DeepSeek-V4's hash-routing table (token id -> expert ids).
INTEGER_FLOAT_SUFFIXES = ("tid2eid",)
# Tensor names of other quantization formats, for the hint when one turns up in a msModelSlim checkpoint.
FOREIGN_SUFFIXES = {
    "weight_packed": "compressed-tensors (LLM Compressor)",
    "weight_shape": "compressed-tensors",
    "weight_zero_point": "compressed-tensors",
    "weight_global_scale": "compressed-tensors",
    "qweight": "GPTQ/AWQ",
    "qzeros": "GPTQ/AWQ",
    "scales": "GPTQ/AWQ",
    "g_idx": "GPTQ",
    "weight_scale_inv": "DeepSeek FP8",
    "scale": "DeepSeek FP8",
}
# Per-expert tensors: `...experts.<E>.<w1|w2|w3|gate_proj|up_proj|down_proj>`.
EXPERT_RE = re.compile(r"^(?P<moe>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)$")
GATE_UP = ("w1", "w3", "gate_proj", "up_proj")

# Checkpoint modules that an engine runs as one fused layer, so they must share a scheme.
# (DeepSeek-native names, and the HF names other msModelSlim checkpoints use.)
DEFAULT_FUSED = {
    "fused_wqa_wkv": ("wq_a", "wkv"),
    "fused_wkv_wgate": ("wkv", "wgate"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "shared_gate_up": ("w1", "w3"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
}


@dataclass(frozen=True)
class ModuleSpec:
    name: str  # checkpoint module name, e.g. "layers.3.ffn.experts.7.w1"
    scheme: str  # FLOAT | W8A8 | W8A8_DYNAMIC | W4A8_DYNAMIC
    tensors: Mapping[str, TensorInfo]  # suffix ("weight", "weight_scale", ...) -> header info

    @property
    def is_expert(self) -> bool:
        return EXPERT_RE.match(self.name) is not None

    @property
    def out_features(self) -> int:
        w = self.tensors["weight"].shape
        return w[0] * 2 if self.scheme == "W4A8_DYNAMIC" else w[0]

    @property
    def in_features(self) -> int:
        return self.tensors["weight"].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# suffix -> (allowed dtypes, shape rule(out, in) -> allowed shapes, required)
def _rules(scheme: str):
    col = lambda o, i: {(o, 1), (o,)}  # noqa: E731  per-output-channel
    one = lambda o, i: {(1,), ()}  # noqa: E731
    vec = lambda o, i: {(o,)}  # noqa: E731
    if scheme == "W8A8_DYNAMIC":
        return {
            "weight": (("int8",), lambda o, i: {(o, i)}, True),
            "weight_scale": (FLOATS, col, True),
            "weight_offset": (FLOATS, col, False),
            "bias": (FLOATS, vec, False),
        }
    if scheme == "W8A8":
        return {
            "weight": (("int8",), lambda o, i: {(o, i)}, True),
            "input_scale": (FLOATS, one, True),
            "input_offset": (FLOATS + ("int8",), one, True),
            "deq_scale": (("float32", "int64"), vec, True),
            "quant_bias": (("int32",), vec, True),
            "weight_scale": (FLOATS, col, False),
            "weight_offset": (FLOATS, col, False),
            "bias": (FLOATS, vec, False),
        }
    if scheme == "W4A8_DYNAMIC":  # weight: two int4 per int8 along the output dim
        return {
            "weight": (("int8",), lambda o, i: {(o // 2, i)}, True),
            "weight_scale": (("float32",), col, True),
            "weight_offset": (FLOATS, col, False),
            "scale_bias": (("float32",), lambda o, i: {(o, 1), (o, 16), (o,)}, False),
        }
    raise AssertionError(scheme)


def _split(key: str) -> tuple[str, str]:
    module, _, suffix = key.rpartition(".")
    return module, suffix


def _suffix_hint(suffix: str) -> str:
    if not suffix.isascii():
        return f"; the name {suffix!r} has non-ASCII characters (a mangled 'weight...'?)"
    if suffix in FOREIGN_SUFFIXES:
        return f"; `{suffix}` is a {FOREIGN_SUFFIXES[suffix]} tensor name, not msModelSlim's"
    return ""


def validate(
    desc: Description,
    tensors: Mapping[str, TensorInfo],
    fused: Mapping[str, Iterable[str]] = DEFAULT_FUSED,
    layout: Layout | None = None,
) -> dict[str, ModuleSpec]:
    """Check the description against the checkpoint headers (and, given the model's layout from
    config.json, against the model); return the quantized modules."""
    for key, info in tensors.items():
        if key not in desc.types:
            raise AscendFormatError(info.file, key, f"tensor is in the checkpoint but not listed in {desc.path}")
    for key in desc.types:
        if key not in tensors:
            raise AscendFormatError(desc.path, key, "listed in the description but no safetensors file holds it")
    _check_float_types(desc, tensors)

    by_module: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        module, suffix = _split(key)
        by_module.setdefault(module, {})[suffix] = info

    specs: dict[str, ModuleSpec] = {}
    for module, parts in by_module.items():
        weight_key = f"{module}.weight" if module else "weight"
        if "weight" not in parts:
            quantized = sorted((i.key, s) for s, i in parts.items() if desc.types[i.key] != "FLOAT")
            if quantized:
                # name the tensor that stands where `weight` should, if one looks like it
                key, suffix = next(((k, s) for k, s in quantized if _suffix_hint(s)), quantized[0])
                raise AscendFormatError(
                    desc.path,
                    key,
                    f"a {desc.types[key]} tensor, but its module has no {weight_key} tensor{_suffix_hint(suffix)}",
                )
            continue
        scheme = desc.types[weight_key]
        for suffix, info in parts.items():
            t = desc.types[info.key]
            if t != scheme and not (suffix == "bias" and t == "FLOAT"):
                raise AscendFormatError(
                    desc.path,
                    info.key,
                    f"quant type {t} differs from its module's {weight_key} ({scheme}){_suffix_hint(suffix)}",
                )
        if scheme == "FLOAT":
            continue
        _check_module(module, scheme, parts, desc)
        specs[module] = ModuleSpec(module, scheme, dict(parts))
    _check_fused(desc, by_module, specs, fused)
    _check_half_dtypes(tensors, layout)
    structure.check(desc, by_module, specs, fused, layout)
    return specs


def _check_float_types(desc: Description, tensors: Mapping[str, TensorInfo]) -> None:
    """FLOAT tensors are floats (the hash-routing table aside)."""
    for key, info in tensors.items():
        if desc.types[key] != "FLOAT" or info.dtype in FLOATS:
            continue
        if key.rpartition(".")[2] in INTEGER_FLOAT_SUFFIXES and info.dtype in ("int32", "int64"):
            continue
        hint = (
            " (a quantized weight labelled FLOAT? give it its quant type)"
            if info.dtype in ("int8", "uint8")
            else " (FP8 tensors are not a msModelSlim type)"
            if info.dtype.startswith("float8")
            else ""
        )
        raise AscendFormatError(info.file, key, f"FLOAT tensors must be {' or '.join(FLOATS)}, got {info.dtype}{hint}")


def _check_half_dtypes(tensors: Mapping[str, TensorInfo], layout: Layout | None) -> None:
    """Every 16-bit float tensor is in the model's one 16-bit dtype: a bfloat16 tensor read as float16
    (or the reverse) loads without an error as wrong numbers, so the two never mix in one checkpoint."""
    halves: dict[str, list[TensorInfo]] = {}
    for _, info in sorted(tensors.items()):
        if info.dtype in ("bfloat16", "float16"):
            halves.setdefault(info.dtype, []).append(info)
    want = layout.dtype if layout is not None and layout.dtype else None
    if want is None and len(halves) > 1:  # no model dtype given: the commoner one
        want = max(halves, key=lambda d: (len(halves[d]), d))
    for dtype, infos in halves.items():
        if want is not None and dtype != want:
            source = (
                f"{layout.file} torch_dtype"
                if layout is not None and layout.dtype
                else "the checkpoint's other tensors"
            )
            raise AscendFormatError(
                infos[0].file,
                infos[0].key,
                f"{dtype} tensor in a {want} model ({source}); "
                "16-bit tensors must all be in the model dtype (float32 is always accepted)",
            )


def _check_module(module: str, scheme: str, parts: Mapping[str, TensorInfo], desc: Description) -> None:
    weight = parts["weight"]
    if len(weight.shape) != 2:
        raise AscendFormatError(
            weight.file, weight.key, f"{scheme} weight must be 2-D [out, in], got {list(weight.shape)}"
        )
    if scheme == "W4A8_DYNAMIC" and not EXPERT_RE.match(module):
        raise AscendFormatError(
            desc.path,
            weight.key,
            "W4A8_DYNAMIC is defined for MoE experts only (`...experts.<E>.<proj>`), as in vllm-ascend",
        )
    out = weight.shape[0] * (2 if scheme == "W4A8_DYNAMIC" else 1)
    inp = weight.shape[1]
    rules = _rules(scheme)
    for suffix, info in parts.items():
        rule = rules.get(suffix)
        if rule is None:
            if suffix in ("weight_scale_second", "weight_offset_second"):
                raise AscendFormatError(
                    info.file, info.key, "per-group W4A8 tensors are not supported (only per-channel W4A8_DYNAMIC)"
                )
            raise AscendFormatError(
                info.file, info.key, f"unexpected tensor for a {scheme} module{_suffix_hint(suffix)}"
            )
        dtypes, shapes, _ = rule
        if info.dtype not in dtypes:
            raise AscendFormatError(
                info.file, info.key, f"{scheme} {suffix} must be {' or '.join(dtypes)}, got {info.dtype}"
            )
        allowed = shapes(out, inp)
        if info.shape not in allowed:
            want = " or ".join(str(list(s)) for s in sorted(allowed, key=len, reverse=True))
            raise AscendFormatError(
                info.file, info.key, f"{scheme} {suffix} must have shape {want}, got {list(info.shape)}"
            )
    for suffix, (_, _, required) in rules.items():
        if required and suffix not in parts:
            raise AscendFormatError(
                desc.path, f"{module}.{suffix}", f"{scheme} module {module} lacks its {suffix} tensor"
            )


def _check_fused(desc: Description, by_module, specs, fused) -> None:
    def scheme_of(module: str) -> str:
        return specs[module].scheme if module in specs else "FLOAT"

    # Experts of one MoE layer are one fused layer in every engine.
    moes: dict[str, dict[str, str]] = {}
    for module in by_module:
        m = EXPERT_RE.match(module)
        if m:
            moes.setdefault(m["moe"], {})[module] = scheme_of(module)
    for moe, members in moes.items():
        if len(set(members.values())) > 1:
            first = sorted(members)[0]
            other = next(k for k in sorted(members) if members[k] != members[first])
            raise AscendFormatError(
                desc.path,
                f"{other}.weight",
                f"experts of {moe} mix quant types "
                f"({first}: {members[first]}, {other}: {members[other]}); "
                "one fused MoE layer needs one",
            )
    for shards in fused.values():
        shards = tuple(shards)
        parents = {m.rpartition(".")[0] for m in by_module if m.rpartition(".")[2] == shards[0]}
        for parent in parents:
            names = [f"{parent}.{s}" if parent else s for s in shards]
            present = [n for n in names if n in by_module]
            kinds = {n: scheme_of(n) for n in present}
            if len(set(kinds.values())) > 1:
                a, b = present[0], next(n for n in present if kinds[n] != kinds[present[0]])
                raise AscendFormatError(
                    desc.path,
                    f"{b}.weight",
                    f"mixed quant types inside one fused module ({a}: {kinds[a]}, {b}: {kinds[b]})",
                )

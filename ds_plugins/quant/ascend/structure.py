"""Checks across modules, from the headers: the experts of each MoE layer (all of them there, each
with gate, up and down, one shape), the parts of each MLP and fused layer (shapes that chain), and,
given the model's layout (config.json), tensors for layers or experts the model does not have and
layers of the model with no tensors. An engine would otherwise fail inside torch (a `torch.stack`
of unequal experts), skip tensors it has no parameter for, or run with parameters never loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .checkpoint import TensorInfo
from .description import Description
from .errors import AscendFormatError
from .layout import Layout

# (gate, up, down) of one gated MLP, in DeepSeek's and in HF's names.
MLP_PARTS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
_EXPERT = re.compile(r"^(?P<moe>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_MTP = re.compile(r"^mtp\.(\d+)\.")


def _dims(module: str, parts: Mapping[str, TensorInfo], specs) -> tuple[int, int] | None:
    """(out, in) of a module's logical weight: int4-packed rows count twice."""
    if module in specs:
        return specs[module].out_features, specs[module].in_features
    w = parts.get("weight")
    return (w.shape[0], w.shape[1]) if w is not None and len(w.shape) == 2 else None


def check(
    desc: Description,
    by_module: Mapping[str, Mapping[str, TensorInfo]],
    specs,
    fused: Mapping[str, Iterable[str]],
    layout: Layout | None,
) -> None:
    _check_mlps(by_module, specs)
    _check_experts(desc, by_module, specs, layout)
    _check_fused_inputs(by_module, specs, fused)
    if layout is not None:
        _check_layers(desc, by_module, layout)


def check_keys(desc: Description, layout: Layout) -> None:
    """The layer checks of `check` from the description's keys alone (no safetensors header needed)."""
    by_module: dict[str, dict[str, None]] = {}
    for key in desc.types:
        module, _, suffix = key.rpartition(".")
        by_module.setdefault(module, {})[suffix] = None
    _check_layers(desc, by_module, layout)


def _weight(by_module, module: str) -> TensorInfo:
    return by_module[module]["weight"]


def _check_mlps(by_module, specs) -> None:
    """gate and up: the same [I, H]; down: [H, I]."""
    for names in MLP_PARTS:
        for gate in [m for m in by_module if m.rpartition(".")[2] == names[0]]:
            parent = gate.rpartition(".")[0]
            g, u, d = (f"{parent}.{n}" if parent else n for n in names)
            if not (u in by_module and d in by_module):
                continue
            dg, du, dd = (_dims(m, by_module[m], specs) for m in (g, u, d))
            if dg is None or du is None or dd is None:
                continue
            if du != dg:
                raise AscendFormatError(
                    _weight(by_module, u).file,
                    f"{u}.weight",
                    f"[out, in] {list(du)} differs from {g}'s {list(dg)}; the gate and up parts of one MLP must match",
                )
            if dd != (dg[1], dg[0]):
                raise AscendFormatError(
                    _weight(by_module, d).file,
                    f"{d}.weight",
                    f"[out, in] {list(dd)}, but {g} is {list(dg)}: the down part must be [{dg[1]}, {dg[0]}] "
                    "(its input is the gate/up output)",
                )


def _check_experts(desc: Description, by_module, specs, layout: Layout | None) -> None:
    moes: dict[str, dict[int, dict[str, str]]] = {}
    for module in by_module:
        m = _EXPERT.match(module)
        if m:
            moes.setdefault(m["moe"], {}).setdefault(int(m["expert"]), {})[m["proj"]] = module
    for moe, experts in sorted(moes.items()):
        projs = {p for members in experts.values() for p in members}
        family = next((f for f in MLP_PARTS if projs <= set(f)), None)
        if family is None:
            odd = sorted(projs - set(MLP_PARTS[0]) if projs & set(MLP_PARTS[0]) else projs - set(MLP_PARTS[1]))
            e = min(e for e, members in experts.items() if odd[0] in members)
            raise AscendFormatError(
                desc.path,
                f"{experts[e][odd[0]]}.weight",
                f"routed experts of {moe} are named "
                f"{sorted(projs)}; expected one of {' / '.join('+'.join(f) for f in MLP_PARTS)}",
            )
        count = layout.num_experts if layout is not None and layout.num_experts else max(experts) + 1
        source = f"{layout.file} has {count} routed experts" if layout is not None and layout.num_experts else None
        for e in sorted(experts):
            if e >= count:
                module = next(iter(experts[e].values()))
                raise AscendFormatError(desc.path, f"{module}.weight", f"expert {e} does not exist: {source}")
        for e in range(count):
            for proj in family:
                if proj not in experts.get(e, {}):
                    raise AscendFormatError(
                        desc.path,
                        f"{moe}.{e}.{proj}.weight",
                        f"routed expert {e} of {moe} has "
                        f"no {proj} tensors (" + (source or f"experts 0-{count - 1} are present") + ")",
                    )
        first = {p: _dims(experts[0][p], by_module[experts[0][p]], specs) for p in family}
        for e in range(1, count):
            for p in family:
                module = experts[e][p]
                dims = _dims(module, by_module[module], specs)
                if dims != first[p]:
                    raise AscendFormatError(
                        _weight(by_module, module).file,
                        f"{module}.weight",
                        f"[out, in] {list(dims or ())} differs from expert 0's "
                        f"{list(first[p] or ())}; the experts of one MoE layer are one tensor",
                    )


def _check_fused_inputs(by_module, specs, fused) -> None:
    """Layers an engine runs fused read one input: their parts share the input size."""
    for shards in fused.values():
        shards = tuple(shards)
        for head in [m for m in by_module if m.rpartition(".")[2] == shards[0]]:
            parent = head.rpartition(".")[0]
            present = [n for n in (f"{parent}.{s}" if parent else s for s in shards) if n in by_module]
            dims: dict[str, tuple[int, int] | None] | dict[str, tuple[int, int]]
            dims = {n: _dims(n, by_module[n], specs) for n in present}
            dims = {n: d for n, d in dims.items() if d is not None}
            if not dims:
                continue
            ref = next(iter(dims))
            for n, d in dims.items():
                if d[1] != dims[ref][1]:
                    raise AscendFormatError(
                        _weight(by_module, n).file,
                        f"{n}.weight",
                        f"input size {d[1]} differs "
                        f"from {ref}'s {dims[ref][1]}; an engine runs them as one fused layer",
                    )


def _check_layers(desc: Description, by_module, layout: Layout) -> None:
    """Tensors of layers beyond config.json's counts; decoder layers with no tensor at all."""
    L = layout.num_hidden_layers
    native_mtp = any(_MTP.match(m + ".") for m in by_module)
    n_mtp = layout.num_mtp_layers
    seen: set[int] = set()
    for module in sorted(by_module):
        key = f"{module}.{next(iter(by_module[module]))}"
        m = _LAYER.match(module + ".")
        if m and L is not None:
            i = int(m[1])
            seen.add(i)
            # DeepSeek's own names keep MTP layers apart (`mtp.<i>`); HF names number them after the decoder.
            limit = L if native_mtp or desc.is_deepseek_native else L + n_mtp
            if i >= limit:
                extra = "" if limit == L else f" + num_nextn_predict_layers={n_mtp}"
                raise AscendFormatError(
                    desc.path, key, f"layer {i} does not exist: {layout.file} has num_hidden_layers={L}{extra}"
                )
        m = _MTP.match(module + ".")
        if m:
            i = int(m[1])
            n_desc = desc.extras.get("n_mtp_layers")
            if n_desc is not None and i >= n_desc:
                raise AscendFormatError(
                    desc.path, key, f"MTP layer {i} does not exist: the description has n_mtp_layers={n_desc}"
                )
            if i >= n_mtp:
                raise AscendFormatError(
                    desc.path, key, f"MTP layer {i} does not exist: {layout.file} has num_nextn_predict_layers={n_mtp}"
                )
    if L is not None and seen:
        missing = sorted(set(range(L)) - seen)
        if missing:
            raise AscendFormatError(
                desc.path,
                f"layers.{missing[0]}",
                f"no tensor belongs to layer {missing[0]} "
                f"({layout.file} has num_hidden_layers={L}); the checkpoint is incomplete",
            )

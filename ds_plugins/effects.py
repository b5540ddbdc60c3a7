"""The decision table: what each decision value does to the engine, and what in this build carries it.

One table, from which the start-up line, `ds-plugins doctor` (its verdict and its "not in this build
yet" list) and the policy's `Decision.active` are all derived:

- `changes`: ds-plugins alters what the engine does (a forced gate, a kernel route, the model hook-up);
- `offers`: ds-plugins adds something the user opts into by naming it (`--quantization ascend`, a KV
  connector module); the engine runs as shipped until then;
- `none`: the engine is left as shipped for this feature.

A value that changes or offers something must be carried by this build for the engine version: by a
declared patch whose `implements` names the value, or by an adapter feature with no runtime patch
(`adapter_carriers()` of ds_plugins.vllm / ds_plugins.sglang). Otherwise it is "not in this build yet",
and the engine keeps its own behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

NONE, CHANGES, OFFERS = "none", "changes", "offers"


class Effect(NamedTuple):
    kind: str  # NONE | CHANGES | OFFERS
    meaning: str  # one line, for doctor


def _none(meaning: str) -> Effect:
    return Effect(NONE, meaning)


_UPSTREAM = _none("the engine as shipped")

TABLE: dict[str, dict[str, Effect]] = {
    "deepgemm": {
        "upstream": _none("the engine's own DeepGEMM gate"),
        "off": Effect(CHANGES, "the engine's DeepGEMM gate is forced off"),
        "on": Effect(CHANGES, "the engine's DeepGEMM gate is forced on"),
    },
    "sparse_mla": {
        "upstream": _UPSTREAM,
        "triton": Effect(CHANGES, "DeepSeek-V4 sparse attention runs on ds-plugins' Triton kernels"),
    },
    "indexer": {
        "upstream": _UPSTREAM,
        "triton": Effect(CHANGES, "V4's indexer, o_proj einsum and mHC prenorm run on ds-plugins' Triton kernels"),
    },
    "cudagraph": {
        "upstream": _UPSTREAM,
        "on": _none("CUDA graphs as the engine captures them (the ds-plugins kernels are graph-safe)"),
        "off": Effect(CHANGES, "DeepSeek-V4 on the ds-plugins path runs eagerly (as --enforce-eager)"),
    },
    "dsv4_model": {
        "upstream": _UPSTREAM,
        "ds_plugins": Effect(CHANGES, "DeepseekV4ForCausalLM goes to the ds-plugins hook-up of vLLM's own classes"),
    },
    "kv_cache_dtype": {
        "upstream": _UPSTREAM,
        "fp8": Effect(
            CHANGES,
            "vLLM's --kv-cache-dtype auto becomes fp8 for DeepSeek-V4 (its fp8_ds_mla layout accepts only fp8 there)",
        ),
    },
    "custom_all_reduce": {
        "upstream": _UPSTREAM,
        "off": Effect(
            CHANGES,
            "vLLM's custom all-reduce is off for tensor parallelism "
            "(as --disable-custom-all-reduce): NCCL all-reduces between GPUs without NVLink",
        ),
    },
    "ascend_quant": {
        "upstream": _UPSTREAM,
        "ds_plugins": Effect(OFFERS, "--quantization ascend (msModelSlim checkpoints) is available"),
        "vllm-ascend": _none("vllm-ascend provides --quantization ascend"),
        "off": _none("turned off: --quantization ascend is not registered by ds-plugins"),
    },
    "mooncake_connector": {
        "upstream": _UPSTREAM,
        "ds_plugins": Effect(OFFERS, "the Mooncake KV connector is available (kv_connector_module_path)"),
        "unavailable": _none("mooncake-transfer-engine is not installed"),
        "off": _none("turned off"),
    },
}
UNSUPPORTED = _none("the engine predates DeepSeek-V4")


def effect(decision: str, value: str) -> Effect:
    """The effect of one decision value. Raises KeyError for a value the table does not know: the policy
    may only produce values listed here (tests/unit/test_effects.py holds it to that)."""
    if value == "unsupported":
        return UNSUPPORTED
    return TABLE[decision][value]


def acts(decision: str, value: str) -> bool:
    return effect(decision, value).kind != NONE


class Account(NamedTuple):
    """What a plan does on this build, as every report states it."""

    changes: tuple[str, ...]  # "id=value" the engine is changed by, each carried by this build
    offers: tuple[str, ...]  # "id=value" offered to the user, each carried by this build
    missing: tuple[str, ...]  # "id=value" that would change or offer something but nothing here carries it
    carriers: dict[str, tuple[str, ...]]  # "id=value" -> patch ids or adapter features that carry it

    @property
    def nothing_to_do(self) -> bool:
        return not self.changes and not self.missing


def account(plan, declared: Sequence, adapter_carriers: Mapping[tuple[str, str], str]) -> Account:
    """Sort the plan's acting decisions into carried changes, carried offers and missing ones.

    `declared`: the adapter's Patch declarations (those written for other engine versions carry nothing);
    `adapter_carriers`: (decision, value) -> description of an adapter feature with no runtime patch."""
    carriers: dict[str, list[str]] = {}
    for p in declared:
        decision, values = p.implements
        if decision == "*":  # patching.EVERY_PLAN: plumbing, carries no decision value
            continue
        if plan.engine_version is not None and not p.covers(plan.engine_version):
            continue
        for v in values:
            carriers.setdefault(f"{decision}={v}", []).append(p.id)
    for (decision, v), what in adapter_carriers.items():
        carriers.setdefault(f"{decision}={v}", []).append(what)
    changes: list[str]
    offers: list[str]
    changes, offers, missing = [], [], []
    for d in plan.decisions:
        kind = effect(d.id, d.value).kind
        if kind == NONE:
            continue
        key = f"{d.id}={d.value}"
        if key not in carriers:
            missing.append(key)
        else:
            (changes if kind == CHANGES else offers).append(key)
    used = {k: tuple(v) for k, v in carriers.items() if k in changes or k in offers}
    return Account(tuple(changes), tuple(offers), tuple(missing), used)


def sentence(engine_title: str, acc: Account) -> str:
    """One clause for the verdict and the start-up line."""
    parts = []
    if acc.changes:
        parts.append(f"changes {', '.join(acc.changes)}")
    if acc.offers:
        parts.append(f"offers {', '.join(acc.offers)} (opt-in)")
    if acc.missing:
        parts.append(
            f"would change {', '.join(acc.missing)}, which this build does not implement yet (upstream behaviour kept)"
        )
    if acc.nothing_to_do:
        head = f"nothing to do here on {engine_title}: upstream handles every feature"
        return head + (f"; ds-plugins {parts[0]}" if parts else "")
    return f"on {engine_title} ds-plugins " + "; ".join(parts)

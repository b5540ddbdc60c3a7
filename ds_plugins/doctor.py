"""`ds-plugins doctor`: the environment, every decision with its reason, the patches that apply."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import __version__, effects, landscape, settings
from .policy import Plan, decide
from .probe import Probe

# 64 is sysexits' EX_USAGE: argparse's own 2 would read as "unsupported".
EXIT_OK, EXIT_CONFIG, EXIT_UNSUPPORTED, EXIT_USAGE = 0, 1, 2, 64


def declared_patches(engine: str):
    if engine == "vllm":
        from .vllm import declared_patches as source
    else:
        from .sglang import declared_patches as source
    return list(source())


def adapter_carriers(engine: str) -> dict:
    """(decision, value) -> the adapter feature that carries it with no runtime patch (ds_plugins.effects)."""
    if engine == "vllm":
        from .vllm import adapter_carriers as source
    else:
        from .sglang import adapter_carriers as source
    return dict(source())


def _patch_rows(plan: Plan, declared) -> list[dict]:
    rows = []
    for p in declared:
        decision, values = p.implements
        if not p.selected_by(plan):
            state = f"not needed ({decision}={plan.value(decision)})"
        elif not p.covers(plan.engine_version):
            state = f"not for this version (written for {p.versions})"
        else:
            state = "applies (checked against the live target when the engine imports it)"
        rows.append(
            {"id": p.id, "target": p.target, "versions": p.versions, "state": state, "why": p.why, "retire": p.retire}
        )
    return rows


def build(probe: Probe, env: Mapping[str, str] | None = None, notes: list[str] | None = None) -> dict:
    """Everything doctor says, as data (rendered as text, or printed with --json)."""
    env = os.environ if env is None else env
    report: dict = {
        "ds_plugins": __version__,
        "simulated": probe.simulated,
        "probe": probe.to_dict(),
        "switches": {k: settings.shown(k, v) for k, v in sorted(env.items()) if k.startswith(settings.PREFIX)},
        "disabled": False,
        "engines": {},
        "notes": list(notes or ()),
        "error": None,
    }
    try:
        settings.read(env)
        report["disabled"] = settings.disabled(env)
    except settings.ConfigError as exc:
        report["error"] = str(exc)
        report["verdict"] = f"configuration error: {exc}"
        report["exit_code"] = EXIT_CONFIG
        return report
    for engine in probe.engines:
        plan = decide(probe, engine, env)
        entry: dict[str, Any] = {
            "version": plan.engine_version,
            "distribution": probe.distributions.get(engine),
            "status": plan.status,
            "status_reason": plan.status_reason,
            "target": plan.target,
            "decisions": [
                {
                    "id": d.id,
                    "value": d.value,
                    "reason": d.reason,
                    "source": d.source,
                    "effect": effects.effect(d.id, d.value).kind,
                    "meaning": effects.effect(d.id, d.value).meaning,
                }
                for d in plan.decisions
            ],
            "patches": [],
            "changes": [],
            "offers": [],
            "not_in_this_build": [],
            "carriers": {},
        }
        if plan.status == "supported":
            declared = declared_patches(engine)
            acc = effects.account(plan, declared, adapter_carriers(engine))
            entry.update(
                patches=_patch_rows(plan, declared),
                changes=list(acc.changes),
                offers=list(acc.offers),
                not_in_this_build=list(acc.missing),
                carriers={k: list(v) for k, v in acc.carriers.items()},
            )
            entry["sentence"] = effects.sentence(landscape.ENGINE_TITLE[engine], acc)
            if engine == "vllm" and not probe.simulated:
                from .vllm.mooncake.connector import MODULE_PATH, state

                entry["mooncake_connector"] = {"state": state(), "module_path": MODULE_PATH}
        report["engines"][engine] = entry
    report["verdict"], report["exit_code"] = _verdict(report)
    return report


def _minimums() -> str:
    return " or ".join(f"{landscape.ENGINE_TITLE[e]} >= {v}" for e, v in landscape.MINIMUM.items())


def _verdict(report: dict) -> tuple[str, int]:
    engines = report["engines"]
    if not engines:
        return f"unsupported: no engine installed; DeepSeek-V4 needs {_minimums()}", EXIT_UNSUPPORTED
    supported = [e for e, r in engines.items() if r["status"] == "supported"]
    old = [
        f"{landscape.ENGINE_TITLE[e]} {r['version']} ({r['status_reason']})"
        for e, r in engines.items()
        if r["status"] == "unsupported"
    ]
    if not supported:
        return f"unsupported: {'; '.join(old)}", EXIT_UNSUPPORTED
    parts = []
    if report["disabled"]:
        parts.append("DS_PLUGINS_DISABLE is set: ds-plugins does nothing (shown: what it would do)")
    parts += [engines[e]["sentence"] for e in supported]
    if old:
        parts.append(f"not supported: {'; '.join(old)}")
    return "supported: " + "; ".join(parts), EXIT_OK


# --- text -----------------------------------------------------------------------


def _library_line(lib: dict) -> str:
    if not lib["present"]:
        return f"{lib['name']}: not installed"
    version = f" {lib['version']}" if lib.get("version") else ""
    note = f" ({lib['note']})" if lib.get("note") else ""
    return f"{lib['name']}{version}{note}"


def render(report: dict) -> str:
    p = report["probe"]
    out = [
        f"ds-plugins {report['ds_plugins']} doctor" + (" (simulated environment)" if report["simulated"] else ""),
        "",
        "Environment",
    ]
    row = "  {:<13}{}".format
    out.append(row("python", p["python"]))
    for engine in landscape.ENGINE_TITLE:
        version = p["engines"].get(engine)
        dist = (p.get("distributions") or {}).get(engine)
        shown = "not installed" if version is None else version + (f" (distribution {dist})" if dist else "")
        out.append(row(engine, shown))
    torch = p["torch"] or "not installed"
    if p["torch"]:
        torch += f" (CUDA {p['torch_cuda']})" if p["torch_cuda"] else " (no CUDA build)"
    out.append(row("torch", torch))
    devices = [
        f"{d['kind']}:{d['index']} {d['name']}"
        + (f" (SM{d['capability'][0]}{d['capability'][1]})" if d.get("capability") else "")
        for d in p["devices"]
    ]
    out.append(row("accelerators", ", ".join(devices) or "none"))
    if p.get("device_note"):
        out.append(row("", p["device_note"]))
    if len([d for d in p["devices"] if d["kind"] == "cuda"]) > 1:
        links = p.get("gpu_links", "unknown")
        out.append(row("gpu links", links + (f" ({p['gpu_links_note']})" if p.get("gpu_links_note") else "")))
    libs = [_library_line(lib) for lib in p["libraries"].values()]
    for i, line in enumerate(libs or ["none"]):
        out.append(row("libraries" if i == 0 else "", line))
    switches = [f"{k}={v}" for k, v in report["switches"].items()]
    out.append(row("switches", ", ".join(switches) or "none set (all defaults)"))
    for note in report.get("notes", ()):
        out.append(row("note", note))
    if report["error"]:
        out += ["", f"Configuration error: {report['error']}"]
    for engine, r in report["engines"].items():
        title = landscape.ENGINE_TITLE[engine]
        out += ["", f"{title} {r['version']}: {r['status']} ({r['status_reason']})", f"  target: {r['target']}"]
        if r["status"] != "supported":
            out.append(f"  every feature: {r['status']}")
            continue
        for d in r["decisions"]:
            out.append(f"  {d['id']:<20}{d['value']:<13}{d['reason']}")
        for label, keys in (("changes", r["changes"]), ("offers", r["offers"])):
            if keys:
                out.append(f"  {label}: " + "; ".join(f"{k} (by {', '.join(r['carriers'][k])})" for k in keys))
        if r["patches"]:
            here = [p for p in r["patches"] if not p["state"].startswith("not for this version")]
            out.append("  patches:" if here else "  patches: none written for this version")
            for patch in here:
                out.append(f"    {patch['id']}  {patch['target']}  [{patch['versions']}]  {patch['state']}")
            if len(here) < len(r["patches"]):
                out.append(
                    f"    ({len(r['patches']) - len(here)} more for other {title} versions: "
                    f"`ds-plugins doctor --json` lists them)"
                )
        else:
            out.append(f"  patches: none declared for {title} in this build")
        if r.get("mooncake_connector"):
            mc = r["mooncake_connector"]
            out.append(f"  mooncake connector: {mc['state']}; kv_connector_module_path={mc['module_path']}")
        if r["not_in_this_build"]:
            out.append(f"  not in this build yet: {', '.join(r['not_in_this_build'])} (upstream behaviour kept)")
    out += ["", f"Verdict: {report['verdict']}"]
    return "\n".join(out)

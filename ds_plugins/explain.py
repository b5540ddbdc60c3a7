"""`ds-plugins explain`: which known upstream failure an error or a log shows, and what to do here.

    ds-plugins explain "RuntimeError: Assertion error (csrc/apis/layout.hpp:60): Unknown SF transformation"
    ds-plugins explain --log engine.log          # or --log - for standard input
    ds-plugins explain --simulate --engine vllm==0.24.0 --capability 12.0 "…"   # for another machine

For each known failure found (ds_plugins/known_failures.py; several in a log: each once, in log order)
it says what the failure is, whether it applies to each engine on this (or the simulated) machine, and
whether ds-plugins handles it there: a record names the policy decision whose value takes the failing
path away, and the answer comes from `ds_plugins.policy.decide` for that machine, as `ds-plugins doctor`
would decide it. Otherwise it gives the remedy.

Exit status: 0 at least one known failure recognised, 1 bad DS_PLUGINS_* setting, 3 nothing recognised,
64 bad command-line flags, 66 the log cannot be read.

`python -m ds_plugins.explain write-doc` regenerates docs/known-failures.md from the same records
(`check-doc` exits 1 when it is stale); `markdown_table()` is the README's "If you see …" table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from . import __version__, known_failures, landscape
from .known_failures import KnownFailure, Match, gpu_class
from .probe import Probe

# 1 and 64 are doctor's (a bad DS_PLUGINS_* setting, a usage error), for every subcommand alike.
from .doctor import EXIT_CONFIG, EXIT_USAGE  # noqa: E402

EXIT_MATCH, EXIT_NO_MATCH, EXIT_NOINPUT = 0, 3, 66
HANDLED, NOT_HANDLED, NOT_APPLICABLE, UNKNOWN = "handled", "not handled", "not applicable", "unknown"
DOC = Path(__file__).resolve().parents[1] / "docs" / "known-failures.md"


class Verdict(NamedTuple):
    """What one known failure means for one engine on the machine explained."""

    engine: str | None  # None: no engine installed there
    version: str | None
    state: str  # HANDLED | NOT_HANDLED | NOT_APPLICABLE | UNKNOWN
    reason: str
    note: str = ""  # the record's note for the range that applies


def _title(engine: str) -> str:
    return landscape.ENGINE_TITLE.get(engine, engine)


def machine_gpu(probe: Probe) -> str | None:
    """GPU 0's class, the GPU the policy decides for (policy._target): None without a CUDA GPU."""
    cuda = [d for d in probe.devices if d.kind == "cuda"]
    return gpu_class(cuda[0].capability) if cuda else None


def _libraries(where: known_failures.Where, probe: Probe) -> tuple[bool | None, str]:
    """Do the library conditions hold? True, False, or None when a version is unknown; and why."""
    unknown = []
    for name, versions in where.libraries:
        lib = probe.library(name)
        if not lib.present:
            return False, f"it needs {name} {versions}, and {name} is not installed"
        if lib.version is None:
            unknown.append(f"{name} {versions}")
        elif not landscape.in_range(versions, lib.version, what=f"library {name}"):
            return False, f"it needs {name} {versions}, and {name} here is {lib.version}"
    if unknown:
        return None, f"it needs {', '.join(unknown)}, whose version is not known here"
    return True, ""


def _carried(plan, key: str) -> bool:
    """Does this build carry the decision value (a patch or an adapter feature for this engine version)?"""
    from . import doctor, effects

    acc = effects.account(plan, doctor.declared_patches(plan.engine), doctor.adapter_carriers(plan.engine))
    return key not in acc.missing


def _where_text(record: KnownFailure, engine: str | None = None) -> str:
    return "; ".join(_scope(w) for w in record.where if engine is None or w.engine == engine)


def _scope(w: known_failures.Where) -> str:
    text = f"{_title(w.engine)} {w.versions}"
    text += f" on {', '.join(w.devices)}" if w.devices else " on any GPU"
    for name, versions in w.libraries:
        text += f" with {name} {versions}"
    return text


def assess(record: KnownFailure, probe: Probe, env: Mapping[str, str] | None = None) -> list[Verdict]:
    """The record's meaning for each engine on the probed machine. Raises settings.ConfigError on a bad
    DS_PLUGINS_* switch (from the policy)."""
    from . import settings
    from .policy import decide

    if not probe.engines:
        return [
            Verdict(
                None,
                None,
                UNKNOWN,
                "no vLLM or SGLang is installed here, so whether it applies cannot "
                "be told: describe the machine the log came from with --simulate "
                "--engine NAME==VERSION --capability MAJOR.MINOR",
            )
        ]
    gpu = machine_gpu(probe)
    out = []
    for engine in sorted(
        probe.engines, key=lambda e: list(landscape.ENGINE_TITLE).index(e) if e in landscape.ENGINE_TITLE else 99
    ):
        version = probe.engines[engine]
        desc = f"{_title(engine)} {version}"
        mine = [w for w in record.where if w.engine == engine]
        if not mine:
            others = sorted({_title(w.engine) for w in record.where})
            out.append(
                Verdict(
                    engine,
                    version,
                    NOT_APPLICABLE,
                    f"{_title(engine)} does not raise this ({' and '.join(others)} does)",
                )
            )
            continue
        scopes = [w for w in mine if w.covers(engine, version)]
        if not scopes:
            out.append(
                Verdict(
                    engine,
                    version,
                    NOT_APPLICABLE,
                    f"{desc} is outside the versions it happens in ({_where_text(record, engine)})",
                )
            )
            continue
        on_gpu = [w for w in scopes if w.on(gpu)]
        if not on_gpu:
            here = "this machine has no CUDA GPU" if gpu is None else f"GPU 0 here is {gpu}"
            where = (
                "a CUDA GPU"
                if any(not w.devices for w in scopes)
                else ", ".join(sorted({d for w in scopes for d in w.devices}))
            )
            out.append(Verdict(engine, version, NOT_APPLICABLE, f"it happens on {where}; {here}"))
            continue
        checked = [(w, *_libraries(w, probe)) for w in on_gpu]
        fitting = [c for c in checked if c[1] is not False]
        if not fitting:
            out.append(Verdict(engine, version, NOT_APPLICABLE, checked[0][2]))
            continue
        scope, libs_known, libs_why = fitting[0]
        caveat = f" ({libs_why})" if libs_known is None else ""
        if record.handled_by is None:
            out.append(
                Verdict(
                    engine,
                    version,
                    NOT_HANDLED,
                    f"it applies to {desc} on {gpu}{caveat}; ds-plugins does not change this path",
                    scope.note,
                )
            )
            continue
        decision_id, values = record.handled_by
        if settings.disabled(env):
            out.append(
                Verdict(
                    engine,
                    version,
                    NOT_HANDLED,
                    "DS_PLUGINS_DISABLE=1: ds-plugins leaves the engine as shipped",
                    scope.note,
                )
            )
            continue
        plan = decide(probe, engine, env)
        if plan.status != "supported":
            out.append(
                Verdict(engine, version, NOT_HANDLED, f"ds-plugins does nothing here: {plan.status_reason}", scope.note)
            )
            continue
        d = plan.decision(decision_id)
        key = f"{d.id}={d.value}"
        if d.value in values and _carried(plan, key):
            out.append(
                Verdict(
                    engine,
                    version,
                    HANDLED,
                    f"ds-plugins decides {key} here, which keeps {desc} off the failing path{caveat}: {d.reason}",
                    scope.note,
                )
            )
        elif d.value in values:
            out.append(
                Verdict(
                    engine,
                    version,
                    NOT_HANDLED,
                    f"ds-plugins decides {key} here, but this build does not implement it for {desc} yet{caveat}",
                    scope.note,
                )
            )
        else:
            out.append(
                Verdict(
                    engine,
                    version,
                    NOT_HANDLED,
                    f"ds-plugins decides {key} here{caveat} ({d.reason}); what avoids it is "
                    f"{' or '.join(f'{decision_id}={v}' for v in values)}",
                    scope.note,
                )
            )
    return out


def explain(text: str, probe: Probe, env: Mapping[str, str] | None = None) -> dict:
    """Everything explain says, as data (rendered as text, or printed with --json)."""
    matches = known_failures.match(text)
    report = {
        "ds_plugins": __version__,
        "simulated": probe.simulated,
        "machine": {"engines": dict(probe.engines), "gpu": machine_gpu(probe)},
        "matches": [_match_dict(m, assess(m.record, probe, env)) for m in matches],
        "known": len(known_failures.RECORDS),
    }
    report["exit_code"] = EXIT_MATCH if matches else EXIT_NO_MATCH
    return report


def _match_dict(m: Match, verdicts: list[Verdict]) -> dict:
    r = m.record
    return {
        "id": r.id,
        "title": r.title,
        "line_number": m.line_number,
        "line": m.line,
        "verdicts": [v._asdict() for v in verdicts],
        "handled_by": {"decision": r.handled_by[0], "values": list(r.handled_by[1])} if r.handled_by else None,
        "remedy": r.remedy,
        "where": [w._asdict() for w in r.where],
        "upstream": list(r.upstream),
        "retire": r.retire,
        "evidence": [{**e._asdict(), "level": e.level} for e in r.evidence],
    }


def _machine_line(report: dict) -> str:
    m = report["machine"]
    engines = ", ".join(f"{_title(e)} {v}" for e, v in m["engines"].items()) or "no vLLM or SGLang"
    gpu = f"GPU 0 {m['gpu']}" if m["gpu"] else "no CUDA GPU"
    return f"{'the simulated machine' if report['simulated'] else 'this machine'}: {engines}; {gpu}"


def render(report: dict) -> str:
    n = len(report["matches"])
    if not n:
        return (
            f"ds-plugins explain: no known failure recognised ({report['known']} known; "
            f"`ds-plugins explain --list` shows them)."
        )
    out = [f"ds-plugins explain: {n} known failure{'s' if n > 1 else ''} recognised, for {_machine_line(report)}"]
    for i, m in enumerate(report["matches"], start=1):
        out += ["", f"[{i}] {m['id']}: {m['title']}", f"    line {m['line_number']}: {_clip(m['line'])}"]
        for v in m["verdicts"]:
            who = f"{_title(v['engine'])} {v['version']}" if v["engine"] else "here"
            out.append(f"    {who}: {v['state']}: {v['reason']}")
            if v["note"] and v["state"] != NOT_APPLICABLE:
                out.append(f"      note: {v['note']}")
        states = {v["state"] for v in m["verdicts"]} - {NOT_APPLICABLE}
        if states == {HANDLED}:
            out.append(
                "    what to do: nothing more with ds-plugins installed; if it still happens, run "
                "`ds-plugins doctor` and send its output with the log"
            )
        elif not states:
            out.append(
                "    what to do: it should not happen here; if the log is from another machine, explain it "
                "for that one (--simulate --engine ... --capability ...). Where it applies: " + m["remedy"]
            )
        else:
            out.append(f"    what to do: {m['remedy']}")
        if m["upstream"]:
            out.append(f"    upstream: {', '.join(m['upstream'])}")
        out.append(f"    evidence: {evidence_summary(m['evidence'])}")
    return "\n".join(out)


def _clip(line: str, width: int = 200) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def evidence_summary(evidence: list[dict]) -> str:
    """One line: the evidence levels, and the wheels (or repositories) behind each."""
    from packaging.version import Version

    wheels: dict[str, dict[str, set[str]]] = {}  # level -> dist -> versions that carry a text
    reading: list[str] = []
    for e in evidence:
        if e["level"] == "reading":
            reading.append(e["member"])
        else:  # an absence only bounds a range; docs/known-failures.md lists those too
            wheels.setdefault(e["level"], {}).setdefault(e["dist"], set()).update(e["present"])
    parts = [
        f"{level}: " + ", ".join(f"{dist} {'/'.join(sorted(vs, key=Version))}" for dist, vs in dists.items() if vs)
        for level, dists in wheels.items()
    ]
    if reading:
        parts.append("reading: " + ", ".join(reading))
    return "; ".join(parts)


def render_list() -> str:
    out = [f"{len(known_failures.RECORDS)} known failures (ds_plugins/known_failures.py):"]
    for r in known_failures.RECORDS:
        out += ["", f"{r.id}: {r.title}", f"    e.g. {_clip(r.example)}", f"    where: {_where_text(r)}"]
    return "\n".join(out)


# --- the command ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import simulate

    parser.add_argument("text", nargs="*", help="the error text (quote it; several words are joined by spaces)")
    parser.add_argument("--log", metavar="FILE", help="a whole log to search instead ('-': standard input)")
    parser.add_argument("--list", action="store_true", help="list the known failures and exit")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="explain for the hypothetical machine the flags below describe, not this one",
    )
    simulate.add_arguments(parser.add_argument_group("simulated environment (with --simulate)"))


def _read(args: argparse.Namespace) -> str:
    """The text to search; raises OSError (reading the log) or ValueError (nothing, or both, given)."""
    if args.log is not None and args.text:
        raise ValueError("give the error text or --log FILE, not both")
    if args.log is None:
        if not args.text:
            raise ValueError("nothing to explain: give the error text, or --log FILE ('-' for standard input)")
        return " ".join(args.text)
    if args.log == "-":
        if sys.stdin is None:
            raise OSError("no standard input")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    else:
        data = Path(args.log).read_bytes()
    return data.decode("utf-8", errors="replace")


def run(args: argparse.Namespace) -> int:
    from . import settings, simulate
    from .cli import fail
    from .registration import current_probe

    if args.list:
        print(json.dumps([_record_dict(r) for r in known_failures.RECORDS], indent=2) if args.json else render_list())
        return EXIT_MATCH
    try:
        text = _read(args)
    except ValueError as exc:
        return fail(args, f"ds-plugins explain: {exc}", EXIT_USAGE)
    except OSError as exc:
        name = "standard input" if args.log == "-" else args.log
        return fail(args, f"ds-plugins explain: cannot read {name}: {exc.strerror or exc}", EXIT_NOINPUT)
    try:
        probe = simulate.build(args) if args.simulate else current_probe()
        report = explain(text, probe)
    except simulate.SimulateError as exc:
        return fail(args, f"ds-plugins explain: {exc}", EXIT_USAGE)
    except settings.ConfigError as exc:
        return fail(args, f"ds-plugins explain: {exc}", EXIT_CONFIG)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return report["exit_code"]


def _record_dict(r: KnownFailure) -> dict:
    return {
        "id": r.id,
        "title": r.title,
        "example": r.example,
        "patterns": list(r.patterns),
        "where": [w._asdict() for w in r.where],
        "handled_by": {"decision": r.handled_by[0], "values": list(r.handled_by[1])} if r.handled_by else None,
        "remedy": r.remedy,
        "upstream": list(r.upstream),
        "retire": r.retire,
        "evidence": [{**e._asdict(), "level": e.level} for e in r.evidence],
    }


# --- docs ------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ref_link(ref: str) -> str:
    repo, _, number = ref.partition("#")
    return f"[{ref}](https://github.com/{repo}/issues/{number})"


def _handled_cell(r: KnownFailure) -> str:
    if r.handled_by is None:
        return "not handled: do what the next column says"
    decision, values = r.handled_by
    return (
        "handled where it decides "
        + " or ".join(f"`{decision}={v}`" for v in values)
        + " (`ds-plugins explain` says whether it does on your machine)"
    )


def markdown_table() -> str:
    """The "If you see …" table, one row per known failure (the README embeds it between markers)."""
    rows = ["| If you see | Where | ds-plugins | What to do |", "|---|---|---|---|"]
    for r in known_failures.RECORDS:
        rows.append(
            f"| `{_cell(r.example)}` | {_cell(_where_text(r))} | {_cell(_handled_cell(r))} | {_cell(r.remedy)} |"
        )
    return "\n".join(rows) + "\n"


def render_doc() -> str:
    out = [
        "# Known failures",
        "",
        "Generated by `python -m ds_plugins.explain write-doc` from `ds_plugins/known_failures.py`; "
        "a test fails when this file is stale. Do not edit by hand.",
        "",
        "Upstream failures that DeepSeek-V4 users meet on SM12x GPUs (RTX PRO 6000 = SM120, DGX Spark = SM121) "
        "and the machines around them. Paste an error, or a whole log, into `ds-plugins explain` "
        "(`ds-plugins explain --log FILE`) to be told which one it is and whether ds-plugins handles it on your "
        "machine, or `ds-plugins explain --simulate --engine vllm==0.24.0 --capability 12.0 ...` for another.",
        "",
        'Versions are ranges as pip writes them; GPUs are compute-capability classes. "Handled" means '
        "ds-plugins' policy takes the failing path away where it makes that decision: the decision itself "
        "depends on the engine version and the kernels installed (`ds-plugins doctor`).",
        "",
        markdown_table().rstrip("\n"),
        "",
        "## Evidence",
        "",
        'Where each text comes from. "wheel source" and "wheel binary": the literal was found in the official '
        "wheel of each version listed (its Python source, or the string table of a compiled module), and is "
        'checked there again by `tests/contract/test_known_failures.py`; "reading": read in an upstream '
        "repository at the commit named, not in a wheel.",
    ]
    for r in known_failures.RECORDS:
        out += ["", f"### `{r.id}`", "", r.title + ".", ""]
        for w in r.where:
            out.append(f"- {_scope(w)}" + (f": {w.note}" if w.note else ""))
        if r.upstream:
            out.append(f"- upstream: {', '.join(_ref_link(u) for u in r.upstream)}")
        out.append(f"- retire when: {r.retire}")
        out.append("- patterns: " + ", ".join(f"`{_cell(p)}`" for p in r.patterns))
        for e in r.evidence:
            if e.level == "reading":
                out.append(f"- reading: `{_cell(e.text)}` in {e.member}" + (f" ({e.origin})" if e.origin else ""))
                continue
            seen = []
            if e.present:
                seen.append(f"in {e.dist} {', '.join(e.present)}")
            if e.absent:
                seen.append(f"not in {e.dist} {', '.join(e.absent)}")
            out.append(
                f"- {e.level}: `{_cell(e.text)}` {' and '.join(seen)} (`{e.member}`)"
                + (f"; {e.origin}" if e.origin else "")
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["write-doc"]:
        DOC.write_text(render_doc())
        print(f"wrote {os.path.relpath(DOC)}")
        return 0
    if argv == ["check-doc"]:
        fresh = DOC.exists() and DOC.read_text() == render_doc()
        state = "up to date" if fresh else "stale: run python -m ds_plugins.explain write-doc"
        print(f"{os.path.relpath(DOC)} is {state}")
        return 0 if fresh else 1
    print("usage: python -m ds_plugins.explain write-doc | check-doc", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

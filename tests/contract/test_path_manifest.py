"""The path manifests (ds_plugins/paths/), checked against the official wheels and against the policy.

For every engine (vLLM, SGLang):
- every row's Evidence is re-checked in every matrix wheel its range covers: `source`/`absent` in the
  engine's wheel or in the wheel of the library that engine release pins (read as text, cached),
  `binary` in the strings of a compiled member (ci/upstream.binary_strings), `pin` in the wheel metadata;
- completeness: every matrix version from the engine's DeepSeek-V4 minimum x REQUIRED_DEVICES x STAGES
  has a row;
- model invariants: `reading` only on `unverified` rows, checkable evidence on the others, a Cover names a
  real decision id and value and a declared patch that implements it over the row's whole range;
- doctor agreement: `ds-plugins doctor --simulate --engine E==V --capability C` (stock-wheel libraries,
  ds_plugins/stock.py) exits 2 exactly where the manifest has an uncovered blocker for that plan.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from ci import upstream
from ds_plugins import doctor, landscape, paths, policy, simulate
from ds_plugins.paths.model import (
    DEVICES,
    EVIDENCE_KINDS,
    PROVIDERS,
    REQUIRED_DEVICES,
    STAGES,
    UPSTREAM,
    Row,
    uncovered,
)

pytestmark = pytest.mark.contract

ENGINES = ("vllm", "sglang")
CAPABILITY = {"sm120": "12.0", "sm121": "12.1", "sm90": "9.0", "sm100": "10.0"}


def _matrix(engine: str) -> list[str]:
    return [v for v in upstream.versions()[engine]["matrix"] if landscape.is_supported(engine, v)]


def _all_rows() -> list[tuple[str, int, Row]]:
    return [(e, i, r) for e in ENGINES for i, r in enumerate(paths.rows(e))]


def _row_id(engine: str, i: int, row: Row) -> str:
    return f"{engine}-{i}-{row.stage}-{'/'.join(row.devices)}-{row.versions}"


# --- reading the wheels (each file once per session) --------------------------------------------


@functools.lru_cache(maxsize=None)
def _pins(engine: str, version: str) -> dict[str, str]:
    return upstream.wheel_pins(upstream.source(engine, version))


@functools.lru_cache(maxsize=None)
def _text(dist: str, version: str, path: str) -> str | None:
    file = upstream.source(dist, version) / path
    return file.read_text(errors="replace") if file.is_file() else None


def _wheel_of(engine: str, version: str, package: str) -> tuple[str, str]:
    """(distribution, version) whose wheel holds the evidence: the engine's, or the pinned library's."""
    if package == engine:
        return engine, version
    pinned = _pins(engine, version).get(canonicalize_name(package))
    assert pinned, f"{engine} {version} does not pin {package}: evidence on it cannot be checked"
    return package, pinned


def _check(engine: str, version: str, ev) -> str | None:
    """None when the evidence holds in that wheel, else why not."""
    if ev.kind == "pin":
        got = _pins(engine, version).get(canonicalize_name(ev.package))
        return None if got and re.fullmatch(ev.pattern, got) else f"pins {ev.package}=={got}, not /{ev.pattern}/"
    dist, dist_version = _wheel_of(engine, version, ev.package)
    where = f"{dist} {dist_version} {ev.path}"
    if ev.kind == "binary":
        strings = upstream.binary_strings(dist, dist_version, {ev.path})
        found = any(re.search(ev.pattern, s) for s in strings.values())
        return None if strings and found else f"/{ev.pattern}/ not in the strings of {where}"
    text = _text(dist, dist_version, ev.path)
    if text is None:
        return f"{where}: no such file in the wheel"
    found = re.search(ev.pattern, text, re.MULTILINE) is not None
    if ev.kind == "source":
        return None if found else f"/{ev.pattern}/ not in {where}"
    return None if not found else f"/{ev.pattern}/ found in {where}, evidence says absent"


EVIDENCE_CASES = [
    (e, i, r, v)
    for e, i, r in _all_rows()
    for v in _matrix(e)
    if any(r.applies(v, d) for d in r.devices) and any(ev.kind != "reading" for ev in r.evidence)
]


@pytest.mark.parametrize(
    "engine,i,row,version", EVIDENCE_CASES, ids=[f"{_row_id(e, i, r)}@{v}" for e, i, r, v in EVIDENCE_CASES]
)
def test_row_evidence_holds_in_every_wheel_of_its_range(engine, i, row, version):
    failures = [why for ev in row.evidence if ev.kind != "reading" for why in [_check(engine, version, ev)] if why]
    assert not failures, f"{row.kernel} ({engine} {version}): " + "; ".join(failures)


# --- completeness -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_every_matrix_version_device_and_stage_has_a_row(engine):
    rows = paths.rows(engine)
    assert rows, f"{engine}: the path manifest has no rows"
    missing = [
        f"{v} {d} {s}"
        for v in _matrix(engine)
        for d in REQUIRED_DEVICES
        for s in STAGES
        if not any(r.stage == s and r.applies(v, d) for r in rows)
    ]
    assert not missing, f"{engine}: no manifest row for " + ", ".join(missing)


# --- model invariants ---------------------------------------------------------------------------

ROW_CASES = _all_rows()


@functools.lru_cache(maxsize=None)
def _patches(engine: str) -> dict:
    return {p.id: p for p in doctor.declared_patches(engine)}


@pytest.mark.parametrize("engine,i,row", ROW_CASES, ids=[_row_id(*c) for c in ROW_CASES])
def test_row_follows_the_model(engine, i, row):
    assert row.engine == engine
    assert row.stage in STAGES and row.provider in PROVIDERS and row.upstream in UPSTREAM
    assert row.devices and set(row.devices) <= set(DEVICES)
    landscape.in_range(row.versions, landscape.MINIMUM[engine])  # a well-formed range
    assert row.why.strip() and row.kernel.strip()
    kinds = {ev.kind for ev in row.evidence}
    assert kinds <= set(EVIDENCE_KINDS)
    if row.upstream != "unverified":
        assert "reading" not in kinds, "`reading` evidence is only for unverified rows"
        assert kinds, "a has_code/blocker row needs checkable evidence"
    assert any(row.applies(v, d) for v in _matrix(engine) for d in row.devices), "row covers no matrix version"
    if row.upstream != "blocker":
        assert row.fixed_in is None, "only a blocker has a fixed_in"
    if row.upstream == "has_code":
        assert row.cover is None, "a has_code row has nothing to cover"
    if row.fixed_in is not None:
        Version(row.fixed_in)
        assert not row.applies(row.fixed_in, row.devices[0]), f"fixed in {row.fixed_in} but the row covers it"
    if row.unless is not None:  # a library feature the probe can find (what doctor --simulate --lib names)
        from ds_plugins.simulate import LIBRARY_FEATURES

        library, feature = row.unless
        assert row.upstream == "blocker" and feature in LIBRARY_FEATURES.get(library, ()), row.unless


COVER_CASES = [(e, i, r) for e, i, r in ROW_CASES if r.cover is not None]


@pytest.mark.parametrize("engine,i,row", COVER_CASES, ids=[_row_id(*c) for c in COVER_CASES])
def test_cover_names_a_real_decision_and_a_declared_patch_over_the_rows_range(engine, i, row):
    from ds_plugins import effects

    cover = row.cover
    assert cover.decision in policy.DECISION_IDS, f"unknown decision {cover.decision!r}"
    assert effects.acts(cover.decision, cover.value), f"{cover.decision}={cover.value} is not a ds-plugins value"
    if cover.patch is None:  # carried without a runtime patch (ds_plugins.effects' adapter carriers)
        assert (cover.decision, cover.value) in doctor.adapter_carriers(engine), (
            f"{cover.decision}={cover.value}: a cover names the declared patch that carries it"
        )
        return
    patch = _patches(engine).get(cover.patch)
    assert patch is not None, f"cover patch {cover.patch!r} is not declared for {engine}"
    decision, values = patch.implements
    assert decision == cover.decision and cover.value in values, (
        f"{cover.patch} implements {decision}={'/'.join(values)}, not {cover.decision}={cover.value}"
    )
    outside = [v for v in _matrix(engine) if row.applies(v, row.devices[0]) and not patch.covers(v)]
    assert not outside, f"{cover.patch} ({patch.versions}) does not cover {', '.join(outside)}"


# --- doctor agreement ---------------------------------------------------------------------------


def _probe(engine: str, version: str, device: str):
    parser = argparse.ArgumentParser(exit_on_error=False)
    simulate.add_arguments(parser)
    return simulate.build(
        parser.parse_args(shlex.split(f"--engine {engine}=={version} --capability {CAPABILITY[device]}"))
    )


DOCTOR_CASES = [(e, v, d) for e in ENGINES for v in _matrix(e) for d in DEVICES]


@pytest.mark.parametrize("engine,version,device", DOCTOR_CASES, ids=[f"{e}-{v}-{d}" for e, v, d in DOCTOR_CASES])
def test_doctor_is_unsupported_exactly_where_the_manifest_has_an_uncovered_blocker(
    engine, version, device, monkeypatch
):
    probe = _probe(engine, version, device)
    # The plan's own decisions, before the manifest is consulted: what the covers are matched against.
    with monkeypatch.context() as m:
        m.setattr(paths, "blockers", lambda *a, **k: paths.Blockers((), None))
        values = {d.id: d.value for d in policy.decide(probe, engine, env={}).decisions}
    expected = uncovered(paths.rows(engine), version, device, values)
    report = doctor.build(probe, env={})
    entry = report["engines"][engine]
    if expected:
        assert report["exit_code"] == doctor.EXIT_UNSUPPORTED and entry["status"] == "unsupported"
        assert expected.rows[0].kernel in entry["status_reason"]
        if expected.upgrade_to:
            assert f">= {expected.upgrade_to}" in entry["status_reason"]
        else:
            assert "no " in entry["status_reason"] and "release is known" in entry["status_reason"]
    else:
        assert report["exit_code"] == doctor.EXIT_OK and entry["status"] == "supported", entry["status_reason"]

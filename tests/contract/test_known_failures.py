"""Every known failure's evidence, checked against the official wheels it names.

A record in ds_plugins/known_failures.py says where its error text comes from: for each `Evidence` with a
distribution, the literal must occur in that file of the wheel for every version in `present` and must
not for every version in `absent`. A `.py` member is read from the wheel's source as ci/upstream.py
unpacks it; a compiled member (the messages of DeepGEMM, FlashMLA and vLLM's own kernels live in
`.so` files, which ci/upstream.py does not unpack) is read from the string table of the binary, which
`upstream.binary_strings` extracts once per wheel and keeps under the same cache folder.
"""

from __future__ import annotations

import fnmatch

import pytest

from ci import upstream
from ds_plugins import known_failures
from ds_plugins.known_failures import RECORDS

pytestmark = pytest.mark.contract

CLAIMS = [
    (r.id, e, v, present)
    for r in RECORDS
    for e in r.evidence
    if e.dist
    for present, versions in ((True, e.present), (False, e.absent))
    for v in versions
]


def _needed() -> dict[tuple[str, str], set[str]]:
    """(dist, version) -> member globs of compiled members some claim reads."""
    out: dict[tuple[str, str], set[str]] = {}
    for _, e, v, _ in CLAIMS:
        if not e.member.endswith(".py"):
            out.setdefault((e.dist, v), set()).add(e.member)
    return out


def source_texts(dist: str, version: str, glob: str) -> dict[str, str]:
    """member -> text, for the wheel's .py files matching `glob` (ci/upstream.py's unpacked source)."""
    src = upstream.source(dist, version)
    return {str(p.relative_to(src)): p.read_text(errors="replace") for p in sorted(src.glob(glob)) if p.is_file()}


@pytest.fixture(scope="module")
def strings_of():
    needed = _needed()
    cache: dict[tuple[str, str], dict[str, str]] = {}

    def get(dist: str, version: str, glob: str) -> dict[str, str]:
        if (dist, version) not in cache:
            cache[(dist, version)] = upstream.binary_strings(dist, version, needed[(dist, version)])
        return {m: t for m, t in cache[(dist, version)].items() if fnmatch.fnmatch(m, glob)}

    return get


@pytest.mark.parametrize(
    "record_id,evidence,version,present",
    CLAIMS,
    ids=[f"{rid}-{e.dist}-{v}-{'has' if p else 'lacks'}-{e.text[:24]}" for rid, e, v, p in CLAIMS],
)
def test_the_wheel_says_what_the_record_claims(record_id, evidence, version, present, strings_of):
    if evidence.member.endswith(".py"):
        files = source_texts(evidence.dist, version, evidence.member)
    else:
        files = strings_of(evidence.dist, version, evidence.member)
    where = [m for m, text in files.items() if evidence.text in text]
    if present:
        assert files, f"{record_id}: {evidence.dist} {version} has no file matching {evidence.member}"
        assert where, f"{record_id}: {evidence.text!r} is not in {evidence.dist} {version} ({evidence.member})"
    else:
        assert not where, f"{record_id}: {evidence.text!r} is in {evidence.dist} {version} ({', '.join(where)})"


def test_every_record_names_wheel_evidence_or_says_it_is_reading_only():
    for r in RECORDS:
        assert r.evidence, r.id
        for e in r.evidence:
            assert e.level in ("wheel source", "wheel binary", "reading"), (r.id, e)
            if e.dist:
                assert e.present or e.absent, f"{r.id}: wheel evidence for {e.text!r} names no version"
            else:
                assert "@" in e.member and ":" in e.member, f"{r.id}: reading evidence names no repo@commit:path"


def test_each_record_has_wheel_evidence_for_its_text():
    """Reading alone is not enough for a record: some wheel must be shown to carry the text (or, for an
    error Python itself words, the code that raises it)."""
    for r in RECORDS:
        assert any(e.dist and e.present for e in r.evidence), f"{r.id}: no wheel is claimed to carry its text"


def test_record_versions_are_matrix_checkable():
    """Each Where's range edges are versions in ci/versions.toml, so the contract tests can see both sides."""
    from packaging.version import Version

    for r in RECORDS:
        for w in r.where:
            matrix = {Version(v) for v in upstream.versions()[w.engine]["matrix"]}
            for clause in w.versions.split(","):
                edge = Version(clause.strip().lstrip(">=<"))
                assert edge in matrix, f"{r.id}: {w.engine} {w.versions}: {edge} is not a matrix version"
    assert known_failures.BY_ID.keys() == {r.id for r in RECORDS}

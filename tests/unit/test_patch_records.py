"""The patch records (patches/<id>.toml, docs/patches.md) are what the declarations give, and each
declaration's claims about itself hold: its evidence files exist and name it, "live" only where a live
engine of the test command is in its range, upstream references well formed."""

import re
import tomllib
from pathlib import Path

import pytest

from ci import patch_records
from ds_plugins.patching import Patch

ROOT = Path(__file__).resolve().parents[2]
PATCHES = patch_records.all_patches()
IDS = [p.id for p in PATCHES]
# Names that tests iterating a whole table use instead of each id.
TABLE_NAMES = ("ROUTES", "PATCHES", "declared_patches")


def test_the_generated_records_and_table_are_up_to_date():
    assert patch_records.differences() == []


def test_ids_are_unique_and_engines_match():
    assert len(set(IDS)) == len(IDS), "duplicate patch ids"
    assert {p.engine for p in PATCHES} == {"vllm", "sglang"}


@pytest.mark.parametrize("patch", PATCHES, ids=IDS)
def test_a_record_parses_back_to_its_declaration(patch):
    data = tomllib.loads((ROOT / "patches" / f"{patch.id}.toml").read_text())
    assert data == patch_records.record_of(patch)


@pytest.mark.parametrize("patch", PATCHES, ids=IDS)
def test_each_patch_says_how_and_names_its_evidence(patch):
    assert patch.why and patch.retire and patch.how, f"{patch.id}: why, how and retire are all required"
    assert patch.evidence, f"{patch.id}: name the tests that back it"
    for path in patch.evidence:
        file = ROOT / path
        assert file.is_file(), f"{patch.id}: evidence {path} does not exist"
        text = file.read_text()
        names = (patch.id, patch.attribute.split(".")[-1], *TABLE_NAMES)
        assert any(n in text for n in names), f"{patch.id}: {path} names neither the patch nor its table"
        if patch_records.evidence_kind(path) == "live":
            in_range = [v for v in patch_records.live_versions(patch.engine, path) if patch.covers(v)]
            assert in_range, f"{patch.id}: {path} is live evidence, but no live {patch.engine} is in {patch.versions}"


@pytest.mark.parametrize("patch", PATCHES, ids=IDS)
def test_upstream_references_are_owner_repo_number(patch):
    for ref in patch.upstream:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+#\d+", ref), f"{patch.id}: {ref!r} is not owner/repo#N"


def _patch(**changes) -> Patch:
    fields = dict(
        id="vllm.example",
        engine="vllm",
        module="vllm.platforms.cuda",
        attribute="CudaPlatformBase.support_deep_gemm",
        versions=">=0.24",
        implements=("deepgemm", ("off", "on")),
        why="why",
        retire="retire",
        check=lambda t: None,
        install=lambda t: lambda: None,
        how="how",
        upstream=("vllm-project/vllm#1",),
        evidence=("tests/contract/test_vllm_seams.py",),
    )
    fields.update(changes)
    return Patch(**fields)


def test_the_record_and_the_table_say_what_the_declaration_says():
    patch = _patch()
    record = tomllib.loads(patch_records.render_record(patch))
    assert record["target"] == "vllm.platforms.cuda.CudaPlatformBase.support_deep_gemm"
    assert record["decision"] == "deepgemm=off|on"
    assert record["upstream"] == ["vllm-project/vllm#1"]
    table = patch_records.render_table([patch, _patch(id="sglang.example", engine="sglang", upstream=())])
    assert "[vllm#1](https://github.com/vllm-project/vllm/issues/1)" in table
    assert "AST: `tests/contract/test_vllm_seams.py` (every matrix version in range)" in table
    assert "| `sglang.example` |" in table and "none filed" in table


def test_live_evidence_lists_the_live_versions_in_range():
    old = _patch(versions=">=0.28,<0.29", evidence=("tests/engines/test_vllm_routes.py",))
    assert patch_records.evidence_text(old) == "live: `tests/engines/test_vllm_routes.py` (vLLM 0.28.0)"
    served = _patch(versions=">=0.32", evidence=("tests/e2e/test_plugin_e2e.py",))
    assert patch_records.evidence_text(served) == "live: `tests/e2e/test_plugin_e2e.py` (vLLM 0.32.0)"
    with pytest.raises(AssertionError):  # a live claim with no live version in range is refused
        test_each_patch_says_how_and_names_its_evidence(
            _patch(versions=">=0.20,<0.22", evidence=("tests/engines/test_vllm_routes.py",))
        )
    assert patch_records.evidence_text(_patch(evidence=())) == "reading"


def test_the_check_catches_a_stale_record(tmp_path, monkeypatch):
    monkeypatch.setattr(patch_records, "RECORDS", tmp_path / "patches")
    monkeypatch.setattr(patch_records, "TABLE", tmp_path / "docs" / "patches.md")
    monkeypatch.setattr(patch_records, "ROOT", tmp_path)
    (tmp_path / "patches").mkdir()
    (tmp_path / "docs").mkdir()
    assert patch_records.main(["write"]) == 0
    assert patch_records.differences() == []
    first = tmp_path / "patches" / f"{IDS[0]}.toml"
    first.write_text(first.read_text().replace("versions = ", 'versions = ">=9" #'))
    (tmp_path / "patches" / "orphan.toml").write_text("id = 'orphan'\n")
    assert patch_records.differences() == [
        f"patches/{IDS[0]}.toml is out of date",
        "patches/orphan.toml has no declared patch",
    ]
    assert patch_records.main(["check"]) == 1
    assert patch_records.main(["write"]) == 0 and patch_records.differences() == []


def test_every_declared_range_has_the_form_patches_use():
    """Patch.covers reads ">=A" or ">=A,<B" only (cheap at engine start-up); anything else must fail here."""
    from ds_plugins.landscape import in_range

    for patch in PATCHES:
        in_range(patch.versions, "0.1.0", what=patch.id)  # raises on another form
    with pytest.raises(ValueError, match="unsupported range clause"):
        in_range("~=0.24", "0.24.1")
    assert in_range(">=0.24,<0.25", "0.24.0rc1") and not in_range(">=0.24,<0.25", "0.25.0")

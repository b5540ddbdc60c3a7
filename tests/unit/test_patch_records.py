"""patches/<id>.toml and the Patch declarations in the adapters say the same thing."""

import tomllib
from pathlib import Path

from ds_plugins.doctor import declared_patches
from ds_plugins.patching import EVERY_PLAN, Patch

RECORDS = Path(__file__).resolve().parents[2] / "patches"
FIELDS = ("id", "engine", "target", "versions", "decision", "why", "retire")


def record_of(patch: Patch) -> dict:
    decision, values = patch.implements
    selected = decision if decision == EVERY_PLAN else f"{decision}={'|'.join(values)}"
    return {"id": patch.id, "engine": patch.engine, "target": patch.target, "versions": patch.versions,
            "decision": selected, "why": patch.why, "retire": patch.retire}


def mismatches(patches: list[Patch], folder: Path) -> list[str]:
    problems = []
    records = {p.stem: p for p in folder.glob("*.toml")}
    for patch in patches:
        path = records.pop(patch.id, None)
        if path is None:
            problems.append(f"{patch.id}: no record patches/{patch.id}.toml")
            continue
        with path.open("rb") as f:
            data = tomllib.load(f)
        expected = record_of(patch)
        for key in FIELDS:
            if data.get(key) != expected[key]:
                problems.append(f"{patch.id}: {key} is {data.get(key)!r} in the record, {expected[key]!r} in code")
        extra = set(data) - set(FIELDS)
        if extra:
            problems.append(f"{patch.id}: unknown keys {sorted(extra)}")
    problems += [f"{name}: record without a declared patch" for name in records]
    return problems


def test_records_and_code_are_in_step():
    declared = declared_patches("vllm") + declared_patches("sglang")
    assert len({p.id for p in declared}) == len(declared), "duplicate patch ids"
    assert all(p.engine == e for e in ("vllm", "sglang") for p in declared_patches(e))
    assert mismatches(declared, RECORDS) == []


def test_the_check_catches_each_kind_of_drift(tmp_path):
    patch = Patch("vllm.example", "vllm", "vllm.platforms.cuda", "CudaPlatformBase.support_deep_gemm", ">=0.24",
                  ("deepgemm", ("off", "on")), "why", "retire", lambda t: None, lambda t: (lambda: None))
    assert mismatches([patch], tmp_path) == ["vllm.example: no record patches/vllm.example.toml"]
    good = record_of(patch)
    (tmp_path / "vllm.example.toml").write_text("\n".join(f"{k} = {v!r}" for k, v in good.items()) + "\n")
    assert mismatches([patch], tmp_path) == []
    assert good["target"] == "vllm.platforms.cuda.CudaPlatformBase.support_deep_gemm"
    assert good["decision"] == "deepgemm=off|on"
    drifted = {**good, "versions": ">=0.25"}
    (tmp_path / "vllm.example.toml").write_text("\n".join(f"{k} = {v!r}" for k, v in drifted.items()) + "\n")
    assert mismatches([patch], tmp_path) == [
        "vllm.example: versions is '>=0.25' in the record, '>=0.24' in code"]
    (tmp_path / "orphan.toml").write_text("id = 'orphan'\n")
    assert "orphan: record without a declared patch" in mismatches([patch], tmp_path)


def test_every_declared_range_has_the_form_patches_use():
    """Patch.covers reads ">=A" or ">=A,<B" only (cheap at engine start-up); anything else must fail here."""
    from ds_plugins.landscape import in_range
    for patch in declared_patches("vllm") + declared_patches("sglang"):
        in_range(patch.versions, "0.1.0", what=patch.id)  # raises on another form
    import pytest
    with pytest.raises(ValueError, match="unsupported range clause"):
        in_range("~=0.24", "0.24.1")
    assert in_range(">=0.24,<0.25", "0.24.0rc1") and not in_range(">=0.24,<0.25", "0.25.0")

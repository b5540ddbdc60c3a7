"""Each landscape fact, checked against the real source of every version in ci/versions.toml.

The engines cannot be imported on a CPU machine at most of these versions, so
the check reads each official wheel's source by AST (ci/upstream_facts.py).
"""

import ast

import pytest
from packaging.version import Version

from ci import upstream, upstream_facts
from ds_plugins import landscape

pytestmark = pytest.mark.contract

CASES = [(e, v, f) for e, v in upstream.matrix() for f in landscape.facts(e)]


@pytest.mark.parametrize("engine,version,fact", CASES, ids=[f"{e}-{v}-{f.id}-ast" for e, v, f in CASES])
def test_fact_matches_the_wheel_source_ast(engine, version, fact):
    src = upstream.source(engine, version)
    got = upstream_facts.CHECKS[(engine, fact.id)](src)
    assert got == fact.holds(Version(version)), (
        f"{fact.what}: the {engine} {version} wheel says {got}, landscape.py says {fact.versions}"
    )


def test_every_fact_has_a_check_and_every_check_a_fact():
    assert set(upstream_facts.CHECKS) == {(f.engine, f.id) for f in landscape.FACTS}


def test_matrix_covers_each_boundary_from_both_sides():
    """Every edge of a fact's range is a checked version, with a checked version on the other side:
    a boundary is proven by two wheels, not assumed (the oldest checked version is the exception)."""
    from packaging.specifiers import SpecifierSet

    for f in landscape.FACTS:
        matrix = sorted(Version(v) for v in upstream.versions()[f.engine]["matrix"])
        assert any(f.holds(v) for v in matrix), f"{f.engine} {f.id}: no matrix version where it holds"
        for spec in SpecifierSet(f.versions):
            edge = Version(spec.version)
            if spec.operator == ">=" and edge > matrix[0]:
                assert edge in matrix, f"{f.engine} {f.id}: lower edge {edge} is not in the matrix"
                assert any(v < edge for v in matrix)
            elif spec.operator == "<":
                assert edge in matrix, f"{f.engine} {f.id}: upper edge {edge} is not in the matrix"
            else:
                assert spec.operator == ">=", f"unexpected specifier {spec} in {f.id}"


def test_minimum_and_newest_match_the_matrix():
    for engine, spec in upstream.versions().items():
        matrix = sorted(Version(v) for v in spec["matrix"])
        assert str(matrix[-1]) == landscape.NEWEST_TESTED[engine]
        first_with_v4 = next(v for v in matrix if "dsv4_model" in landscape.facts_for(engine, v))
        assert str(first_with_v4) == landscape.MINIMUM[engine]
        assert set(spec["live"]) <= set(spec["matrix"])
        # --no-deps installs: each over a live version that is itself a plain install, never the first
        # (the main environment's own engine)
        over = spec.get("no_deps_over", {})
        assert set(over) <= set(spec["live"][1:]) and set(over.values()) <= set(spec["live"]) - set(over), over


def test_a_moved_seam_is_reported_not_misread(tmp_path):
    """A tree where the gate moved (a future release): the check says so instead of answering False."""
    (tmp_path / "vllm/platforms").mkdir(parents=True)
    (tmp_path / "vllm/platforms/cuda.py").write_text("class SomethingElse:\n    pass\n")
    upstream_facts.parse.cache_clear()
    with pytest.raises(upstream_facts.SeamMissing, match="support_deep_gemm"):
        upstream_facts.vllm_deepgemm_gate_sm12x(tmp_path)
    (tmp_path / "sglang/srt/layers/deep_gemm_wrapper").mkdir(parents=True)
    (tmp_path / "sglang/srt/layers/deep_gemm_wrapper/configurer.py").write_text("ENABLE_JIT_DEEPGEMM = True\n")
    with pytest.raises(upstream_facts.SeamMissing, match="_compute_enable_deep_gemm"):
        upstream_facts.sglang_deepgemm_gate_sm120_guarded(tmp_path)
    assert isinstance(upstream_facts.parse(tmp_path / "vllm/platforms/cuda.py"), ast.Module)


def test_live_versions_install_the_way_versions_toml_says():
    """A live vLLM is a plain install where its wheel pins the CPU torch the environments use, and a
    --no-deps one (no_deps_over) only where it pins another: read from each wheel's own metadata."""
    from ci.envs import TORCH

    ours = TORCH.split("==")[1]
    spec = upstream.versions()["vllm"]
    over = spec.get("no_deps_over", {})
    pins = {v: upstream.wheel_pins(upstream.source("vllm", v))["torch"] for v in spec["live"]}
    for v, pin in pins.items():
        if v in over:
            assert pin != ours and pins[over[v]] == ours, (v, pin, over[v], pins[over[v]])
        else:
            assert pin == ours, f"vLLM {v} pins torch {pin}: list it in no_deps_over or drop it from live"

"""Every ds-plugins vLLM patch, checked against the source of every vLLM wheel it declares it covers (AST).

The patches (ds_plugins/vllm/patches.py) check their target at run time, on a GPU machine; these tests read
the official wheels (ci/upstream.py) so a version range that claims too much, or a seam that moved, shows up
on a CPU machine before a user meets a skipped patch. The checks live in ci/vllm_seams.py.
"""

from __future__ import annotations

import ast

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ci import upstream, vllm_seams
from ci.upstream_facts import parse
from ds_plugins.vllm.dsv4 import routes
from ds_plugins.vllm.patches import PATCHES

pytestmark = pytest.mark.contract

FIRST = Version("0.20")  # the oldest vLLM ds-plugins patches (V4 appears in 0.20)
VERSIONS = [v for v in upstream.versions()["vllm"]["matrix"] if Version(v) >= FIRST]
CASES = [(v, p) for v in VERSIONS for p in PATCHES if p.covers(v)]

# Route sites that are one seam moving between modules across releases: each version has exactly one.
FAMILIES = {
    "decode": ("vllm.route.decode_legacy", "vllm.route.decode"),
    "prefill": ("vllm.route.prefill_legacy", "vllm.route.prefill"),
    "o_proj_einsum": ("vllm.route.o_proj_einsum_legacy", "vllm.route.o_proj_einsum_op", "vllm.route.o_proj_einsum"),
}
ROUTE_BY_ID = {r.id: r for r in routes.ROUTES}
WRAPPERS = {
    routes.SELECTOR.id: (routes.SELECTOR, vllm_seams.selector_prefers_sm120),
    routes.TILE_SCHEDULER.id: (routes.TILE_SCHEDULER, vllm_seams.tile_scheduler_skips_sm120),
}


@pytest.mark.parametrize("version,patch", CASES, ids=[f"vllm-{v}-{p.id}-ast" for v, p in CASES])
def test_patch_finds_its_seam_in_the_wheel_ast(version, patch):
    problem = vllm_seams.check_patch(upstream.source("vllm", version), patch)
    assert problem is None, f"vLLM {version}, patch {patch.id} ({patch.target}, {patch.versions}): {problem}"


def test_every_vllm_patch_has_a_contract_and_some_version():
    for patch in PATCHES:
        assert vllm_seams.has_contract(patch), f"{patch.id}: add its AST check to ci/vllm_seams.py"
        assert any(patch.covers(v) for v in VERSIONS), f"{patch.id} ({patch.versions}) covers no matrix version"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_version_routes_a_moving_site_exactly_once_ast(family):
    """Each matrix version is covered by exactly one site of the family, and the sites outside their range
    have no call there (so the one routed site is the only one vLLM calls)."""
    ids = FAMILIES[family]
    assert set(ids) <= set(ROUTE_BY_ID), f"unknown route ids in {ids}"
    for version in VERSIONS:
        covering = [i for i in ids if SpecifierSet(ROUTE_BY_ID[i].versions).contains(version, prereleases=True)]
        assert len(covering) == 1, f"vLLM {version}: {family} is routed by {covering or 'no site'}"
        src = upstream.source("vllm", version)
        for other in set(ids) - set(covering):
            route = ROUTE_BY_ID[other]
            try:
                path, tree = vllm_seams.tree_of(src, route.module)
            except vllm_seams.SeamMismatch:
                continue
            live = vllm_seams.name_calls(tree, route.attribute)
            assert not live, (
                f"vLLM {version}: {vllm_seams.rel(src, path)}:{live[0].lineno} calls "
                f"{route.attribute}, but {other} ({route.versions}) does not cover {version}"
            )


@pytest.mark.parametrize("patch_id", sorted(WRAPPERS))
def test_wrapper_range_starts_where_the_behaviour_starts_ast(patch_id):
    """Below a wrapper's range vLLM does not have the behaviour it corrects; its lower edge is a matrix version
    (the need is proven by the wheel on each side)."""
    patch, behaviour = WRAPPERS[patch_id]
    below = [v for v in VERSIONS if not patch.covers(v)]
    for version in below:
        assert not behaviour(upstream.source("vllm", version), patch), (
            f"vLLM {version} already has what {patch.id} corrects ({patch.target}), but its range is {patch.versions}"
        )
    lower = [Version(s.version) for s in SpecifierSet(patch.versions) if s.operator == ">="]
    assert len(lower) == 1 and lower[0] in {Version(v) for v in VERSIONS}, (
        f"{patch.id}: lower edge of {patch.versions} is not a matrix version"
    )
    assert below, f"{patch.id}: no matrix version below {patch.versions} shows the need starts there"


# --- the checks themselves fail on a seam that moved (synthetic trees, not engine imitations) ---------------


def _tree(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    parse.cache_clear()
    return tmp_path


def test_a_call_with_a_keyword_the_adapter_lacks_is_named(tmp_path):
    route = next(r for r in routes.ROUTES if r.id == "vllm.route.indexer_paged_logits")
    src = _tree(
        tmp_path,
        {
            "vllm/model_executor/layers/sparse_attn_indexer.py": (
                "from vllm.utils.deep_gemm import fp8_fp4_paged_mqa_logits\n"
                "def f():\n    fp8_fp4_paged_mqa_logits(1, 2, 3, 4, 5, 6, 7, shiny=True)\n"
            ),
            "vllm/utils/deep_gemm.py": "def fp8_fp4_paged_mqa_logits(*args, **kwargs):\n    pass\n",
        },
    )
    with pytest.raises(vllm_seams.SeamMismatch, match=r"sparse_attn_indexer.py:3: .*keyword shiny"):
        vllm_seams.check_route(src, route)


def test_an_original_taking_more_than_the_adapter_is_named(tmp_path):
    route = next(r for r in routes.ROUTES if r.id == "vllm.route.indexer_schedule")
    src = _tree(
        tmp_path,
        {
            "vllm/v1/attention/backends/mla/indexer.py": (
                "from vllm.utils.deep_gemm import get_paged_mqa_logits_metadata\n"
                "get_paged_mqa_logits_metadata(1, 2, 3)\n"
            ),
            "vllm/utils/deep_gemm.py": (
                "def get_paged_mqa_logits_metadata(context_lens, block_size, num_sms, extra):\n    pass\n"
            ),
        },
    )
    with pytest.raises(vllm_seams.SeamMismatch, match=r"deep_gemm.py:1: def get_paged_mqa_logits_metadata: .*extra"):
        vllm_seams.check_route(src, route)


def test_the_varlen_original_picks_the_varlen_adapter(tmp_path):
    route = next(r for r in routes.ROUTES if r.id == "vllm.route.indexer_logits")
    src = _tree(
        tmp_path,
        {
            "vllm/model_executor/layers/sparse_attn_indexer.py": (
                "from vllm.utils.deep_gemm import fp8_fp4_mqa_logits\nfp8_fp4_mqa_logits(1, 2, 3, 4, 5, 6)\n"
            ),
            "vllm/utils/deep_gemm.py": "def fp8_fp4_mqa_logits(q, kv, weights, ks, ke, max_seqlen_k):\n    pass\n",
        },
    )
    assert vllm_seams.route_adapter(src, route) == "fp8_fp4_mqa_logits_varlen"
    (src / "vllm/utils/deep_gemm.py").write_text(
        "def fp8_fp4_mqa_logits(q, kv, weights, ks, ke, clean_logits):\n    pass\n"
    )
    parse.cache_clear()
    assert vllm_seams.route_adapter(src, route) == "fp8_fp4_mqa_logits"


def test_a_site_nobody_calls_is_reported(tmp_path):
    route = next(r for r in routes.ROUTES if r.id == "vllm.route.indexer_schedule")
    src = _tree(
        tmp_path,
        {
            "vllm/v1/attention/backends/mla/indexer.py": (
                "from vllm.utils.deep_gemm import get_paged_mqa_logits_metadata\n"
            ),
            "vllm/utils/deep_gemm.py": "def get_paged_mqa_logits_metadata(*args):\n    pass\n",
        },
    )
    with pytest.raises(vllm_seams.SeamMismatch, match="nothing in the wheel calls get_paged_mqa_logits_metadata"):
        vllm_seams.check_route(src, route)


def test_a_moved_or_reshaped_target_is_named(tmp_path):
    from ds_plugins.vllm.dsv4 import deepgemm_gate

    src = _tree(
        tmp_path,
        {"vllm/platforms/cuda.py": "class CudaPlatformBase:\n    def support_deep_gemm(self):\n        return True\n"},
    )
    assert "cuda.py:2" in vllm_seams.check_patch(src, deepgemm_gate.PLATFORM_OFF)
    assert "not decorated @classmethod" in vllm_seams.check_patch(src, deepgemm_gate.PLATFORM_OFF)
    (src / "vllm/platforms/cuda.py").write_text("class CudaPlatform:\n    pass\n")
    parse.cache_clear()
    assert "CudaPlatformBase is not bound" in vllm_seams.check_patch(src, deepgemm_gate.PLATFORM_OFF)
    assert "vllm/utils/deep_gemm.py" in vllm_seams.check_patch(src, deepgemm_gate.UTILS_OFF)


def test_stand_in_has_the_wheel_signature():
    fn = ast.parse("def f(a, b: int = 3, *, c=None, **kw) -> int:\n    return 1\n").body[0]
    assert routes.parameters(vllm_seams.stand_in(fn)) == ("a", "b", "c")
    fn = ast.parse("def f(a, *args):\n    pass\n").body[0]
    assert routes.parameters(vllm_seams.stand_in(fn)) is None

"""The SGLang verdicts the path manifest (ds_plugins/paths/sglang.py) gives, per matrix version and device
class, with the stock libraries each wheel pins (ds_plugins.stock, as `doctor --simulate` uses them).
Expectations are written out by hand from the wheels (see the rows' evidence), not computed."""

import pytest
from packaging.version import Version

from ci import upstream
from ds_plugins import paths, stock
from ds_plugins.policy import decide
from ds_plugins.probe import Device, Library, Probe

CAPS = {"sm120": (12, 0), "sm121": (12, 1), "sm90": (9, 0)}
S, X = "supported", "unsupported"
# version: {device: (status, deepgemm, sparse_mla)} with the stock pins
EXPECTED = {
    "0.5.12": {"sm120": (X, X, X), "sm121": (X, X, X), "sm90": (S, "upstream", "upstream")},
    "0.5.13": {
        "sm120": (S, "upstream", "upstream"),
        "sm121": (S, "off", "upstream"),
        "sm90": (S, "upstream", "upstream"),
    },
    "0.5.15": {"sm120": (S, "upstream", "triton"), "sm121": (S, "off", "triton"), "sm90": (S, "upstream", "upstream")},
    "0.5.19": {
        "sm120": (S, "upstream", "upstream"),
        "sm121": (S, "upstream", "upstream"),
        "sm90": (S, "upstream", "upstream"),
    },
    "0.5.21": {
        "sm120": (S, "upstream", "upstream"),
        "sm121": (S, "upstream", "upstream"),
        "sm90": (S, "upstream", "upstream"),
    },
    "0.5.23": {
        "sm120": (S, "upstream", "upstream"),
        "sm121": (S, "upstream", "upstream"),
        "sm90": (S, "upstream", "upstream"),
    },
}
CASES = [(v, d, e) for v, row in EXPECTED.items() for d, e in row.items()]


def probe(version: str, device: str, libs=None) -> Probe:
    libraries = dict(stock.libraries("sglang", version)) if libs is None else libs
    return Probe("3.11", {"sglang": version}, "2.13.0", None, (Device("cuda", 0, device, CAPS[device]),), "", libraries)


@pytest.mark.parametrize("version,device,expected", CASES, ids=[f"{v}-{d}" for v, d, _ in CASES])
def test_verdict_with_the_stock_libraries(version, device, expected):
    plan = decide(probe(version, device), "sglang", env={})
    assert (plan.status, plan.value("deepgemm"), plan.value("sparse_mla")) == expected, plan.status_reason
    # doctor's verdict is the manifest's: supported exactly where no blocker row is left uncovered
    left = paths.blockers("sglang", version, CAPS[device], {d.id: d.value for d in plan.decisions})
    assert bool(left) == (plan.status == X)


def test_0512_says_which_kernel_and_what_to_upgrade_to():
    plan = decide(probe("0.5.12", "sm121"), "sglang", env={})
    assert plan.status_reason.startswith("unsupported on SM121 with SGLang 0.5.12: MXFP4 expert MoE")
    assert plan.status_reason.endswith("upgrade to SGLang >= 0.5.13")
    assert "(and 4 more)" in plan.status_reason
    # What is left uncovered with the plan's own decisions (indexer=triton covers the indexer logits and the
    # mHC prenorm rows): the MoE, top-k v2 and the three `flash_mla` attention rows.
    values = {"deepgemm": "off", "sparse_mla": "triton", "indexer": "triton"}
    left = paths.blockers("sglang", "0.5.12", CAPS["sm121"], values)
    assert [(r.stage, r.provider) for r in left.rows] == [
        ("moe", "marlin"),
        ("topk", "engine_c"),
        ("decode", "flash_mla"),
        ("prefill", "flash_mla"),
        ("mtp", "flash_mla"),
    ]
    assert len(paths.blockers("sglang", "0.5.12", CAPS["sm121"], {}).rows) == 7  # + indexer logits, mHC prenorm


def test_forcing_our_kernels_cannot_make_0512_supported():
    plan = decide(
        probe("0.5.12", "sm120"), "sglang", env={"DS_PLUGINS_SPARSE_MLA": "triton", "DS_PLUGINS_INDEXER": "triton"}
    )
    assert plan.status == X


def test_0515_without_its_sparse_mla_cover_is_blocked():
    """The 0.5.15 blockers are covered only by sparse_mla=triton: DS_PLUGINS_SPARSE_MLA=upstream leaves them."""
    plan = decide(probe("0.5.15", "sm120"), "sglang", env={"DS_PLUGINS_SPARSE_MLA": "upstream"})
    assert plan.status == X and "FlashMLA sparse prefill" in plan.status_reason
    assert plan.status_reason.endswith("upgrade to SGLang >= 0.5.19")


def test_0521_gate_is_decided_by_the_kernel_files_not_the_names():
    """sgl-deep-gemm 0.1.0 defines the SM12x names SGLang 0.5.21+ probes, without the kernels."""
    old = {"deep_gemm": Library("deep_gemm", True, "0.1.0", "/site/deep_gemm", ())}
    for version in ("0.5.21", "0.5.23"):
        for device in ("sm120", "sm121"):
            plan = decide(probe(version, device, old), "sglang", env={})
            assert plan.status == S and plan.value("deepgemm") == "off", plan.decision("deepgemm").reason
    pinned = stock.libraries("sglang", "0.5.23")
    assert pinned["deep_gemm"].has("sm12x")  # the pin itself has them: SGLang's gate decides


def test_every_matrix_version_from_the_minimum_has_a_verdict_here():
    matrix = [v for v in upstream.versions()["sglang"]["matrix"] if Version(v) >= Version("0.5.12")]
    assert set(matrix) - set(EXPECTED) <= {"0.5.20"}  # 0.5.20 behaves as 0.5.19 on every row

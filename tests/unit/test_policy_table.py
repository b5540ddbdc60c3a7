"""Table-driven policy tests: every engine version of the upstream landscape (its researched rows) on
SM90, SM100, SM120, SM121, Ascend and CPU.

The expectations are written out by hand from the landscape (not computed by
the code under test). Library scenario for the table: the installed DeepGEMM
has no SM12x kernels (the `Unknown SF transformation` case) and FlashInfer has
its SM120 sparse-MLA decode.
"""

import pytest

from ds_plugins.policy import DECISION_IDS, decide
from ds_plugins.probe import Device, Library, Probe

DEVICES = {
    "SM90": [Device("cuda", 0, "H100", (9, 0))],
    "SM100": [Device("cuda", 0, "B200", (10, 0))],
    "SM120": [Device("cuda", 0, "RTX PRO 6000", (12, 0))],
    "SM121": [Device("cuda", 0, "GB10", (12, 1))],
    "Ascend": [Device("npu", 0, "Ascend NPU")],
    "CPU": [],
}

STOCK_LIBS = {
    "deep_gemm": Library("deep_gemm", True, "2.1.0", "/site/deep_gemm", ()),
    "flashinfer": Library("flashinfer", True, "0.6.18", "/site/flashinfer", ("sm120_sparse_mla",)),
}


def make_probe(engine, version, device, libs=STOCK_LIBS):
    return Probe("3.11", {engine: version}, "2.13.0", None, tuple(DEVICES[device]), "", dict(libs))


U, T, O, D = "upstream", "triton", "off", "ds_plugins"
X = "unsupported"
ALL_X = (X, X, X, X)
ASIDE = (U, U, U, U)

# (engine, version): {device: (deepgemm, sparse_mla, indexer, dsv4_model)}
TABLE = {
    # vLLM 0.19.x and older: no DeepSeek-V4 code.
    ("vllm", "0.19.1"): dict.fromkeys(DEVICES, ALL_X),
    # 0.20-0.24: FlashMLA only, DeepGEMM gate SM90/SM100 -> our Triton path on SM12x, gate already off.
    ("vllm", "0.20.2"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (U, T, T, D), "SM121": (U, T, T, D)},
    ("vllm", "0.22.1"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (U, T, T, D), "SM121": (U, T, T, D)},
    # 0.25+ (0.24+ by the wheels): FlashInfer SM120 sparse MLA upstream; the gate claims DeepGEMM on SM12x -> off
    # (no SM12x kernels installed), and the indexer (DeepGEMM MQA logits) goes to Triton.
    ("vllm", "0.25.0"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (O, U, T, D), "SM121": (O, U, T, D)},
    ("vllm", "0.28.0"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (O, U, T, D), "SM121": (O, U, T, D)},
    ("vllm", "0.30.0"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (O, U, T, D), "SM121": (O, U, T, D)},
    ("vllm", "0.33.0"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (O, U, T, D), "SM121": (O, U, T, D)},
    # SGLang before 0.5.12: no DeepSeek-V4.
    ("sglang", "0.5.10"): dict.fromkeys(DEVICES, ALL_X),
    ("sglang", "0.5.11"): dict.fromkeys(DEVICES, ALL_X),
    # 0.5.12: unsupported on SM12x (path manifest: no MXFP4 MoE runner, top-k v2 over SM120's shared memory,
    # attention through a flash_mla package no dependency provides): upgrade to 0.5.13.
    ("sglang", "0.5.12"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": ALL_X, "SM121": ALL_X},
    # 0.5.15: own SM12x path (since 0.5.13), but sparse prefill on FlashMLA by default and a FlashInfer decode
    # the pinned FlashInfer lacks -> Triton attention; the gate excludes SM120 but not SM121.
    ("sglang", "0.5.15"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (U, T, U, U), "SM121": (O, T, U, U)},
    # 0.5.23: probes DeepGEMM's SM12x names itself (since 0.5.21), which a DeepGEMM without the kernels
    # passes: ds-plugins' kernel-file probe holds it off.
    ("sglang", "0.5.23"): {**dict.fromkeys(DEVICES, ASIDE), "SM120": (O, U, U, U), "SM121": (O, U, U, U)},
}

CASES = [(e, v, dev, exp) for (e, v), row in TABLE.items() for dev, exp in row.items()]


@pytest.mark.parametrize("engine,version,device,expected", CASES, ids=[f"{e}-{v}-{d}" for e, v, d, _ in CASES])
def test_landscape_row(engine, version, device, expected):
    plan = decide(make_probe(engine, version, device), engine, env={})
    got = tuple(plan.value(i) for i in ("deepgemm", "sparse_mla", "indexer", "dsv4_model"))
    assert got == expected, [f"{d.id}={d.value}: {d.reason}" for d in plan.decisions]
    assert tuple(d.id for d in plan.decisions) == DECISION_IDS
    for d in plan.decisions:
        assert d.reason and "\n" not in d.reason  # one line each
    if expected == ALL_X:
        assert plan.status == "unsupported"
        minimum = "0.20.0" if engine == "vllm" else "0.5.12"
        # before the engine's V4 minimum, or a version the path manifest blocks on this GPU
        assert f">= {minimum}" in plan.status_reason or "upgrade to" in plan.status_reason
    else:
        assert plan.status == "supported"
    # cudagraph follows the ds-plugins kernel path
    uses_triton = T in expected[1:3]
    assert plan.value("cudagraph") == ("on" if uses_triton else X if expected == ALL_X else U)
    # the other two, written out from what each engine offers (STOCK_LIBS has no mooncake, no vllm-ascend)
    if expected == ALL_X:
        assert (plan.value("ascend_quant"), plan.value("mooncake_connector")) == (X, X)
    elif engine == "vllm":  # the msModelSlim loader is offered wherever vLLM has V4; mooncake not installed
        assert (plan.value("ascend_quant"), plan.value("mooncake_connector")) == (D, "unavailable")
    else:  # SGLang brings its own of both
        assert (plan.value("ascend_quant"), plan.value("mooncake_connector")) == (U, U)
    # never change SM90/SM100 by default (offering --quantization ascend changes nothing until asked for)
    if device in ("SM90", "SM100"):
        assert [d.id for d in plan.decisions if d.active] in ([], ["ascend_quant"])


def test_every_landscape_row_is_in_the_table():
    # The landscape's rows (vLLM: 0.19.x, 0.20.2, 0.22.1, 0.25.0, 0.28.0, 0.30.0, 0.33.0;
    # SGLang: 0.5.10, 0.5.11, 0.5.12, 0.5.15, 0.5.23) on the six device kinds.
    assert {(e, v) for e, v in TABLE} == {
        ("vllm", v) for v in ("0.19.1", "0.20.2", "0.22.1", "0.25.0", "0.28.0", "0.30.0", "0.33.0")
    } | {("sglang", v) for v in ("0.5.10", "0.5.11", "0.5.12", "0.5.15", "0.5.23")}
    assert all(set(row) == set(DEVICES) for row in TABLE.values())


# --- library variations ------------------------------------------------------------


def libs(**spec):
    out = {}
    for name, features in spec.items():
        real = name.replace("__", ".")
        out[real] = Library(real, features is not None, "x", f"/site/{real}", tuple(features or ()))
    return out


def test_vllm_025_sm120_with_sm12x_deepgemm_and_flashinfer_steps_aside():
    probe = make_probe("vllm", "0.25.0", "SM120", libs(deep_gemm=["sm12x"], flashinfer=["sm120_sparse_mla"]))
    plan = decide(probe, "vllm", env={})
    assert [plan.value(i) for i in ("deepgemm", "sparse_mla", "indexer", "dsv4_model", "cudagraph")] == [
        "upstream",
        "upstream",
        "upstream",
        "upstream",
        "upstream",
    ]


def test_vllm_uses_vendored_deepgemm_when_site_packages_has_none():
    vendored_ok = libs(vllm__third_party__deep_gemm=["sm12x"], flashinfer=["sm120_sparse_mla"])
    plan = decide(make_probe("vllm", "0.30.0", "SM120", vendored_ok), "vllm", env={})
    assert plan.value("deepgemm") == "upstream" and plan.value("indexer") == "upstream"
    vendored_old = libs(vllm__third_party__deep_gemm=[], flashinfer=["sm120_sparse_mla"])
    plan = decide(make_probe("vllm", "0.30.0", "SM120", vendored_old), "vllm", env={})
    assert plan.value("deepgemm") == "off"
    assert "vllm.third_party.deep_gemm" in plan.decision("deepgemm").reason
    assert "Unknown SF transformation" in plan.decision("deepgemm").reason
    # site-packages DeepGEMM wins over the vendored one, as vLLM's _import_deep_gemm does
    both = libs(deep_gemm=[], vllm__third_party__deep_gemm=["sm12x"], flashinfer=["sm120_sparse_mla"])
    assert decide(make_probe("vllm", "0.30.0", "SM120", both), "vllm", env={}).value("deepgemm") == "off"


def test_no_deepgemm_installed_means_nothing_to_gate():
    plan = decide(make_probe("vllm", "0.30.0", "SM120", libs(flashinfer=["sm120_sparse_mla"])), "vllm", env={})
    assert plan.value("deepgemm") == "upstream"
    assert "no DeepGEMM" in plan.decision("deepgemm").reason
    assert plan.value("indexer") == "triton"


def test_vllm_025_without_flashinfer_sm120_uses_triton_attention():
    for flashinfer in ([], None):
        probe = make_probe("vllm", "0.25.0", "SM121", libs(deep_gemm=["sm12x"], flashinfer=flashinfer))
        plan = decide(probe, "vllm", env={})
        assert plan.value("sparse_mla") == "triton"
        assert plan.value("dsv4_model") == "ds_plugins"


def test_sglang_gate_rows_respect_installed_deepgemm():
    ok = libs(deep_gemm=["sm12x"])
    assert decide(make_probe("sglang", "0.5.13", "SM121", ok), "sglang", env={}).value("deepgemm") == "upstream"
    assert decide(make_probe("sglang", "0.5.15", "SM121", ok), "sglang", env={}).value("deepgemm") == "upstream"
    # SGLang reads site-packages deep_gemm only: a vLLM-vendored copy is irrelevant
    vendored = libs(vllm__third_party__deep_gemm=[])
    assert decide(make_probe("sglang", "0.5.13", "SM121", vendored), "sglang", env={}).value("deepgemm") == "upstream"


def test_versions_between_rows_and_after_the_newest():
    sm120 = STOCK_LIBS
    # boundaries found by reading every wheel (ci/versions.toml holds them, the contract tests check them)
    assert decide(make_probe("vllm", "0.23.0", "SM120", sm120), "vllm", env={}).value("sparse_mla") == "triton"
    assert decide(make_probe("vllm", "0.24.0", "SM120", sm120), "vllm", env={}).value("sparse_mla") == "upstream"
    assert decide(make_probe("vllm", "0.24.0", "SM121", sm120), "vllm", env={}).value("deepgemm") == "off"
    plan = decide(make_probe("vllm", "0.34.0", "SM120", sm120), "vllm", env={})
    assert plan.status == "supported" and "newer than the newest tested (0.33.0)" in plan.status_reason
    assert plan.value("deepgemm") == "off"
    dev = decide(make_probe("vllm", "0.26.1rc1.dev1219+g0123abc", "SM121", sm120), "vllm", env={})
    assert dev.status == "supported" and dev.value("sparse_mla") == "upstream"
    rc = decide(make_probe("vllm", "0.20.0rc1", "SM120", sm120), "vllm", env={})
    assert rc.status == "supported"
    old = decide(make_probe("sglang", "0.5.12", "SM121", sm120), "sglang", env={})
    assert old.status == "unsupported" and "upgrade to SGLang >= 0.5.13" in old.status_reason
    assert decide(make_probe("sglang", "0.5.13", "SM121", sm120), "sglang", env={}).value("sparse_mla") == "upstream"
    assert decide(make_probe("sglang", "0.5.13", "SM120", sm120), "sglang", env={}).value("deepgemm") == "upstream"
    assert decide(make_probe("sglang", "0.5.20", "SM121", sm120), "sglang", env={}).value("deepgemm") == "off"
    assert decide(make_probe("sglang", "0.5.21", "SM121", sm120), "sglang", env={}).value("deepgemm") == "off"


def test_absent_engine():
    plan = decide(make_probe("vllm", "0.30.0", "SM120"), "sglang", env={})
    assert plan.status == "absent" and not plan.acting


def test_mixed_gpus_decide_for_gpu0_and_say_so():
    probe = Probe(
        "3.11",
        {"vllm": "0.22.1"},
        None,
        None,
        (Device("cuda", 0, "RTX PRO 6000", (12, 0)), Device("cuda", 1, "H100", (9, 0))),
        "",
        {},
    )
    plan = decide(probe, "vllm", env={})
    assert plan.value("sparse_mla") == "triton"
    assert "mixed capabilities" in plan.target


def test_other_cuda_archs_are_not_targets():
    probe = Probe("3.11", {"vllm": "0.22.1"}, None, None, (Device("cuda", 0, "L40S", (8, 9)),), "", {})
    plan = decide(probe, "vllm", env={})
    assert plan.value("sparse_mla") == "upstream" and "SM89" in plan.decision("sparse_mla").reason

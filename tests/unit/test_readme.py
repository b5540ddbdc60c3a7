"""The README says what the code does: switches, decisions, the test command, the figures."""

import json
import re
from pathlib import Path

from ds_plugins import doctor
from ds_plugins.policy import DECISION_IDS
from ds_plugins.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
EVIDENCE = (ROOT / "docs" / "evidence.md").read_text()


def test_switch_table_is_the_settings_table():
    rows = [line for line in README.splitlines() if line.startswith("| `DS_PLUGINS_")]
    parsed = []
    for row in rows:
        name, values, default, meaning = [c.strip() for c in row.strip("|").split(" | ")]
        parsed.append((name.strip("`"), values, default, meaning))
    expected = [
        (
            s.name,
            ", ".join(f"`{c}`" for c in s.choices) if s.choices else "text",
            f"`{s.default}`" if s.default else "(unset)",
            s.help,
        )
        for s in SETTINGS
    ]
    assert parsed == expected


def test_decision_ids_are_documented():
    listed = re.search(r"The decisions \(([^)]*)\)", README, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(DECISION_IDS)


def test_exit_codes_are_documented():
    assert (doctor.EXIT_OK, doctor.EXIT_CONFIG, doctor.EXIT_UNSUPPORTED, doctor.EXIT_USAGE) == (0, 1, 2, 64)
    text = " ".join(README.split())
    assert "Doctor's exit status: 0 supported, 1 a bad `DS_PLUGINS_*` setting" in text
    assert "2 unsupported" in text and "64 a usage error" in text
    from ds_plugins.kernels import selftest

    assert (selftest.EXIT_OK, selftest.EXIT_MISMATCH, selftest.EXIT_CANNOT_RUN) == (0, 1, 2)
    assert "`selftest` exits 0 when every kernel matches, 1 when one does not, 2 when it cannot run here" in text


def test_ci_runs_exactly_the_readme_test_command():
    assert "```bash\npython3 ci/test.py\n```" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec python3 ci/test.py\n" in ci


def test_startup_figures_are_the_committed_bench_results():
    README = EVIDENCE  # the figures live with the rest of the evidence
    data = json.loads((ROOT / "bench/results/startup-cpu.json").read_text())
    vllm = data["vllm_load_general_plugins"]
    sgl = data["sglang_import_with_hook_shared_imports_preloaded"]
    sgl_all = data["sglang_import_with_hook"]
    start = data["python_start_with_hook"]
    assert (
        f"| {vllm['with_ms']:.1f} ms | {vllm['without_ms']:.1f} ms | {vllm['ratio']:.2f} | {vllm['ours_ms']:.1f} ms |"
    ) in README
    assert f"{sgl['ours_ms']:.1f} ms ({sgl_all['ours_ms']:.1f} ms counting imports SGLang makes anyway)" in README
    assert (
        f"| {start['with_ms']:.1f} ms | {start['without_ms']:.1f} ms | {start['ratio']:.2f} | "
        f"{start['added_ms']:.1f} ms added |"
    ) in README
    assert f"{data['runs']} paired runs" in README
    for s in (vllm, sgl, sgl_all, start):
        assert s["heavy_modules_added_by_ds_plugins"] == []


def _startup_line(engine, version, device, libs):
    """The line registration logs in a process of that machine, with every selected patch armed (what
    it logs at plugin time, before the engine imports the patched modules)."""
    from ds_plugins import patching, registration
    from ds_plugins.policy import decide
    from ds_plugins.probe import Probe

    probe = Probe("3.11", {engine: version}, None, None, (device,), "", libs)
    plan = decide(probe, engine, env={})
    declared = doctor.declared_patches(engine)
    armed = [patching.Outcome(p.id, "armed") for p in declared if p.selected_by(plan) and p.covers(version)]
    return registration.summary(plan, declared, armed, doctor.adapter_carriers(engine))


def _example(marker):
    block = README.split(f"<!-- startup-example:{marker} -->\n```\n", 1)[1]
    return block.split("\n```", 1)[0]


def test_startup_line_examples_are_what_the_code_logs():
    from ds_plugins.probe import Device, Library

    pro6000 = Device("cuda", 0, "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", (12, 0))
    vendored = {"vllm.third_party.deep_gemm": Library("vllm.third_party.deep_gemm", True, "0.22.1", None, ())}
    assert _example("vllm") == _startup_line("vllm", "0.22.1", pro6000, vendored)
    spark = Device("cuda", 0, "NVIDIA GB10", (12, 1))
    no_sm12x = {"deep_gemm": Library("deep_gemm", True, "2.1.0", None, ())}
    assert _example("sglang") == _startup_line("sglang", "0.5.15", spark, no_sm12x)


def test_readme_links_resolve():
    for target in re.findall(r"\]\(((?:docs|patches|ci)/[^)#]*)\)", README):
        assert (ROOT / target).exists(), target
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", README, re.M)}
    for anchor in re.findall(r"\]\(#([^)]*)\)", README):
        assert anchor in anchors, anchor


def test_known_failure_table_is_generated_from_the_records():
    from ds_plugins import explain

    block = README.split("<!-- known-failures:start -->\n", 1)[1].split("<!-- known-failures:end -->", 1)[0]
    assert block.strip() == explain.markdown_table().strip()


def _readme_versions(cell: str, matrix: list[str]) -> list[str]:
    """The matrix versions a first-column cell ("0.20 - 0.23", "0.25", "0.30 - 0.33") names."""
    from packaging.version import Version

    lo, _, hi = cell.partition(" - ")
    hi = hi or lo
    minor = lambda v: Version(".".join(v.split(".")[:2]))  # noqa: E731
    return [v for v in matrix if minor(lo) <= minor(v) <= minor(hi)]


def test_vllm_version_table_is_what_the_policy_decides_with_stock_libraries():
    from ci import upstream
    from ds_plugins import effects, stock
    from ds_plugins.policy import decide
    from ds_plugins.probe import Device, Probe

    matrix = [v for e, v in upstream.matrix() if e == "vllm"]
    block = README.split("<!-- vllm-versions:start -->\n", 1)[1].split("<!-- vllm-versions:end -->", 1)[0]
    seen = []
    for row in block.splitlines()[2:]:
        cell, verdict, what = [c.strip() for c in row.strip("|").split(" | ")]
        listed = set(re.findall(r"`(\w+=\w+)`", what))
        for version in _readme_versions(cell, matrix):
            seen.append(version)
            for capability in ((12, 0), (12, 1)):
                probe = Probe(
                    "",
                    {"vllm": version},
                    None,
                    None,
                    (Device("cuda", 0, "gpu", capability),),
                    "",
                    stock.libraries("vllm", version),
                    simulated=True,
                )
                plan = decide(probe, "vllm", env={})
                assert verdict == plan.status, (version, capability, plan.status_reason)
                changes = {
                    f"{d.id}={d.value}" for d in plan.decisions if effects.effect(d.id, d.value).kind == effects.CHANGES
                }
                assert listed == changes, (version, capability)
    from ds_plugins.landscape import MINIMUM
    from packaging.version import Version

    assert seen == [v for v in matrix if Version(v) >= Version(MINIMUM["vllm"])], "every vLLM with V4 has a row"

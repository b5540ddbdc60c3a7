"""The README says what the code does: switches, decisions, the test command, the figures."""

import json
import re
from pathlib import Path

from ds_plugins import doctor
from ds_plugins.policy import DECISION_IDS
from ds_plugins.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_switch_table_is_the_settings_table():
    rows = [line for line in README.splitlines() if line.startswith("| `DS_PLUGINS_")]
    parsed = []
    for row in rows:
        name, values, default, meaning = [c.strip() for c in row.strip("|").split(" | ")]
        parsed.append((name.strip("`"), values, default, meaning))
    expected = [(s.name, ", ".join(f"`{c}`" for c in s.choices) if s.choices else "text",
                 f"`{s.default}`" if s.default else "(unset)", s.help) for s in SETTINGS]
    assert parsed == expected


def test_decision_ids_are_documented():
    listed = re.search(r"The decisions \(([^)]*)\)", README, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(DECISION_IDS)


def test_exit_codes_are_documented():
    assert (doctor.EXIT_OK, doctor.EXIT_CONFIG, doctor.EXIT_UNSUPPORTED) == (0, 1, 2)
    assert "Exit status: 0 supported, 1 a bad" in README and "2 unsupported" in README


def test_ci_runs_exactly_the_readme_test_command():
    assert "```bash\npython3 ci/test.py\n```" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec python3 ci/test.py\n" in ci


def test_startup_figures_are_the_committed_bench_results():
    data = json.loads((ROOT / "bench/results/startup-cpu.json").read_text())
    vllm = data["vllm_load_general_plugins"]
    sgl = data["sglang_import_with_hook_shared_imports_preloaded"]
    sgl_all = data["sglang_import_with_hook"]
    start = data["python_start_with_hook"]
    assert f"| {vllm['with_ms']:.1f} ms | {vllm['without_ms']:.1f} ms | {vllm['ratio']:.2f} | {vllm['ours_ms']:.1f} ms |" in README
    assert f"{sgl['ours_ms']:.1f} ms ({sgl_all['ours_ms']:.1f} ms counting imports SGLang makes anyway)" in README
    assert f"| {start['with_ms']:.1f} ms | {start['without_ms']:.1f} ms | {start['ratio']:.2f} | {start['added_ms']:.1f} ms added |" in README
    assert f"{data['runs']} paired runs" in README
    for s in (vllm, sgl, sgl_all, start):
        assert s["heavy_modules_added_by_ds_plugins"] == []

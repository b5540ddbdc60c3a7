import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_plugins import cli


def run(capsys, *argv, env=None, monkeypatch=None):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_simulate_the_issue_example(capsys):
    code, out, _ = run(
        capsys,
        "doctor",
        "--simulate",
        "--engine",
        "vllm==0.22.1",
        "--capability",
        "12.0",
        "--lib",
        "deep_gemm=no-sm12x",
    )
    assert code == 0
    assert "(simulated environment)" in out
    lines = {
        line.split()[0]: line.split()[1]
        for line in out.splitlines()
        if line.startswith("  ")
        and line.split()
        and line.split()[0] in ("deepgemm", "sparse_mla", "indexer", "dsv4_model", "cudagraph")
    }
    assert lines == {
        "deepgemm": "upstream",
        "sparse_mla": "triton",
        "indexer": "triton",
        "dsv4_model": "ds_plugins",
        "cudagraph": "on",
    }
    assert "vLLM 0.22.1 has no SM12x sparse-MLA path" in out
    assert "not in this build yet" not in out  # every decision there is served by this build
    assert "vllm.route.decode  vllm.models.deepseek_v4.nvidia.flashmla.flash_mla_with_kvcache" in out


def test_doctor_says_what_this_build_does_not_implement(capsys, monkeypatch):
    # SGLang 0.5.13+ has its own SM120 indexer; forcing ours there has no route in this build
    monkeypatch.setenv("DS_PLUGINS_INDEXER", "triton")
    code, out, _ = run(capsys, "doctor", "--simulate", "--engine", "sglang==0.5.15", "--capability", "12.0")
    assert code == 0
    assert "not in this build yet: indexer=triton (upstream behaviour kept)" in out
    assert "would change indexer=triton, which this build does not implement yet" in out.split("Verdict:")[1]


def test_simulate_json_has_every_decision_with_a_reason(capsys):
    code, out, _ = run(
        capsys,
        "doctor",
        "--json",
        "--simulate",
        "--engine",
        "vllm==0.30.0",
        "--engine",
        "sglang==0.5.13",
        "--capability",
        "12.1",
        "--lib",
        "deep_gemm=no-sm12x",
    )
    report = json.loads(out)
    assert code == 0 and report["exit_code"] == 0 and report["simulated"]
    for engine in ("vllm", "sglang"):
        decisions = report["engines"][engine]["decisions"]
        assert [d["id"] for d in decisions] == [
            "deepgemm",
            "sparse_mla",
            "indexer",
            "cudagraph",
            "dsv4_model",
            "kv_cache_dtype",
            "custom_all_reduce",
            "ascend_quant",
            "mooncake_connector",
        ]
        assert all(d["reason"] for d in decisions)
    assert {d["id"]: d["value"] for d in report["engines"]["sglang"]["decisions"]}["deepgemm"] == "off"


def test_unsupported_exits_2_naming_the_minimum(capsys):
    code, out, _ = run(capsys, "doctor", "--simulate", "--engine", "vllm==0.19.1", "--capability", "12.0")
    assert code == 2 and "needs vLLM >= 0.20.0" in out
    code, out, _ = run(capsys, "doctor", "--simulate", "--engine", "sglang==0.5.11")
    assert code == 2 and "needs SGLang >= 0.5.12" in out
    code, out, _ = run(capsys, "doctor", "--simulate", "--capability", "12.0")
    assert code == 2 and "vLLM >= 0.20.0 or SGLang >= 0.5.12" in out


def test_one_supported_engine_is_enough(capsys):
    code, out, _ = run(capsys, "doctor", "--simulate", "--engine", "vllm==0.30.0", "--engine", "sglang==0.5.10")
    assert code == 0 and "not supported: SGLang 0.5.10" in out


def test_bad_switch_exits_1(capsys, monkeypatch):
    monkeypatch.setenv("DS_PLUGINS_INDEXER", "fast")
    code, out, _ = run(capsys, "doctor", "--simulate", "--engine", "vllm==0.30.0")
    assert code == 1 and "DS_PLUGINS_INDEXER='fast'" in out and "auto, triton, upstream" in out


def test_doctor_never_prints_the_mooncake_secret(capsys, monkeypatch):
    secret = "s3cr3t-value-for-the-side-channel"
    monkeypatch.setenv("DS_PLUGINS_MOONCAKE_SECRET", secret)
    for args in (("doctor",), ("doctor", "--json")):
        code, out, err = run(capsys, *args, "--simulate", "--engine", "vllm==0.30.0")
        assert code == 0 and secret not in out + err
        assert "DS_PLUGINS_MOONCAKE_SECRET" in out and f"(set, {len(secret)} bytes)" in out


def test_bad_simulation_flags_are_usage_errors_naming_the_flag(capsys):
    code, _, err = run(capsys, "doctor", "--simulate", "--lib", "deep_gemm=sm90")
    assert code == 64 and "--lib 'deep_gemm=sm90'" in err and "sm12x" in err
    code, _, err = run(capsys, "doctor", "--simulate", "--lib", "cutlass=yes")
    assert code == 64 and "unknown library 'cutlass'" in err
    code, _, err = run(capsys, "doctor", "--simulate", "--engine", "vllm=0.22.1")
    assert code == 64 and "NAME==VERSION" in err
    code, out, err = run(capsys, "doctor", "--json", "--simulate", "--capability", "12")
    assert code == 64 and "--capability '12'" in err
    assert json.loads(out) == {"error": err.strip(), "exit_code": 64}  # --json always prints JSON


@pytest.mark.parametrize(
    "argv", [["doctor", "--capability", "12.0"], ["doctor", "--no-such-flag"], ["frobnicate"], ["selftest", "--fast"]]
)
def test_usage_errors_exit_64_not_2_which_means_unsupported(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 64 and "error:" in capsys.readouterr().err


def test_simulate_variable_is_not_silently_ignored_beside_the_flag(capsys, monkeypatch):
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", "--capability 9.0")
    code, out, _ = run(capsys, "doctor", "--simulate", "--engine", "vllm==0.30.0", "--capability", "12.0")
    assert code == 0 and "DS_PLUGINS_SIMULATE is set but ignored: --simulate describes the machine" in out


def test_bad_simulate_variable_names_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", "--capability twelve")
    code, _, err = run(capsys, "doctor")
    assert code == 1 and err.startswith("ds-plugins doctor: DS_PLUGINS_SIMULATE:") and "'twelve'" in err


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_bad_disable_value_is_a_config_error_in_doctor_and_in_the_engine(capsys, monkeypatch, value):
    import logging

    from ds_plugins import registration

    monkeypatch.setenv("DS_PLUGINS_DISABLE", value)
    code, out, _ = run(capsys, "doctor", "--simulate", "--engine", "vllm==0.30.0")
    assert code == 1 and f"DS_PLUGINS_DISABLE={value!r}" in out
    monkeypatch.setattr(registration, "_registrations", {})
    reg = registration.register("vllm", "test", lambda: [], logging.getLogger("test.cli"))
    assert reg.state == "config-error" and f"DS_PLUGINS_DISABLE={value!r}" in reg.error


def test_doctor_into_a_closed_pipe_is_quiet():
    code = (
        "import sys; from ds_plugins import cli; "
        "sys.exit(cli.main(['doctor', '--simulate', '--engine', 'vllm==0.30.0']))"
    )
    proc = subprocess.run(f'{sys.executable} -c "{code}" | head -1', shell=True, capture_output=True, text=True)
    assert (
        proc.stdout.startswith("ds-plugins") and "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr
    )


def test_selftest_without_its_prerequisites_says_what_to_install(capsys, monkeypatch):
    from ds_plugins.kernels import selftest

    monkeypatch.setattr(selftest, "missing_prerequisites", lambda: ["torch", "triton"])
    code, out, err = run(capsys, "selftest")
    assert code == 2 and "cannot run here: needs torch, triton (pip install torch triton" in err and not out
    code, out, _ = run(capsys, "selftest", "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2


def test_selftest_prerequisites_are_found_without_importing(monkeypatch):
    from ds_plugins.kernels import selftest

    assert selftest.missing_prerequisites(lambda name: None if name == "numpy" else object()) == ["numpy"]


def test_sglang_path_is_a_folder_holding_only_sitecustomize(capsys):
    code, out, _ = run(capsys, "sglang-path")
    folder = Path(out.strip())
    assert code == 0 and folder.is_absolute()
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == ["sitecustomize.py"]


def test_console_script_doctor_explains_this_machine():
    exe = shutil.which("ds-plugins", path=os.path.dirname(sys.executable)) or shutil.which("ds-plugins")
    assert exe, "the ds-plugins console script is not installed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_PLUGINS_")}
    proc = subprocess.run([exe, "doctor"], capture_output=True, text=True, env=env)
    assert proc.returncode in (0, 2), proc.stderr
    assert "Environment" in proc.stdout and "Verdict:" in proc.stdout
    proc = subprocess.run([exe, "doctor", "--json"], capture_output=True, text=True, env=env)
    report = json.loads(proc.stdout)
    assert report["exit_code"] == proc.returncode and not report["simulated"]

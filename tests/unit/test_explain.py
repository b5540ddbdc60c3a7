"""`ds-plugins explain` and the known-failure records it reads (ds_plugins/known_failures.py).

The error lines below are written as the engines print them (a worker's log prefix, a traceback around
them), independently of the records' own `example` strings. Where the records' texts come from is
checked against the wheels by tests/contract/test_known_failures.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_plugins import cli, explain, known_failures

ROOT = Path(__file__).resolve().parents[2]

TRACEBACK = """\
(EngineCore_DP0 pid=52442) ERROR 06-09 10:53:44 [core.py:1165] EngineCore failed to start.
(EngineCore_DP0 pid=52442) ERROR 06-09 10:53:44 [core.py:1165] Traceback (most recent call last):
(EngineCore_DP0 pid=52442) ERROR 06-09 10:53:44 [core.py:1165]   File \
"/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 905, in __init__
(EngineCore_DP0 pid=52442) ERROR 06-09 10:53:44 [core.py:1165]     super().__init__(
(Worker_TP0 pid=52609) ERROR 06-09 10:53:44 [multiproc_executor.py:962] {line}
(EngineCore_DP0 pid=52442) ERROR 06-09 10:53:44 [core.py:1165] RuntimeError: Engine core initialization failed. \
See root cause above.
"""

# record id -> error lines as the engine or kernel library prints them
SEEN = {
    "deepgemm_unknown_sf": [
        "RuntimeError: Assertion error (/workspace/DeepGEMM/csrc/apis/layout.hpp:60): Unknown SF transformation",
        "tvm.error.InternalError: Assertion error (/deepgemm/csrc/apis/layout.hpp:59): Unknown SF transformation",
    ],
    "deepgemm_unknown_recipe": ["RuntimeError: Assertion error (csrc/utils/layout.hpp:76): Unknown recipe"],
    "deepgemm_ue8m0_cast_disabled": [
        "RuntimeError: Assertion error (/deepgemm/csrc/apis/layout.hpp:49): not disable_ue8m0_cast"
    ],
    "dsv4_kv_cache_not_fp8": [
        "AssertionError: DeepseekV4 fp8_ds_mla layout only supports fp8 kv-cache, got auto",  # 0.24-0.28
        "AssertionError: DeepseekV4 FlashMLA fp8 layout only supports fp8 kv-cache, got auto",  # 0.23
        "AssertionError: DeepseekV4 only supports fp8 kv-cache format for now, got auto",  # 0.20-0.22
    ],
    "vllm_persistent_topk_smem": [
        "RuntimeError: launch_persistent_topk, /workspace/csrc/libtorch_stable/topk.cu:138, persistent_topk would "
        "oversubscribe and the FilteredTopK fallback requires >=128KB smem per block (have 101376). total_ctas=90 > "
        "num_sms*occupancy=48 (TopK=512, vec_size=4, ctas_per_group=90, smem=48688)"
    ],
    "dspark_topk192_sm120": [  # sglang#33943 (SM120, TP2), flashinfer#3828 (the prefill-side message)
        "tvm.error.InternalError: Check failed: num_tokens > 64 (5 vs. 64) : Decode (num_tokens <= 64) must go "
        "through sparse_mla_sm120_decode_dsv3_2 or sparse_mla_sm120_decode_dsv4; got num_tokens=5",
        "tvm.error.InternalError: Check failed: (ok) is false: Unsupported sparse-MLA prefill configuration: "
        "model=DSV4 num_heads=64 topk=192 page_block_size=64 topk_extra=0 extra_page_block_size=0",
    ],
    "flashmla_sparse_sm12x": [
        "RuntimeError: Sparse Attention Forward Kernel is only supported on SM90a and SM100f architectures.",
        "RuntimeError: Unsupported architecture for sparse decode fwd",
    ],
    "flashinfer_decode_envelope_not_iterable": ["TypeError: '_DecodeDispatchEnvelope' object is not iterable"],
    "custom_all_reduce_p2p": [
        "Failed: Cuda error /workspace/csrc/custom_all_reduce.cuh:455 'invalid argument'",
        "RuntimeError: CUDART error: peer access is not supported between these two devices",
    ],
    "deepgemm_unsupported_arch": [
        # tf32_hc_prenorm_gemm (mHC), then fp8_paged_mqa_logits (indexer)
        "RuntimeError: Assertion error (csrc/apis/hyperconnection.hpp:56): Unsupported architecture",
        "RuntimeError: Assertion error (/workspace/csrc/apis/attention.hpp:210): Unsupported architecture",
    ],
}
CASES = [(rid, line) for rid, lines in SEEN.items() for line in lines]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def sim(*extra):
    return ("explain", "--simulate", *extra)


def test_every_record_is_seeded_here():
    assert set(SEEN) == set(known_failures.BY_ID)


@pytest.mark.parametrize("record_id,line", CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)])
def test_each_error_is_recognised_inside_a_real_traceback(record_id, line):
    log = TRACEBACK.format(line=line)
    found = known_failures.match(log)
    assert [m.record.id for m in found] == [record_id]
    assert found[0].line_number == 5 and found[0].line.endswith(line)


def test_each_records_own_example_matches_it_and_nothing_else():
    for r in known_failures.RECORDS:
        assert [m.record.id for m in known_failures.match(r.example)] == [r.id]


def test_colour_codes_do_not_hide_a_match():
    line = (
        "\x1b[1;31mERROR\x1b[0m RuntimeError: Assertion error (csrc/apis/layout.hpp:60): Unknown SF "
        "\x1b[0mtransformation"
    )
    assert [m.record.id for m in known_failures.match(line)] == ["deepgemm_unknown_sf"]


def test_near_misses_are_not_recognised():
    for text in (
        "RuntimeError: Unsupported architecture",  # no DeepGEMM source position: could be anything
        "INFO Using DeepSeek's fp8_ds_mla KV cache format.",
        "WARNING Custom allreduce is disabled because it's not supported on more than two PCIe-only GPUs.",
    ):
        assert known_failures.match(text) == []


def test_simulated_sm120_vllm_024_says_unknown_sf_is_handled_by_deepgemm_off(capsys):
    # The stock wheel's vendored DeepGEMM is named explicitly: `--engine vllm==0.24.0` brings it by itself once
    # ds_plugins/stock.py is in (another change); until then the simulated machine starts empty.
    code, out, err = run(
        capsys,
        *sim(
            "--engine",
            "vllm==0.24.0",
            "--capability",
            "12.0",
            "--lib",
            "vllm.third_party.deep_gemm=no-sm12x",
            "--json",
            SEEN["deepgemm_unknown_sf"][0],
        ),
    )
    assert code == explain.EXIT_MATCH, err
    report = json.loads(out)
    (m,) = report["matches"]
    assert m["id"] == "deepgemm_unknown_sf" and m["handled_by"] == {"decision": "deepgemm", "values": ["off"]}
    (v,) = m["verdicts"]
    assert (v["engine"], v["version"], v["state"]) == ("vllm", "0.24.0", explain.HANDLED)
    assert "deepgemm=off" in v["reason"]
    assert report["simulated"] is True and report["machine"] == {"engines": {"vllm": "0.24.0"}, "gpu": "SM120"}


def test_simulated_sm90_says_not_applicable(capsys):
    code, out, _ = run(
        capsys,
        *sim(
            "--engine",
            "vllm==0.24.0",
            "--capability",
            "9.0",
            "--lib",
            "vllm.third_party.deep_gemm=no-sm12x",
            SEEN["deepgemm_unknown_sf"][0],
        ),
    )
    assert code == explain.EXIT_MATCH
    assert "vLLM 0.24.0: not applicable: it happens on SM120, SM121; GPU 0 here is SM90" in out
    assert "it should not happen here" in out


def test_an_sm12x_deepgemm_means_not_handled_and_the_remedy(capsys):
    code, out, _ = run(
        capsys,
        *sim(
            "--engine",
            "vllm==0.28.0",
            "--capability",
            "12.1",
            "--lib",
            "vllm.third_party.deep_gemm=sm12x",
            SEEN["deepgemm_unknown_sf"][0],
        ),
    )
    assert code == explain.EXIT_MATCH
    assert "vLLM 0.28.0: not handled: ds-plugins decides deepgemm=upstream here" in out
    assert "DS_PLUGINS_DEEPGEMM=off" in out  # the remedy


def test_outside_the_version_range_is_not_applicable(capsys):
    code, out, _ = run(
        capsys, *sim("--engine", "vllm==0.30.0", "--capability", "12.0", SEEN["dsv4_kv_cache_not_fp8"][0])
    )
    assert code == explain.EXIT_MATCH
    assert "vLLM 0.30.0: not applicable: vLLM 0.30.0 is outside the versions it happens in" in out


def test_an_unhandled_failure_gives_its_remedy(capsys):
    # SM90 is left as shipped: the KV-dtype assert is the user's to avoid there
    code, out, _ = run(
        capsys, *sim("--engine", "vllm==0.24.0", "--capability", "9.0", SEEN["dsv4_kv_cache_not_fp8"][0])
    )
    assert code == explain.EXIT_MATCH
    assert "vLLM 0.24.0: not handled: ds-plugins decides kv_cache_dtype=upstream here (SM90:" in out
    assert "add `--kv-cache-dtype fp8`" in out


def test_the_kv_dtype_failure_is_handled_on_sm12x_where_ds_plugins_turns_auto_into_fp8(capsys):
    code, out, _ = run(
        capsys, *sim("--engine", "vllm==0.24.0", "--capability", "12.0", SEEN["dsv4_kv_cache_not_fp8"][0])
    )
    assert code == explain.EXIT_MATCH
    assert "vLLM 0.24.0: handled: ds-plugins decides kv_cache_dtype=fp8 here" in out


def test_a_library_version_condition_is_read_from_the_machine(capsys):
    line = SEEN["flashinfer_decode_envelope_not_iterable"][0]
    _, out, _ = run(
        capsys, *sim("--engine", "sglang==0.5.20", "--capability", "12.0", "--lib", "flashinfer=version=0.7.0", line)
    )
    assert "SGLang 0.5.20: not handled: it applies to SGLang 0.5.20 on SM120" in out
    _, out, _ = run(
        capsys, *sim("--engine", "sglang==0.5.20", "--capability", "12.0", "--lib", "flashinfer=version=0.6.18", line)
    )
    assert "not applicable: it needs flashinfer >=0.7.0,<0.7.1, and flashinfer here is 0.6.18" in out


def test_another_engines_failure_is_not_applicable_and_no_engine_is_unknown(capsys):
    line = SEEN["flashinfer_decode_envelope_not_iterable"][0]
    _, out, _ = run(capsys, *sim("--engine", "vllm==0.28.0", "--capability", "12.0", line))
    assert "vLLM 0.28.0: not applicable: vLLM does not raise this (SGLang does)" in out
    _, out, _ = run(capsys, *sim("--capability", "12.0", "--json", line))
    (v,) = json.loads(out)["matches"][0]["verdicts"]
    assert v["engine"] is None and v["state"] == explain.UNKNOWN


def test_both_engines_get_a_verdict_each(capsys):
    _, out, _ = run(
        capsys,
        *sim(
            "--engine",
            "vllm==0.24.0",
            "--engine",
            "sglang==0.5.21",
            "--capability",
            "12.0",
            "--lib",
            "vllm.third_party.deep_gemm=no-sm12x",
            "--lib",
            "deep_gemm=no-sm12x",
            "--json",
            SEEN["deepgemm_unknown_sf"][0],
        ),
    )
    verdicts = json.loads(out)["matches"][0]["verdicts"]
    assert [(v["engine"], v["state"]) for v in verdicts] == [("vllm", explain.HANDLED), ("sglang", explain.HANDLED)]


def test_no_match_has_its_own_exit_code(capsys):
    code, out, _ = run(capsys, "explain", "--simulate", "--capability", "12.0", "ValueError: something else entirely")
    assert code == explain.EXIT_NO_MATCH == 3
    assert "no known failure recognised" in out
    code, out, _ = run(capsys, "explain", "--simulate", "--json", "nothing here")
    assert code == 3 and json.loads(out)["matches"] == [] and json.loads(out)["exit_code"] == 3


def test_unreadable_logs_are_one_line_naming_the_file(capsys, tmp_path):
    for path in (tmp_path / "missing.log", tmp_path):
        code, out, err = run(capsys, "explain", "--log", str(path))
        assert code == explain.EXIT_NOINPUT == 66
        assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_usage_errors(capsys, tmp_path):
    log = tmp_path / "a.log"
    log.write_text("x\n")
    for argv in (
        ("explain",),
        ("explain", "--log", str(log), "Unknown recipe"),
        ("explain", "--simulate", "--engine", "vllm==banana", "Unknown recipe"),
    ):
        code, _, err = run(capsys, *argv)
        assert code == explain.EXIT_USAGE == 64, argv
        assert "Traceback" not in err and err.strip()
    with pytest.raises(SystemExit) as exc:  # simulated-machine flags without --simulate: argparse's usage error
        cli.main(["explain", "--engine", "vllm==0.24.0", "Unknown recipe"])
    assert exc.value.code == 64


def test_no_gpu_and_a_disabled_ds_plugins_are_said_so(capsys, monkeypatch):
    _, out, _ = run(capsys, *sim("--engine", "vllm==0.22.1", SEEN["dsv4_kv_cache_not_fp8"][2]))
    assert "vLLM 0.22.1: not applicable: it happens on a CUDA GPU; this machine has no CUDA GPU" in out
    monkeypatch.setenv("DS_PLUGINS_DISABLE", "1")
    _, out, _ = run(
        capsys,
        *sim(
            "--engine",
            "vllm==0.24.0",
            "--capability",
            "12.0",
            "--lib",
            "vllm.third_party.deep_gemm=no-sm12x",
            SEEN["deepgemm_unknown_sf"][0],
        ),
    )
    assert "vLLM 0.24.0: not handled: DS_PLUGINS_DISABLE=1" in out and "VLLM_USE_DEEP_GEMM=0" in out


def test_a_bad_switch_is_a_configuration_error(capsys, monkeypatch):
    monkeypatch.setenv("DS_PLUGINS_DEEPGEMM", "sideways")
    code, _, err = run(capsys, *sim("--engine", "vllm==0.24.0", "--capability", "12.0", "Unknown recipe"))
    assert code == explain.EXIT_CONFIG and "DS_PLUGINS_DEEPGEMM" in err


def test_the_cli_reads_a_log_with_two_failures_in_log_order(tmp_path):
    kv, sf = SEEN["dsv4_kv_cache_not_fp8"][0], SEEN["deepgemm_unknown_sf"][0]
    log = tmp_path / "engine.log"
    # the weight-load failure of a second worker repeats the first: reported once
    log.write_text(
        "INFO 06-09 starting\n" + TRACEBACK.format(line=kv) + TRACEBACK.format(line=sf) + TRACEBACK.format(line=sf)
    )
    done = _cli(
        "explain",
        "--simulate",
        "--engine",
        "vllm==0.24.0",
        "--capability",
        "12.0",
        "--lib",
        "vllm.third_party.deep_gemm=no-sm12x",
        "--json",
        "--log",
        str(log),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [m["id"] for m in report["matches"]] == ["dsv4_kv_cache_not_fp8", "deepgemm_unknown_sf"]
    assert [m["line_number"] for m in report["matches"]] == [6, 12]
    # both handled on SM120: kv_cache_dtype=fp8 and deepgemm=off
    assert [m["verdicts"][0]["state"] for m in report["matches"]] == [explain.HANDLED, explain.HANDLED]


def test_the_cli_reads_standard_input_and_prints_text():
    done = _cli(
        "explain",
        "--simulate",
        "--engine",
        "sglang==0.5.12",
        "--capability",
        "12.0",
        "--lib",
        "deep_gemm=no-sm12x",
        "--log",
        "-",
        stdin=SEEN["deepgemm_unsupported_arch"][0] + "\n",
    )
    assert done.returncode == 0, done.stderr
    assert "[1] deepgemm_unsupported_arch:" in done.stdout
    # 0.5.12 on SM12x is unsupported (the path manifest): explain says so instead of claiming a cover
    assert "SGLang 0.5.12: not handled: ds-plugins does nothing here: unsupported on SM120" in done.stdout
    assert "upgrade to SGLang >= 0.5.13" in done.stdout


def test_list_shows_every_record(capsys):
    code, out, _ = run(capsys, "explain", "--list")
    assert code == 0 and all(r.id in out for r in known_failures.RECORDS)
    code, out, _ = run(capsys, "explain", "--list", "--json")
    assert [r["id"] for r in json.loads(out)] == [r.id for r in known_failures.RECORDS]


def test_docs_known_failures_md_is_generated_from_the_records():
    assert explain.DOC.read_text() == explain.render_doc(), (
        "docs/known-failures.md is stale: run `python -m ds_plugins.explain write-doc`"
    )


def test_the_readme_table_has_a_row_per_record():
    table = explain.markdown_table()
    lines = table.splitlines()
    assert lines[0].startswith("| If you see |") and len(lines) == 2 + len(known_failures.RECORDS)
    assert table in explain.render_doc()


def _cli(*argv, stdin=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env = {k: v for k, v in env.items() if not k.startswith("DS_PLUGINS_")}
    return subprocess.run(
        [sys.executable, "-m", "ds_plugins.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )

"""The benchmark's problems and the selftest, exercised on CPU (interpreter, shrunk problems),
so their GPU paths are not first run on a GPU: same kernels, references, FLOP and byte counts."""

import importlib.util
from pathlib import Path

import torch

import ds_plugins.kernels as kernels
from ds_plugins.kernels import selftest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_bench_case_runs_its_kernel_and_reference_on_cpu():
    cases = _bench()._cases("cpu", small=True)
    assert list(dict.fromkeys(c.name for c in cases)) == [
        "flash_mla_with_kvcache",
        "flash_mla_sparse_fwd",
        "fp8_mqa_logits",
        "fp8_paged_mqa_logits",
        "fp8_paged_mqa_topk",
        "tf32_hc_prenorm_gemm",
        "fp8_einsum",
    ]
    for case in cases:
        assert case.flops > 0 and case.bytes > 0
        case.kernel()
        if case.reference is not None:
            case.reference()


def test_selftest_passes_here_and_reports_where_it_ran():
    where, results = selftest.run()
    assert where == ("CPU, Triton interpreter" if not torch.cuda.is_available() else where)
    assert {r.kernel for r in results} == {
        "flash_mla_sparse_fwd",
        "flash_mla_with_kvcache",
        "fp8_mqa_logits",
        "fp8_paged_mqa_logits",
        "fp8_paged_mqa_topk",
        "tf32_hc_prenorm_gemm",
        "fp8_einsum",
    }
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_selftest_catches_a_wrong_kernel(monkeypatch, capsys):
    real = kernels.fp8_einsum

    def off_by_a_bit(expr, a, b, d, c=None, recipe=(1, 128, 128)):
        real(expr, a, b, d, c, recipe)
        d.mul_(1.05)

    monkeypatch.setattr(kernels, "fp8_einsum", off_by_a_bit)
    assert selftest.main() == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: fp8_einsum" in out

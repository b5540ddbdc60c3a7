"""Sparse MLA prefill (`flash_mla_sparse_fwd`): the Triton kernel under the interpreter against
`ref_flash_mla_sparse_fwd` (built on `sparse_attention`), real V4 head counts and head dim.

Tolerances (stated once, by dtype):
- out (bf16): |out - ref| <= 2^-8 * max|kv| + 2^-7 * |ref|. The kernel rounds softmax weights to bf16
  before the p.V tensor-core dot (relative 2^-9 each, so at most 2^-9 * max|V| on any output), and
  both sides round to bf16 (one ulp apart at most, 2^-7 relative).
- max_logits, lse (fp32): rtol = atol = 2^-15 (FlashMLA's own test: 2.01/65536). Both sides compute
  logits from the same bf16 inputs in fp32, only the summation order differs. Infinities must match.
"""

import pytest
import torch

from ds_plugins.kernels import sparse_mla
from ds_plugins.kernels._runtime import KernelInputError, launch_target
from ds_plugins.kernels.reference.sparse_mla import ref_flash_mla_sparse_fwd
from ds_plugins.kernels.sparse_mla import flash_mla_sparse_fwd

OUT_ATOL = 2.0**-8  # times max|kv|
OUT_RTOL = 2.0**-7
STAT_TOL = 2.0**-15
SCALE = 512**-0.5


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def make_inputs(s_q, h_q, s_kv, topk, sink=True, lengths=True):
    q = torch.randn(s_q, h_q, 512).bfloat16()
    kv = torch.randn(s_kv, 1, 512).bfloat16()
    # Valid rows, -1 and out-of-range rows (>= s_kv: invalid too) mixed, repeats allowed.
    indices = torch.randint(-1, s_kv + 4, (s_q, 1, topk), dtype=torch.int32)
    attn_sink = torch.randn(h_q) * 2 if sink else None
    topk_length = torch.randint(1, topk + 1, (s_q,), dtype=torch.int32) if lengths else None
    return q, kv, indices, attn_sink, topk_length


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def check(q, kv, indices, attn_sink=None, topk_length=None, sm_scale=SCALE, device="cpu"):
    """The kernel on `device` (the interpreter on CPU) against the reference on CPU."""
    got = flash_mla_sparse_fwd(*on(device, q, kv, indices), sm_scale, 512, *on(device, attn_sink, topk_length))
    out, max_logits, lse = (t.cpu() for t in got)
    ref_out, ref_max, ref_lse = ref_flash_mla_sparse_fwd(q, kv, indices, sm_scale, 512, attn_sink, topk_length)
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16
    assert max_logits.dtype == lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    err = (out.float() - ref_out.float()).abs()
    bound = OUT_ATOL * kv.float().abs().max() + OUT_RTOL * ref_out.float().abs()
    assert torch.all(err <= bound), f"out: worst excess {(err - bound).max().item():.3g}"
    torch.testing.assert_close(max_logits, ref_max, rtol=STAT_TOL, atol=STAT_TOL)
    torch.testing.assert_close(lse, ref_lse, rtol=STAT_TOL, atol=STAT_TOL)
    return out, max_logits, lse


def test_the_kernel_path_is_what_runs(device):
    """Guard against comparing the reference with itself: on CPU without a GPU the interpreter must be
    on (tests/kernels/conftest.py sets TRITON_INTERPRET before ds_plugins.kernels is imported)."""
    if device == "cuda" or not torch.cuda.is_available():
        assert sparse_mla.use_triton(torch.empty(0, device=device))


@pytest.mark.parametrize("h_q", [64, 128])
def test_matches_reference(h_q, device):
    """Invalid (-1, >= s_kv) and repeated indices, per-token topk_length, per-head sink; top-k not a
    multiple of the kernel's candidate step."""
    assert 72 % sparse_mla.PREFILL_CONFIG.block_n != 0
    check(*make_inputs(s_q=3, h_q=h_q, s_kv=90, topk=72), device=device)


def test_sm12x_launch_config(monkeypatch, device):
    """The smaller head block SM12x gets (shared memory) computes the same thing: 128 heads -> 4 blocks."""
    assert sparse_mla.prefill_config((12, 0)) is sparse_mla.PREFILL_CONFIG_SM12X
    assert sparse_mla.PREFILL_CONFIG_SM12X.block_h == 32
    launched = []
    real = sparse_mla._sparse_prefill_kernel
    monkeypatch.setattr(sparse_mla, "_sparse_prefill_kernel", _Recorder(real, launched))
    with launch_target((12, 0)):
        check(*make_inputs(s_q=2, h_q=128, s_kv=60, topk=40), device=device)
    assert [kw["BLOCK_H"] for kw in launched] == [32]


def test_no_sink_no_lengths_and_other_scale(device):
    check(*make_inputs(s_q=2, h_q=64, s_kv=40, topk=64, sink=False, lengths=False), sm_scale=0.1, device=device)


@pytest.mark.parametrize("h_q", [16, 20])
def test_small_and_odd_head_counts(h_q, device):
    check(*make_inputs(s_q=2, h_q=h_q, s_kv=40, topk=33), device=device)


def test_single_candidate(device):
    """top-k 1 (Triton specialises integer arguments equal to 1)."""
    q, kv, indices, sink, _ = make_inputs(s_q=2, h_q=64, s_kv=1, topk=1)
    indices[:, :, 0] = torch.tensor([[0], [-1]], dtype=torch.int32)
    out, max_logits, lse = check(q, kv, indices, sink, torch.ones(2, dtype=torch.int32), device=device)
    assert torch.isfinite(lse[0]).all() and torch.all(lse[1] == float("inf"))


def test_empty_rows(device):
    """topk_length 0, all indices -1, all indices >= s_kv: out 0, max_logits -inf, lse +inf."""
    q, kv, indices, sink, lengths = make_inputs(s_q=4, h_q=64, s_kv=50, topk=40)
    lengths[0] = 0
    indices[1] = -1
    indices[2] = 50 + torch.arange(40, dtype=torch.int32)
    out, max_logits, lse = check(q, kv, indices, sink, lengths, device=device)
    assert torch.all(out[:3] == 0)
    assert torch.all(max_logits[:3] == float("-inf")) and torch.all(lse[:3] == float("inf"))
    assert torch.isfinite(lse[3]).all()


def test_first_chunk_empty_later_ones_valid(device):
    """The online softmax must survive first steps (32 candidates) with nothing valid."""
    q, kv, indices, sink, _ = make_inputs(s_q=2, h_q=64, s_kv=50, topk=80)
    indices[:, :, :32] = -1
    indices[:, :, 32:] = torch.randint(0, 50, (2, 1, 48), dtype=torch.int32)
    out, max_logits, lse = check(q, kv, indices, sink, None, device=device)
    assert torch.isfinite(lse).all()


def test_lengths_hide_valid_indices(device):
    """Valid indices past topk_length are not read."""
    q, kv, indices, sink, _ = make_inputs(s_q=2, h_q=64, s_kv=50, topk=64)
    indices = torch.randint(0, 50, indices.shape, dtype=torch.int32)
    lengths = torch.tensor([5, 37], dtype=torch.int32)
    out, _, _ = check(q, kv, indices, sink, lengths, device=device)
    full = flash_mla_sparse_fwd(*on(device, q, kv, indices), SCALE, 512, *on(device, sink), None)[0].cpu()
    assert not torch.equal(out, full)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(1e4 - lse) = inf -> 0
def test_sink_extremes(device):
    """sink -inf: no effect; +inf and 1e4: out 0; lse and max_logits never change."""
    q, kv, indices, _, lengths = make_inputs(s_q=2, h_q=64, s_kv=60, topk=48)
    sink = torch.tensor([float("-inf"), 0.0, float("inf"), 1e4, -1e4, 25.0, -25.0, 3.0]).repeat(8)
    out, max_logits, lse = check(q, kv, indices, sink, lengths, device=device)
    plain, plain_max, plain_lse = (
        t.cpu() for t in flash_mla_sparse_fwd(*on(device, q, kv, indices), SCALE, 512, None, *on(device, lengths))
    )
    kind = torch.arange(64) % 8
    assert torch.equal(out[:, kind == 0], plain[:, kind == 0])
    assert torch.all(out[:, (kind == 2) | (kind == 3)] == 0)
    assert torch.equal(max_logits, plain_max) and torch.equal(lse, plain_lse)


def test_non_contiguous_inputs(device):
    """Strided q (a slice of a wider head axis) and kv (a slice of a wider row buffer)."""
    q_wide, kv_wide = torch.randn(2, 96, 512).bfloat16(), torch.randn(60, 2, 512).bfloat16()
    indices, sink = torch.randint(-1, 60, (2, 1, 40), dtype=torch.int32), torch.randn(64)
    q, kv = q_wide.to(device)[:, 16:80], kv_wide.to(device)[:, 1:]  # sliced where they live
    assert not q.is_contiguous() and not kv.is_contiguous()
    out, max_logits, lse = (
        t.cpu() for t in flash_mla_sparse_fwd(q, kv, *on(device, indices), SCALE, 512, *on(device, sink), None)
    )
    want = check(q_wide[:, 16:80], kv_wide[:, 1:], indices, sink, None, device=device)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[2])


def test_reference_dispatch_without_triton(monkeypatch):
    q, kv, indices, sink, lengths = make_inputs(s_q=2, h_q=64, s_kv=30, topk=20)
    monkeypatch.setattr(sparse_mla, "use_triton", lambda t: False)
    got = flash_mla_sparse_fwd(q, kv, indices, SCALE, 512, sink, lengths)
    want = ref_flash_mla_sparse_fwd(q, kv, indices, SCALE, 512, sink, lengths)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------- bad input ------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched before the bad argument was reported")

    monkeypatch.setattr(sparse_mla, "_sparse_prefill_kernel", Forbidden())


BAD_PREFILL = {
    "q": lambda a: dict(q=a["q"].float()),
    "q ": lambda a: dict(q=a["q"][..., :448]),
    "kv": lambda a: dict(kv=a["kv"].half()),
    "kv ": lambda a: dict(kv=a["kv"].expand(-1, 2, -1)),  # h_kv must be 1
    "indices": lambda a: dict(indices=a["indices"][:1]),  # s_q mismatch
    "indices ": lambda a: dict(indices=a["indices"].long()),
    "indices  ": lambda a: dict(indices=a["indices"][:, 0]),  # missing h_kv axis
    "attn_sink": lambda a: dict(attn_sink=torch.zeros(32)),
    "topk_length": lambda a: dict(topk_length=torch.zeros(3, dtype=torch.int32)),
    "d_v": lambda a: dict(d_v=448),
}


@pytest.mark.parametrize("name", list(BAD_PREFILL))
def test_bad_input_names_the_argument(name, no_launch):
    q, kv, indices, sink, lengths = make_inputs(s_q=2, h_q=64, s_kv=30, topk=20)
    args = dict(q=q, kv=kv, indices=indices, sm_scale=SCALE, d_v=512, attn_sink=sink, topk_length=lengths)
    args.update(BAD_PREFILL[name](args))
    with pytest.raises(KernelInputError, match=f"^{name.strip()}:"):
        flash_mla_sparse_fwd(**args)

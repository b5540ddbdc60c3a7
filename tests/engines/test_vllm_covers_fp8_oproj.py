"""Blockers 1 and 2 of issue #14 (vLLM with DeepGEMM off on SM12x): the covers `vllm.fp8_linear.e8m0_scales_fp32`
(block-FP8 linears' e8m0 weight scales -> float32 for CUTLASS) and the o_proj route's adapter (wo_a as vLLM leaves
it, 2-D), in real vLLM processes and in the source of every matrix wheel.

Live (0.24, 0.27, 0.28, 0.30; in 0.24 and 0.27 the cover is in range; the seams of 0.20-0.27 are held by AST below):
vllm_fp8_oproj_script.py builds wo_a from vLLM's own parameter factories and V4's FP8 config, runs vLLM's CUTLASS
kernel's post-load step before and after the patch, and the o_proj forward through vLLM's own
`deep_gemm_fp8_o_proj`, against the reference. Every matrix version: what vLLM passes at those points, by AST and
source (`..._ast`).
"""

import ast
import os
import re
from pathlib import Path

import pytest
import torch
from packaging.version import Version

# This module imports ds_plugins.kernels at collection (tests/engines is collected before tests/kernels):
# TRITON_INTERPRET must be set first, as tests/kernels/conftest.py does, or every later kernel test in
# the session gets compiled-mode @triton.jit functions that cannot run on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ci import upstream  # noqa: E402
from ds_plugins.kernels._runtime import KernelInputError  # noqa: E402
from ds_plugins.kernels.reference import einsum as ref  # noqa: E402
from ds_plugins.landscape import in_range  # noqa: E402
from ds_plugins.vllm.dsv4 import adapters, fp8_block_scales, routes  # noqa: E402

HERE = Path(__file__).parent
V4_VLLM = [v for e, v in upstream.matrix() if e == "vllm" and Version(v) >= Version("0.20")]
OPROJ_ROUTES = [r for r in routes.ROUTES if r.id.startswith("vllm.route.o_proj_einsum")]


# --- live ------------------------------------------------------------------------------------------------------


@pytest.mark.engines
def test_e8m0_scales_and_2d_wo_a_through_vllms_own_linear_kernel_and_o_proj(vllm_env):
    res = vllm_env.run(
        script=HERE / "vllm_fp8_oproj_script.py",
        state=False,
        timeout=900,
        env={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
    ).ok()
    out = res.proc.stdout
    assert "V4-CONFIG e8m0 True" in out
    # vLLM as shipped: CUTLASS's post-load step keeps the e8m0 scales; our kernel alone refuses the 2-D wo_a
    assert "UPSTREAM-KEEPS float8_e8m0fnu (512, 512) (4, 4)" in out
    assert "KERNEL-REFUSES-2D b[0]: expected 3 dimensions, got shape (512, 512)" in out
    assert "CHECK-MOVED expected process_weights_after_loading(self, layer)" in out
    assert "OUTCOMES [('vllm.fp8_linear.e8m0_scales_fp32', 'applied'), ('vllm.route.o_proj_einsum', 'applied')]" in out
    assert "COVERED-SCALES float32 exact (4, 4)" in out
    assert len(res.lines("ds-plugins: block-FP8 linear weight scales e8m0 -> float32 for CUTLASS")) == 1
    assert "OPROJ fp32 ok" in out and "OPROJ e8m0 ok" in out
    assert "REVERTED" in out
    triton = "triton" if "EINSUM-PATH triton" in out else "reference"
    print(f"vLLM {vllm_env.version}: o_proj ran our {triton} path")


# --- the conversion and the adapter, on their own --------------------------------------------------------------


def test_e8m0_to_float32_is_exact_for_every_byte():
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = fp8_block_scales.e8m0_to_float32(raw.view(torch.float8_e8m0fnu))
    want = torch.tensor([2.0 ** (e - 127) for e in range(255)], dtype=torch.float64)
    assert got.dtype == torch.float32 and torch.equal(got[:255].double(), want)  # 2**-127 included (subnormal)
    assert torch.isnan(got[255])
    assert torch.equal(got[:255], raw.view(torch.float8_e8m0fnu)[:255].float())  # torch's own cast agrees


def _wo_a(groups, rank, width, scale_dtype):
    w_fp8, w_scale = ref.quantize_per_block(torch.randn(groups * rank, width) * 0.05)
    scale = w_scale
    if scale_dtype == torch.float8_e8m0fnu:
        scale = ((w_scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8).view(torch.float8_e8m0fnu)
    return w_fp8, w_scale, scale


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
@pytest.mark.parametrize("recipe", [(1, 1, 128), (1, 128, 128)])
def test_the_adapter_views_the_2d_wo_a_per_group(scale_dtype, recipe):
    tokens, groups, rank, width = 3, 4, 128, 384
    w_fp8, w_scale, scale = _wo_a(groups, rank, width, scale_dtype)
    a_fp8, a_scale = ref.quantize_per_token(torch.randn(tokens, groups, width))
    a_sf = ref.pack_ue8m0(a_scale) if recipe[1] == 1 else a_scale  # what vLLM's quantizer gives per recipe
    z = torch.empty(tokens, groups, rank, dtype=torch.bfloat16)
    adapters.fp8_einsum("bhr,hdr->bhd", (a_fp8, a_sf), (w_fp8, scale), z, recipe=recipe)
    want = torch.empty(tokens, groups, rank)
    ref.fp8_einsum_bhr_hdr_bhd(
        (a_fp8, a_scale), (w_fp8.view(groups, rank, width), w_scale.view(groups, rank // 128, width // 128)), want
    )
    torch.testing.assert_close(z.float(), want, rtol=2.0**-7, atol=1e-2)
    # group h is rows h*rank .. (h+1)*rank of wo_a: a wrong split would not match group by group
    per_value = w_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :width]
    for h in range(groups):
        rows = (w_fp8.float() * per_value)[h * rank : (h + 1) * rank]
        exact = torch.einsum("br,dr->bd", a_fp8[:, h].float() * a_scale[:, h].repeat_interleave(128, 1), rows)
        torch.testing.assert_close(z[:, h].float(), exact, rtol=2.0**-7, atol=1e-2)


def test_the_adapter_refuses_a_2d_wo_a_it_cannot_split():
    a = ref.quantize_per_token(torch.randn(2, 2, 256))
    w_fp8, _, scale = _wo_a(2, 128, 256, torch.float8_e8m0fnu)
    with pytest.raises(KernelInputError, match=r"b\[0\]: a 2-D wo_a weight must have d's groups x rows = 2 x 64"):
        adapters.fp8_einsum("bhr,hdr->bhd", a, (w_fp8, scale), torch.empty(2, 2, 64, dtype=torch.bfloat16))
    w_odd, _, _ = _wo_a(1, 192, 256, torch.float32)
    with pytest.raises(KernelInputError, match="o_lora_rank 96 is not a multiple of the 128-row scale block"):
        adapters.fp8_einsum("bhr,hdr->bhd", a, (w_odd, torch.ones(2, 2)), torch.empty(2, 2, 96, dtype=torch.bfloat16))
    with pytest.raises(KernelInputError, match=r"b\[1\]: expected dtype float8_e8m0fnu or float32, got int32"):
        adapters.fp8_einsum(
            "bhr,hdr->bhd", a, (w_fp8, scale.view(torch.uint8).int()), torch.empty(2, 2, 128, dtype=torch.bfloat16)
        )
    with pytest.raises(KernelInputError, match=r"b\[1\]: expected shape \[2, 2\], got \[2, 1\]"):
        adapters.fp8_einsum("bhr,hdr->bhd", a, (w_fp8, scale[:, :1]), torch.empty(2, 2, 128, dtype=torch.bfloat16))


# --- every matrix wheel: the FP8-linear seam and the e8m0 it answers -------------------------------------------


def _src(version: str, rel: str) -> str:
    return (upstream.source("vllm", version) / rel).read_text()


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _cuda_block_kernels(version: str) -> list[str]:
    tree = ast.parse(_src(version, "vllm/model_executor/kernels/linear/__init__.py"))
    table = next(
        n.value
        for n in tree.body
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        and "_POSSIBLE_FP8_BLOCK_KERNELS" in ast.unparse(n.targets[0] if isinstance(n, ast.Assign) else n.target)
    )
    cuda = next(v for k, v in zip(table.keys, table.values) if ast.unparse(k) == "PlatformEnum.CUDA")
    return [e.id for e in cuda.elts]


@pytest.mark.contract
@pytest.mark.parametrize("version", V4_VLLM)
def test_fp8_linear_seam_first_fit_and_kept_e8m0_ast(version):
    assert in_range(fp8_block_scales.PATCH.versions, version, what="test")
    # first-fit: only DeepGEMM-backed kernels precede CUTLASS, so with DeepGEMM off CUTLASS is picked (where
    # cutlass_scaled_mm_supports_block_fp8 says yes: SM90 and newer, SM12x included)
    kernels = _cuda_block_kernels(version)
    before = kernels[: kernels.index(fp8_block_scales.KERNEL)]
    assert before == ["FlashInferFp8DeepGEMMDynamicBlockScaledKernel", "DeepGemmFp8BlockScaledMMKernel"], kernels
    deep_gemm = _class(
        ast.parse(_src(version, "vllm/model_executor/kernels/linear/scaled_mm/deep_gemm.py")),
        "DeepGemmFp8BlockScaledMMKernel",
    )
    assert "is_deep_gemm_supported()" in ast.unparse(_method(deep_gemm, "is_supported"))  # the gate ds-plugins holds
    # the seam: CUTLASS inherits the base's post-load step, which keeps the scales' dtype
    cutlass = _class(
        ast.parse(_src(version, "vllm/model_executor/kernels/linear/scaled_mm/cutlass.py")), fp8_block_scales.KERNEL
    )
    assert [ast.unparse(b) for b in cutlass.bases] == [fp8_block_scales.BASE]
    assert _method(cutlass, "process_weights_after_loading") is None
    apply = ast.unparse(_method(cutlass, "apply_block_scaled_mm"))
    assert "ops.cutlass_scaled_mm(" in apply and "scale_b=Bs.T" in apply
    base = _class(
        ast.parse(_src(version, "vllm/model_executor/kernels/linear/scaled_mm/BlockScaledMMLinearKernel.py")),
        fp8_block_scales.BASE,
    )
    step = _method(base, "process_weights_after_loading")
    assert [a.arg for a in step.args.args] == ["self", "layer"]
    assert "process_fp8_weight_block_strategy" in ast.unparse(step) and "e8m0" not in ast.unparse(step)
    # the only e8m0 -> float32 step for weight scales is DeepGEMM's post-processing, which DeepGEMM's kernel calls
    fp8_utils = ast.parse(_src(version, "vllm/model_executor/layers/quantization/utils/fp8_utils.py"))
    upcasting = {
        f.name
        for f in ast.walk(fp8_utils)
        if isinstance(f, ast.FunctionDef)
        and any(isinstance(c, ast.Call) and ast.unparse(c) == "_upcast_e8m0_to_fp32(ws)" for c in ast.walk(f))
    }
    assert upcasting and all(name.startswith("deepgemm_post_process_") for name in upcasting), upcasting
    assert "deepgemm_post_process_fp8_weight_block(" in _src(
        version, "vllm/model_executor/kernels/linear/scaled_mm/deep_gemm.py"
    )
    # the scales are e8m0: Fp8LinearMethod makes them so for a config with is_scale_e8m0, as V4's is
    fp8 = _src(version, "vllm/model_executor/layers/quantization/fp8.py")
    assert "scale_dtype=(torch.float8_e8m0fnu if self.is_scale_e8m0 else None)" in fp8
    assert 'layer.register_parameter("weight_scale_inv", scale)' in fp8
    quant = _src(
        version,
        "vllm/model_executor/models/deepseek_v4.py"
        if Version(version) < Version("0.22")
        else "vllm/models/deepseek_v4/quant_config.py",
    )  # V4's FP8 config: e8m0 for the fp4-expert checkpoint
    assert (
        "self.is_scale_e8m0: bool = True" in quant  # 0.20.0
        or re.search(r"def is_scale_e8m0\(self\) -> bool:.*?return self\.expert_dtype == \"fp4\"", quant, re.S)
    )


# --- every matrix wheel: what V4's o_proj hands the route with DeepGEMM off ------------------------------------


def _oproj_site(version: str):
    [route] = [r for r in OPROJ_ROUTES if in_range(r.versions, version, what="test")]
    rel = route.module.replace(".", "/") + ".py"
    return route, _src(version, rel)


@pytest.mark.contract
@pytest.mark.parametrize("version", V4_VLLM)
def test_o_proj_site_hands_the_route_wo_a_as_the_linear_left_it_ast(version):
    route, site = _oproj_site(version)
    assert route.adapter == "fp8_einsum"
    tree = ast.parse(site)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "fp8_einsum"]
    [call] = calls
    assert ast.unparse(call.args[0]) in ("'bhr,hdr->bhd'", "equation")
    weight_arg = ast.unparse(call.args[2])
    if weight_arg == "(b, b_scale)":  # 0.20-0.22: through the deepseek_v4_fp8_einsum custom op
        assert "wo_a_fp8 = self.wo_a.weight" in site and "wo_a_scale = self.wo_a.weight_scale_inv" in site
        assert re.search(
            r"torch\.ops\.vllm\.deepseek_v4_fp8_einsum\(\s*o_fp8,\s*o_scale,"
            r"\s*wo_a_fp8,\s*wo_a_scale,\s*z,",
            site,
        )
        assert "recipe=tuple(recipe)" in ast.unparse(call)
    else:  # 0.23+: deep_gemm_fp8_o_proj
        assert weight_arg in ("(wo_a.weight, weight_scale)", "(wo_a.weight, wo_a.weight_scale_inv)"), weight_arg
        if weight_arg.endswith("weight_scale)"):
            assert re.search(
                r"weight_scale = \(?\s*wo_a\.weight_scale\s+if hasattr\(wo_a, \"weight_scale\"\)\s+"
                r"else wo_a\.weight_scale_inv",
                site,
            )
    # SM12x (major 12 > 9) gets the recipe for DeepGEMM's per-row scale layout
    assert re.search(r"\(1, 128, 128\) if cap\.major <= 9 else \(1, 1, (128|block_size)\)", site)
    # z is [tokens, local groups, o_lora_rank]: the adapter reads groups and rows from it
    assert re.search(
        r"torch\.empty\(\s*\((num_tokens|o\.shape\[0\]|o_proj_input\.shape\[0\]), "
        r"(self\.n_local_groups|n_groups), (self\.)?o_lora_rank\)",
        site,
    )
    # wo_a: one linear, output rows group-major (n_groups * o_lora_rank), marked as a grouped BMM
    model = _src(
        version,
        "vllm/model_executor/models/deepseek_v4.py"
        if Version(version) < Version("0.22")
        else "vllm/models/deepseek_v4/nvidia/model.py"
        if Version(version) < Version("0.23")
        else "vllm/models/deepseek_v4/attention.py",
    )
    assert re.search(
        r"self\.wo_a = ColumnParallelLinear\(\s*self\.n_heads \* self\.head_dim // self\.n_groups,\s*"
        r"self\.n_groups \* self\.o_lora_rank,",
        model,
    )
    assert "self.wo_a.bmm_batch_size = self.n_local_groups" in model
    # the only 3-D view (g, r, d) of such a weight is DeepGEMM's post-processing
    fp8_utils = _src(version, "vllm/model_executor/layers/quantization/utils/fp8_utils.py")
    assert re.search(
        r"if is_bmm:.*?g = bmm_batch_size.*?wq = wq\.view\(g, r, d\).*?"
        r"ws = ws\.view\(g, r // quant_block_shape\[0\], d // quant_block_shape\[1\]\)",
        fp8_utils,
        re.S,
    )
    cutlass_side = _src(version, "vllm/model_executor/kernels/linear/scaled_mm/cutlass.py") + _src(
        version, "vllm/model_executor/kernels/linear/scaled_mm/BlockScaledMMLinearKernel.py"
    )
    assert "is_bmm" not in cutlass_side and "bmm_batch_size" not in cutlass_side

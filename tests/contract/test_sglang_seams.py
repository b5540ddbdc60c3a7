"""Every SGLang seam ds-plugins patches, checked in the real source (AST over the unpacked official wheel)
of each version in ci/versions.toml that the patch's range covers. SGLang 0.5.11-0.5.15 cannot be
imported on a CPU machine (torchvision), so every version is read, none imported.

What each check pins down (the assumptions in ds_plugins/sglang/deepgemm_gate.py and routes.py):
- the DeepGEMM gate: SGLANG_ENABLE_JIT_DEEPGEMM (an EnvBool) turns `_compute_enable_deep_gemm` off on
  every path, the constants the patch rewrites are module-level bools computed from it, and
  NEED_TMA_ALIGNED_SCALES is `not (SCALE_UE8M0 or _is_musa)`;
- each route: the call site exists, imports the function INSIDE the calling function (so the name is
  looked up in the kernel's module at each call and rebinding it there reaches the caller), passes only
  arguments the ds-plugins kernel takes, and no module of that SGLang binds the name at module level
  (which would keep a stale copy).
"""

from __future__ import annotations

import ast

import pytest

from ci import upstream
from ds_plugins import landscape
from ds_plugins.patching import Patch
from ds_plugins.sglang import deepgemm_gate, routes
from ds_plugins.sglang.patches import PATCHES

pytestmark = pytest.mark.contract

MATRIX = upstream.versions()["sglang"]["matrix"]
CONFIGURER = "sglang/srt/layers/deep_gemm_wrapper/configurer.py"
BACKEND = "sglang/srt/layers/attention/deepseek_v4_backend.py"
INDEXER = "sglang/srt/layers/attention/dsv4/indexer.py"
METADATA = "sglang/srt/layers/attention/dsv4/metadata.py"
MODEL = "sglang/srt/models/deepseek_v4.py"
MHC = "sglang/srt/layers/mhc.py"


def tree(version: str, rel: str) -> ast.Module:
    path = upstream.source("sglang", version) / rel
    assert path.exists(), f"sglang {version}: {rel} is missing"
    return ast.parse(path.read_text(), str(path))


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def enclosing_functions(module: ast.Module):
    """(function, node) for every node inside a function body."""
    for fn in ast.walk(module):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                yield fn, node


def calls_to(module: ast.Module, name: str) -> list[tuple[ast.FunctionDef, ast.Call]]:
    return [
        (fn, node)
        for fn, node in enclosing_functions(module)
        if isinstance(node, ast.Call) and dotted(node.func) == name
    ]


def local_imports(fn: ast.FunctionDef) -> list[ast.AST]:
    return [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]


def imports_module_locally(fn: ast.FunctionDef, module: str, asname: str) -> bool:
    for node in local_imports(fn):
        if isinstance(node, ast.Import) and any(
            a.name == module and (a.asname or a.name) == asname for a in node.names
        ):
            return True
    return False


def imports_name_locally(fn: ast.FunctionDef, module: str, name: str, asname: str) -> bool:
    for node in local_imports(fn):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == module
            and any(a.name == name and (a.asname or a.name) == asname for a in node.names)
        ):
            return True
    return False


def module_level_bindings(version: str, module: str, name: str) -> list[str]:
    """Files of this SGLang that bind `name` from `module` at module level (a copy a route would miss)."""
    found = []
    root = upstream.source("sglang", version)
    for path in (root / "sglang").rglob("*.py"):
        text = path.read_text(errors="replace")
        if name not in text:
            continue
        for node in ast.parse(text).body:
            if isinstance(node, ast.ImportFrom) and node.module == module and any(a.name == name for a in node.names):
                found.append(str(path.relative_to(root)))
    return found


def keywords(call: ast.Call) -> set[str]:
    assert all(k.arg is not None for k in call.keywords), "a **kwargs call: shape unknown"
    return {k.arg for k in call.keywords}


def kernel_params(name: str) -> set[str]:
    return set(routes.parameters(routes.adapter(name)) or ())


def covered(patch: Patch) -> list[str]:
    return [v for v in MATRIX if landscape.is_supported("sglang", v) and patch.covers(v)]


# --- the DeepGEMM gate --------------------------------------------------------------------------


def check_configurer(version: str) -> None:
    module = tree(version, CONFIGURER)
    gate = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "_compute_enable_deep_gemm")
    switch = "envs.SGLANG_ENABLE_JIT_DEEPGEMM.get"
    # Either `return envs.X.get()` as the only True path, or `if not envs.X.get(): return False` before it.
    returns = [n for n in ast.walk(gate) if isinstance(n, ast.Return)]
    true_returns = [r for r in returns if not (isinstance(r.value, ast.Constant) and r.value.value is False)]
    direct = all(isinstance(r.value, ast.Call) and dotted(r.value.func) == switch for r in true_returns)
    guarded = any(
        isinstance(n, ast.If)
        and isinstance(n.test, ast.UnaryOp)
        and isinstance(n.test.op, ast.Not)
        and isinstance(n.test.operand, ast.Call)
        and dotted(n.test.operand.func) == switch
        and isinstance(n.body[0], ast.Return)
        and getattr(n.body[0].value, "value", None) is False
        for n in gate.body
    )
    assert direct or guarded, f"sglang {version}: SGLANG_ENABLE_JIT_DEEPGEMM does not switch the gate off"
    assigned = {
        t.id: n.value for n in module.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    for name in deepgemm_gate.REQUIRED:
        assert name in assigned, f"sglang {version}: {name} is not a module constant"
    assert dotted(assigned["ENABLE_JIT_DEEPGEMM"].func) == "_compute_enable_deep_gemm"
    for name in ("DEEPGEMM_BLACKWELL", "DEEPGEMM_SCALE_UE8M0"):  # `ENABLE_JIT_DEEPGEMM and ...`: False when off
        value = assigned[name]
        if isinstance(value, ast.Name) and value.id == "DEEPGEMM_BLACKWELL":  # 0.5.12-0.5.19
            continue
        assert (
            isinstance(value, ast.BoolOp)
            and isinstance(value.op, ast.And)
            and dotted(value.values[0]) == "ENABLE_JIT_DEEPGEMM"
        ), f"sglang {version}: {name} = {ast.unparse(value)}"
    assert ast.unparse(assigned["DEEPGEMM_NEED_TMA_ALIGNED_SCALES"]) == "not (DEEPGEMM_SCALE_UE8M0 or _is_musa)"
    if "DEEPGEMM_PAGED_SPARSE_MQA_LOGITS" in assigned:  # 0.5.21+: False unless DEEPGEMM_BLACKWELL
        helper = next(
            n
            for n in module.body
            if isinstance(n, ast.FunctionDef) and n.name == dotted(assigned["DEEPGEMM_PAGED_SPARSE_MQA_LOGITS"].func)
        )
        first = helper.body[0]
        assert isinstance(first, ast.If) and ast.unparse(first.test) == "not DEEPGEMM_BLACKWELL"
    environ = tree(version, "sglang/srt/environ.py")
    fields = {
        t.id: n.value
        for n in ast.walk(environ)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert ast.unparse(fields["SGLANG_ENABLE_JIT_DEEPGEMM"]) == "EnvBool(True)"


# --- routes -------------------------------------------------------------------------------------


def check_decode_0512(version: str) -> None:
    backend = tree(version, BACKEND)
    sites = calls_to(backend, "flash_mla.flash_mla_with_kvcache")
    assert sites, f"sglang {version}: no flash_mla.flash_mla_with_kvcache call in {BACKEND}"
    for fn, call in sites:
        assert imports_module_locally(fn, "flash_mla", "flash_mla"), f"{fn.name}: flash_mla not imported locally"
        assert not call.args and keywords(call) <= kernel_params("flash_mla_with_kvcache")
        assert {"indices", "is_fp8_kvcache", "tile_scheduler_metadata"} <= keywords(call)
    assert module_level_bindings(version, "flash_mla", "flash_mla_with_kvcache") == []


def check_decode_plan_0512(version: str) -> None:
    backend = tree(version, BACKEND)
    sites = calls_to(backend, "flash_mla.get_mla_metadata")
    assert [fn.name for fn, _ in sites] == ["_create_flashmla_metadata"]
    for fn, call in sites:
        assert imports_module_locally(fn, "flash_mla", "flash_mla") and not call.args and not call.keywords
    assert module_level_bindings(version, "flash_mla", "get_mla_metadata") == []


def check_indexer_logits_0512(version: str) -> None:
    module = tree(version, INDEXER)
    fns = [
        fn
        for fn, node in enclosing_functions(module)
        if isinstance(node, ast.ImportFrom)
        and node.module == "deep_gemm"
        and any(a.name == "fp8_paged_mqa_logits" for a in node.names)
    ]
    assert fns, f"sglang {version}: no local `from deep_gemm import fp8_paged_mqa_logits` in {INDEXER}"
    for fn in set(fns):
        assert imports_name_locally(fn, "deep_gemm", "fp8_paged_mqa_logits", "fn")
        found = [c for _, c in calls_to(ast.Module(body=[fn], type_ignores=[]), "fn")]
        assert len(found) == 1, f"{fn.name}: expected one fn(...) call"
        call = found[0]
        # (q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits)
        assert len(call.args) == 8 and not call.keywords
        assert ast.unparse(call.args[-1]) == "False"
    assert len(routes.parameters(routes.adapter("fp8_paged_mqa_logits"))) >= 8
    assert module_level_bindings(version, "deep_gemm", "fp8_paged_mqa_logits") == []


def check_indexer_schedule_0512(version: str) -> None:
    module = tree(version, METADATA)
    sites = calls_to(module, "get_paged_mqa_logits_metadata")
    assert sites
    for fn, call in sites:
        assert imports_name_locally(fn, "deep_gemm", "get_paged_mqa_logits_metadata", "get_paged_mqa_logits_metadata")
        assert len(call.args) == 3 and not call.keywords  # (context_lens, block_kv, num_sms)
    assert module_level_bindings(version, "deep_gemm", "get_paged_mqa_logits_metadata") == []


def check_mhc_prenorm_0512(version: str) -> None:
    # Both callers: deepseek_v4.py:hc_pre (num_splits=None, 2-D outputs) and the default one,
    # layers/mhc.py:mhc_pre (SGLANG_OPT_USE_TILELANG_MHC_PRE on): num_splits=n_splits, 3-D split-K outputs.
    model, mhc = tree(version, MODEL), tree(version, MHC)
    sites = calls_to(model, "deep_gemm.tf32_hc_prenorm_gemm")
    default = calls_to(mhc, "deep_gemm.tf32_hc_prenorm_gemm")
    assert sites and [fn.name for fn, _ in default] == ["mhc_pre"], f"sglang {version}: the mHC prenorm callers moved"
    for fn, call in sites + default:
        assert imports_module_locally(fn, "deep_gemm", "deep_gemm")
        assert len(call.args) == 4 and keywords(call) <= kernel_params("tf32_hc_prenorm_gemm")
    [(fn, call)] = default
    assert [ast.unparse(k.value) for k in call.keywords if k.arg == "num_splits"] == ["n_splits"]
    # the outputs it passes are (n_splits, num_tokens, hc_mult3) and (n_splits, num_tokens)
    shapes = {
        t.id: [ast.unparse(a) for a in n.value.args]
        for n in ast.walk(fn)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and dotted(n.value.func) == "torch.empty"
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    out, sqr = (ast.unparse(a) for a in call.args[2:4])
    assert shapes[out] == ["n_splits", "num_tokens", "hc_mult3"] and shapes[sqr] == ["n_splits", "num_tokens"], shapes
    assert module_level_bindings(version, "deep_gemm", "tf32_hc_prenorm_gemm") == []


def check_sm120(module_path: str):
    def check(version: str) -> None:
        rel = module_path.replace(".", "/") + ".py"
        module = tree(version, rel)
        entries = [
            n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "flash_mla_with_kvcache_sm120"
        ]
        assert len(entries) == 1, f"sglang {version}: {rel} defines no flash_mla_with_kvcache_sm120"
        entry = entries[0]
        assert entry.args.kwarg is not None and not entry.args.args, "expected flash_mla_with_kvcache_sm120(**kwargs)"
        read = {
            n.slice.value
            for n in ast.walk(entry)
            if isinstance(n, ast.Subscript) and dotted(n.value) == "kwargs" and isinstance(n.slice, ast.Constant)
        }
        read |= {
            n.args[0].value
            for n in ast.walk(entry)
            if isinstance(n, ast.Call) and dotted(n.func) == "kwargs.get" and isinstance(n.args[0], ast.Constant)
        }
        assert read <= kernel_params("flash_mla_with_kvcache_sm120"), sorted(
            read - kernel_params("flash_mla_with_kvcache_sm120")
        )
        root = upstream.source("sglang", version)
        sites = []
        for path in (root / "sglang").rglob("*.py"):
            text = path.read_text(errors="replace")
            if "flash_mla_with_kvcache_sm120(" not in text:
                continue
            for fn, call in calls_to(ast.parse(text), "flash_mla_with_kvcache_sm120"):
                sites.append(path)
                assert imports_name_locally(
                    fn, module_path, "flash_mla_with_kvcache_sm120", "flash_mla_with_kvcache_sm120"
                ), f"{path}:{fn.name}"
                assert not call.args and keywords(call) <= kernel_params("flash_mla_with_kvcache_sm120")
        assert sites, f"sglang {version}: nothing calls flash_mla_with_kvcache_sm120"
        assert module_level_bindings(version, module_path, "flash_mla_with_kvcache_sm120") == []

    return check


SEAMS = {
    "sglang.deepgemm_off.configurer": check_configurer,
    "sglang.route.decode": check_decode_0512,
    "sglang.route.decode_plan": check_decode_plan_0512,
    "sglang.route.indexer_logits": check_indexer_logits_0512,
    "sglang.route.indexer_schedule": check_indexer_schedule_0512,
    "sglang.route.mhc_prenorm": check_mhc_prenorm_0512,
    "sglang.route.decode_sm120_legacy": check_sm120("sglang.srt.layers.attention.flash_mla_sm120"),
    "sglang.route.decode_sm120": check_sm120("sglang.kernels.ops.attention.flash_mla_sm120"),
}
CASES = [(p, v) for p in PATCHES for v in covered(p)]


def test_every_patch_has_a_seam_check_and_a_covered_matrix_version():
    assert set(SEAMS) == {p.id for p in PATCHES}
    assert all(covered(p) for p in PATCHES), [p.id for p in PATCHES if not covered(p)]


@pytest.mark.parametrize("patch,version", CASES, ids=[f"{p.id}-{v}-source-ast" for p, v in CASES])
def test_seam_exists_with_the_assumed_shape_source_ast(patch, version):
    SEAMS[patch.id](version)


@pytest.mark.parametrize("version", [v for v in MATRIX if not landscape.is_supported("sglang", v)])
def test_no_patch_covers_a_version_without_deepseek_v4(version):
    """0.5.10 (hook only) and 0.5.11: ds-plugins registers and does nothing."""
    assert not [p.id for p in PATCHES if p.covers(version)]


def test_the_0512_routes_stop_where_sglang_has_its_own_sm120_path_source_ast():
    """The first version the 0.5.12 routes leave out calls SGLang's own SM120 function on SM120."""
    first_after = next(v for v in MATRIX if not routes.PATCHES[0].covers(v) and landscape.is_supported("sglang", v))
    backend = tree(first_after, BACKEND)
    assert calls_to(backend, "flash_mla_with_kvcache_sm120")


@pytest.mark.parametrize("version", ["0.5.12", "0.5.23"])
def test_a_moved_seam_fails_its_check(version, tmp_path, monkeypatch):
    """The seam checks are not vacuous: the same check on a tree where the call site moved fails."""
    patch = next(p for p in PATCHES if p.covers(version) and p.id != "sglang.deepgemm_off.configurer")
    src = upstream.source("sglang", version)
    fake = tmp_path / "tree"
    for rel in (
        BACKEND,
        INDEXER,
        METADATA,
        MODEL,
        MHC,
        CONFIGURER,
        "sglang/srt/environ.py",
        "sglang/kernels/ops/attention/flash_mla_sm120.py",
    ):
        if (src / rel).exists():
            (fake / rel).parent.mkdir(parents=True, exist_ok=True)
            text = (src / rel).read_text()
            text = text.replace("flash_mla_with_kvcache", "flash_mla_decode").replace(
                "fp8_paged_mqa_logits", "paged_logits"
            )
            (fake / rel).write_text(text)
    monkeypatch.setattr(upstream, "source", lambda engine, v: fake)
    with pytest.raises(AssertionError):
        SEAMS[patch.id](version)


def test_0512_wo_a_switch_keeps_the_o_proj_off_deepgemm_source_ast():
    """0.5.12 + indexer=triton sets SGLANG_OPT_FP8_WO_A_GEMM=0 (deepgemm_gate.WO_A_SWITCH): an EnvBool read
    once into a module constant of deepseek_v4.py, and when it is off the weights are dequantised at load
    (the fp8_einsum / transform_sf_into_required_layout path is then never taken)."""
    from packaging.specifiers import SpecifierSet

    versions = [v for v in MATRIX if SpecifierSet(deepgemm_gate.WO_A_VERSIONS).contains(v)]
    assert versions == ["0.5.12"]
    for version in versions:
        fields = {
            t.id: n.value
            for n in ast.walk(tree(version, "sglang/srt/environ.py"))
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        assert ast.unparse(fields[deepgemm_gate.WO_A_SWITCH]) == "EnvBool(True)"
        model = tree(version, MODEL)
        constant = {
            t.id: n.value for n in model.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
        }
        assert ast.unparse(constant["_FP8_WO_A_GEMM"]) == f"envs.{deepgemm_gate.WO_A_SWITCH}.get()"
        guards = [
            n
            for _, n in enclosing_functions(model)
            if isinstance(n, ast.If) and ast.unparse(n.test) == f"not envs.{deepgemm_gate.WO_A_SWITCH}.get()"
        ]
        assert any("_dequant_fp8_wo_a" in ast.unparse(g) for g in guards)
        for fn, _ in calls_to(model, "deep_gemm.fp8_einsum") + calls_to(model, "transform_sf_into_required_layout"):
            assert fn.name in ("forward", "_setup_fp8_wo_a_scales"), fn.name


def _environ_fields(version: str) -> dict[str, ast.AST]:
    return {
        t.id: n.value
        for n in ast.walk(tree(version, "sglang/srt/environ.py"))
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }


def test_sparse_mla_triton_switches_are_sglangs_own_and_read_after_registration_source_ast():
    """sparse_mla=triton on 0.5.13+ sets SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=0 and (0.5.15+)
    SGLANG_SM120_FLASHMLA_BACKEND=triton (deepgemm_gate.wanted). Each is an environ.py field of SGLang's own,
    the sparse-prefill switch is read at call time by the V4 backend's prefill condition, and the backend
    choice once, at the SM120 FlashMLA module's import (which SGLang's attention backend does inside a
    function, after our registration), then compared with "triton"/"flashinfer"."""
    prefill = [v for v in MATRIX if landscape.in_range(deepgemm_gate.SPARSE_PREFILL_VERSIONS, v)]
    backend = [v for v in MATRIX if landscape.in_range(deepgemm_gate.SM120_BACKEND_VERSIONS, v)]
    assert prefill[0] == "0.5.13" and backend[0] == "0.5.15"
    for version in prefill:
        fields = _environ_fields(version)
        assert ast.unparse(fields[deepgemm_gate.SPARSE_PREFILL_SWITCH]).startswith("EnvBool("), version
        reads = [
            n
            for fn, n in enclosing_functions(tree(version, BACKEND))
            if ast.unparse(n) == f"envs.{deepgemm_gate.SPARSE_PREFILL_SWITCH}.get()"
        ]
        assert reads, f"sglang {version}: the V4 backend no longer reads {deepgemm_gate.SPARSE_PREFILL_SWITCH}"
    for version in backend:
        assert ast.unparse(_environ_fields(version)[deepgemm_gate.SM120_BACKEND_SWITCH]) == "EnvStr('flashinfer')"
        rel = (
            "sglang/srt/layers/attention/flash_mla_sm120.py"
            if landscape.in_range(">=0.5.13,<0.5.16", version)
            else "sglang/kernels/ops/attention/flash_mla_sm120.py"
        )
        module = tree(version, rel)
        top = {
            t.id: n.value
            for n in module.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        assert ast.unparse(top["_sm120_default_backend"]) == f"envs.{deepgemm_gate.SM120_BACKEND_SWITCH}.get()"
        compared = {
            ast.unparse(n.comparators[0])
            for n in ast.walk(module)
            if isinstance(n, ast.Compare) and ast.unparse(n.left) == "_sm120_default_backend"
        }
        assert {"'triton'", "'flashinfer'"} <= compared, (version, compared)
        # SGLang's attention backend imports that module inside a function: our switch is set by then
        importers = [
            fn
            for fn, n in enclosing_functions(tree(version, BACKEND))
            if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("flash_mla_sm120")
        ]
        assert importers, f"sglang {version}: the V4 backend imports flash_mla_sm120 at module level"

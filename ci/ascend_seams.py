"""The vLLM interfaces `--quantization ascend` relies on, read from an official vLLM wheel's source (AST, no import).

ds_plugins/vllm/ascend/compat.py finds the moving parts by probing the imported vLLM; ascend/config.py,
ascend/methods.py and ascend/remote.py use the rest as they are. Each check here proves, for one unpacked wheel
(ci/upstream.py), one fact that code relies on, and raises `SeamMismatch` naming the wheel file, line and name
that differ. tests/contract/test_ascend_vllm_versions.py runs every check on every matrix version from the
vLLM minimum (ds_plugins.landscape.MINIMUM).
"""

from __future__ import annotations

import ast
from pathlib import Path

from ci.vllm_seams import SeamMismatch, find_class, module_bindings, module_file, rel, tree_of

FUSED_MOE = "vllm.model_executor.layers.fused_moe"
# Kept in step with ascend.compat.MOE_APPLY_PARAMS (the test compares the two).
MOE_APPLY_PARAMS = ("layer", "x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input")


def _class_of(src: Path, module: str, name: str, depth: int = 0) -> ast.ClassDef | None:
    """The class `module.name` is at import time: a class, an import of one, or `name = OtherClass`."""
    for b in module_bindings(src, module, name):
        if b.kind == "class":
            return b.node
        if b.kind == "import" and b.original and depth < 8:
            try:
                found = _class_of(src, b.source, b.original, depth + 1)
            except SeamMismatch:
                found = None
            if found is not None:
                return found
        if b.kind == "assign" and isinstance(b.node.value, ast.Name) and depth < 8:
            found = _class_of(src, module, b.node.value.id, depth + 1)
            if found is not None:
                return found
    return None


def _params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs) if a.arg not in ("self", "cls")]


def _method(src: Path, module: str, cls: str, name: str) -> ast.FunctionDef:
    klass = find_class(src, module, cls)
    for node in klass.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise SeamMismatch(f"{rel(src, module_file(src, module))}: {cls} defines no {name}")


def _defining_module(src: Path, module: str, name: str, depth: int = 0) -> str:
    """The module whose top level defines class `name` as reached from `module` (following imports)."""
    for b in module_bindings(src, module, name):
        if b.kind == "class":
            return module
        if b.kind == "import" and b.original and depth < 8:
            return _defining_module(src, b.source, b.original, depth + 1)
        if b.kind == "assign" and isinstance(b.node.value, ast.Name) and depth < 8:
            return _defining_module(src, module, b.node.value.id, depth + 1)
    raise SeamMismatch(f"{rel(src, module_file(src, module))}: {name} is not bound at module level")


# --- the facts ----------------------------------------------------------------------------------------------


def moe_layer(src: Path) -> str:
    """The name ascend.compat.moe_layer_class picks (RoutedExperts, else FusedMoE, whichever is a class), and
    proof that this class hands itself to the quant config (`get_quant_method(self, ...)`, or 0.33's
    `resolve_quant_method(quant_config, self, prefix)`)."""
    for name in ("RoutedExperts", "FusedMoE"):
        klass = _class_of(src, FUSED_MOE, name)
        if klass is None:
            continue
        for node in ast.walk(klass):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called in ("get_quant_method", "resolve_quant_method") and any(
                    isinstance(a, ast.Name) and a.id == "self" for a in node.args
                ):
                    return name
        raise SeamMismatch(f"{FUSED_MOE}.{name} (class {klass.name}) never hands itself to get_quant_method")
    raise SeamMismatch(f"{rel(src, module_file(src, FUSED_MOE))}: neither RoutedExperts nor FusedMoE is a class")


def moe_exports(src: Path) -> None:
    """The fused_moe package exports the MoE method base and the weight-scale enum (as classes)."""
    for name in ("FusedMoEMethodBase", "FusedMoeWeightScaleSupported"):
        if _class_of(src, FUSED_MOE, name) is None:
            raise SeamMismatch(f"{rel(src, module_file(src, FUSED_MOE))}: {name} is not exported as a class")
    scale = _class_of(src, FUSED_MOE, "FusedMoeWeightScaleSupported")
    members = {t.id for n in scale.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if "CHANNEL" not in members:
        raise SeamMismatch(f"FusedMoeWeightScaleSupported (line {scale.lineno}) has no CHANNEL member")


def moe_method_signatures(src: Path) -> None:
    """FusedMoEMethodBase(moe), create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
    params_dtype, **extra), and an apply whose parameters AscendMoEMethod.apply all takes."""
    module = _defining_module(src, FUSED_MOE, "FusedMoEMethodBase")
    init = _method(src, module, "FusedMoEMethodBase", "__init__")
    if _params(init) != ["moe"]:
        raise SeamMismatch(f"FusedMoEMethodBase.__init__{_params(init)} (line {init.lineno}): expected (moe)")
    cw = _method(src, module, "FusedMoEMethodBase", "create_weights")
    want = ["layer", "num_experts", "hidden_size", "intermediate_size_per_partition", "params_dtype"]
    if _params(cw) != want or cw.args.kwarg is None:
        raise SeamMismatch(
            f"FusedMoEMethodBase.create_weights{_params(cw)} (line {cw.lineno}): expected {want} "
            "and **extra_weight_attrs"
        )
    apply = _method(src, module, "FusedMoEMethodBase", "apply")
    extra = [p for p in _params(apply) if p not in MOE_APPLY_PARAMS]
    if extra:
        raise SeamMismatch(
            f"FusedMoEMethodBase.apply (line {apply.lineno}) takes {extra}, which AscendMoEMethod.apply does not"
        )


def moe_apply_calls(src: Path) -> int:
    """Every `<...>quant_method.apply(...)` call in the fused_moe package passes keywords only, all of them ones
    AscendMoEMethod.apply takes (so the 0.20 calls without shared_experts and the 0.22+ calls with it both
    fit). Returns how many calls were read."""
    pkg = module_file(src, FUSED_MOE).parent
    n = 0
    for path in sorted(pkg.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "apply"
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr in ("quant_method", "_quant_method")
            ):
                continue
            n += 1
            names = [k.arg for k in node.keywords]
            if node.args or None in names or any(k not in MOE_APPLY_PARAMS for k in names):
                raise SeamMismatch(
                    f"{rel(src, path)}:{node.lineno}: quant_method.apply called with "
                    f"{len(node.args)} positional and keywords {names}"
                )
    if not n:
        raise SeamMismatch(f"{rel(src, pkg)}: no quant_method.apply call found")
    return n


def moe_none_falls_back(src: Path) -> None:
    """Where the MoE layer asks the quant config, a None answer becomes vLLM's UnquantizedFusedMoEMethod (what
    AscendQuantConfig relies on for FLOAT experts)."""
    name = moe_layer(src)
    path, tree = tree_of(src, _defining_module(src, FUSED_MOE, name))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.ops[0], ast.Is)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "quant_method"
            and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value is None
        ):
            for sub in ast.walk(ast.Module(body=node.body, type_ignores=[])):
                if isinstance(sub, ast.Call) and getattr(sub.func, "id", None) == "UnquantizedFusedMoEMethod":
                    return
    raise SeamMismatch(f"{rel(src, path)}: no `if quant_method is None: quant_method = UnquantizedFusedMoEMethod(...)`")


LINEAR = "vllm.model_executor.layers.linear"


def linear_interfaces(src: Path) -> None:
    """LinearBase, RowParallelLinear, UnquantizedLinearMethod classes; LinearMethodBase.create_weights(layer,
    input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra) and
    apply(layer, x, bias)."""
    for name in ("LinearBase", "RowParallelLinear", "UnquantizedLinearMethod", "LinearMethodBase"):
        find_class(src, LINEAR, name)
    cw = _method(src, LINEAR, "LinearMethodBase", "create_weights")
    want = ["layer", "input_size_per_partition", "output_partition_sizes", "input_size", "output_size", "params_dtype"]
    if _params(cw) != want or cw.args.kwarg is None:
        raise SeamMismatch(f"LinearMethodBase.create_weights{_params(cw)} (line {cw.lineno}): expected {want}")
    apply = _method(src, LINEAR, "LinearMethodBase", "apply")
    if _params(apply) != ["layer", "x", "bias"]:
        raise SeamMismatch(f"LinearMethodBase.apply{_params(apply)} (line {apply.lineno}): expected (layer, x, bias)")


def parameters_and_helpers(src: Path) -> None:
    """vLLM's parameter classes, set_weight_attrs, VocabParallelEmbedding, where ascend.methods imports them."""
    for module, name in (
        ("vllm.model_executor.parameter", "ChannelQuantScaleParameter"),
        ("vllm.model_executor.parameter", "ModelWeightParameter"),
        ("vllm.model_executor.parameter", "PerTensorScaleParameter"),
        ("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding"),
    ):
        find_class(src, module, name)
    if not any(b.kind == "def" for b in module_bindings(src, "vllm.model_executor.utils", "set_weight_attrs")):
        raise SeamMismatch("vllm.model_executor.utils: no def set_weight_attrs")


def quant_config_interface(src: Path) -> None:
    """register_quantization_config, QUANTIZATION_METHODS and _CUSTOMIZED_METHOD_TO_QUANT_CONFIG (ascend_quant);
    QuantizationConfig.maybe_update_config(model_name, hf_config, revision) and apply_vllm_mapper; the config
    builder calls maybe_update_config with the model and hf_config= (ascend.config reads both)."""
    q = "vllm.model_executor.layers.quantization"
    for name in ("register_quantization_config", "QUANTIZATION_METHODS", "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG"):
        if not module_bindings(src, q, name):
            raise SeamMismatch(f"{rel(src, module_file(src, q))}: {name} is not bound")
    base = f"{q}.base_config"
    muc = _method(src, base, "QuantizationConfig", "maybe_update_config")
    if _params(muc) != ["model_name", "hf_config", "revision"]:
        raise SeamMismatch(f"QuantizationConfig.maybe_update_config{_params(muc)} (line {muc.lineno})")
    _method(src, base, "QuantizationConfig", "apply_vllm_mapper")
    path, tree = tree_of(src, "vllm.config.vllm")
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "maybe_update_config"
    ]
    if not calls or not all("hf_config" in {k.arg for k in c.keywords} for c in calls):
        raise SeamMismatch(f"{rel(src, path)}: maybe_update_config is not called with hf_config=")


def hub_downloads(src: Path) -> None:
    """What ascend.remote uses: vllm.envs.VLLM_USE_MODELSCOPE, and weight_utils'
    download_weights_from_hf(model_name_or_path, cache_dir, allow_patterns, revision, ...) and
    maybe_download_from_modelscope(model, revision, download_dir, ignore_patterns, allow_patterns)."""
    path, tree = tree_of(src, "vllm.envs")
    if "VLLM_USE_MODELSCOPE" not in {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}:
        raise SeamMismatch(f"{rel(src, path)}: no VLLM_USE_MODELSCOPE")
    wu = "vllm.model_executor.model_loader.weight_utils"
    for name, head in (
        ("download_weights_from_hf", ["model_name_or_path", "cache_dir", "allow_patterns", "revision"]),
        ("maybe_download_from_modelscope", ["model", "revision", "download_dir", "ignore_patterns", "allow_patterns"]),
    ):
        defs = [b.node for b in module_bindings(src, wu, name) if b.kind == "def"]
        if not defs or _params(defs[0])[: len(head)] != head:
            raise SeamMismatch(
                f"{rel(src, module_file(src, wu))}: {name}"
                f"{_params(defs[0]) if defs else ' is not defined'}; expected {head} first"
            )


def runtime_helpers(src: Path) -> None:
    """The rest ascend.config reads at run time: `vllm.config.get_current_vllm_config` (vLLM's --download-dir,
    for a hub id's weights), `WeightsMapper._map_name` (the model's checkpoint-name mapper), and the MoE
    layer's `self.moe_config` (handed to FusedMoEMethodBase)."""
    if not any(b.kind in ("def", "import") for b in module_bindings(src, "vllm.config", "get_current_vllm_config")):
        raise SeamMismatch(f"{rel(src, module_file(src, 'vllm.config'))}: get_current_vllm_config is not bound")
    _method(src, "vllm.model_executor.models.utils", "WeightsMapper", "_map_name")
    name = moe_layer(src)
    klass = _class_of(src, FUSED_MOE, name)
    for node in ast.walk(klass):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(
            isinstance(t, ast.Attribute)
            and t.attr == "moe_config"
            and isinstance(t.value, ast.Name)
            and t.value.id == "self"
            for t in targets
        ):
            return
    raise SeamMismatch(f"{FUSED_MOE}.{name} (line {klass.lineno}) never sets self.moe_config")


def _is_abstract(fn: ast.FunctionDef) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id == "abstractmethod")
        or (isinstance(d, ast.Attribute) and d.attr == "abstractmethod")
        for d in fn.decorator_list
    )


def abstract_methods(src: Path, module: str, name: str, depth: int = 0) -> set[str]:
    """The abstract methods class `module.name` leaves to its subclasses: its own `@abstractmethod`s and its
    vLLM bases' ones it does not define (bases outside the wheel, `ABC`, `torch.nn.Module`, are skipped)."""
    defining = _defining_module(src, module, name)
    klass = find_class(src, defining, name)
    left: set[str] = set()
    for base in klass.bases:
        if isinstance(base, ast.Name) and depth < 8:
            try:
                left |= abstract_methods(src, defining, base.id, depth + 1)
            except SeamMismatch:  # not a class of the wheel
                continue
    defs = [n for n in klass.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return (left - {f.name for f in defs if not _is_abstract(f)}) | {f.name for f in defs if _is_abstract(f)}


# ds-plugins' classes and the vLLM base each one subclasses (by the module it is imported from).
OURS = (
    (
        "ds_plugins/vllm/ascend/config.py",
        "AscendQuantConfig",
        "vllm.model_executor.layers.quantization.base_config",
        "QuantizationConfig",
    ),
    ("ds_plugins/vllm/ascend/methods.py", "W8A8DynamicLinearMethod", LINEAR, "LinearMethodBase"),
    ("ds_plugins/vllm/ascend/methods.py", "W8A8StaticLinearMethod", LINEAR, "LinearMethodBase"),
    ("ds_plugins/vllm/ascend/methods.py", "AscendMoEMethod", FUSED_MOE, "FusedMoEMethodBase"),
)
ROOT = Path(__file__).resolve().parents[1]


def _our_methods(file: str, cls: str) -> set[str]:
    for node in ast.parse((ROOT / file).read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    raise SeamMismatch(f"{file}: no class {cls}")


def abstract_methods_implemented(src: Path) -> dict[str, list[str]]:
    """Every abstract method of vLLM's QuantizationConfig, LinearMethodBase and FusedMoEMethodBase is defined by
    the ds-plugins class built on it (else instantiating it fails: `TypeError: Can't instantiate abstract class`).
    Returns base -> the abstract methods read."""
    read = {}
    for file, cls, module, base in OURS:
        abstract = abstract_methods(src, module, base)
        missing = sorted(abstract - _our_methods(file, cls))
        if missing:
            raise SeamMismatch(
                f"{base} ({_defining_module(src, module, base)}) has abstract {', '.join(missing)}, "
                f"which {file}:{cls} does not define"
            )
        read[base] = sorted(abstract)
    return read


CHECKS = {
    f.__name__: f
    for f in (
        moe_layer,
        moe_exports,
        moe_method_signatures,
        moe_apply_calls,
        moe_none_falls_back,
        linear_interfaces,
        parameters_and_helpers,
        quant_config_interface,
        hub_downloads,
        runtime_helpers,
        abstract_methods_implemented,
    )
}

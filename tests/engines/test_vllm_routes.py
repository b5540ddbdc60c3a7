"""Kernel routes in real vLLM processes: every selected site is bound to ds-plugins' kernels, each routed
seam called exactly as vLLM's V4 code calls it gives the reference result (Triton interpreter), and a
seam that moved is skipped with one warning while vLLM keeps its own function."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.engines

HERE = Path(__file__).parent
LOAD = "import vllm.plugins as p\np.load_general_plugins()\n"
ROUTED = "--capability 12.0 --lib deep_gemm=no-sm12x"
SEAMS = {"decode", "prefill", "decode_plans", "attention_class", "indexer", "o_proj", "mhc"}  # live vLLMs are >= 0.24
IMPORT_SITES = (
    "import importlib\n"
    "from ds_plugins.vllm.dsv4 import routes\n"
    "from vllm.version import __version__ as V\n"
    "sites = [r for r in routes.ROUTES if routes._function_patch(r).covers(V)]\n"
    "for r in sites:\n"
    "    importlib.import_module(r.module)\n"
    "for patch in (routes.SELECTOR, routes.TILE_SCHEDULER):\n"
    "    importlib.import_module(patch.module)\n"
)


def outcomes(state):
    return {o["patch"]: o["state"] for o in state["outcomes"]}


def test_every_route_in_range_is_bound_on_routed_sm12x(vllm_env):
    res = vllm_env.run(
        LOAD + IMPORT_SITES + "for r in sites:\n"
        "    fn = getattr(importlib.import_module(r.module), r.attribute)\n"
        "    assert fn.__ds_plugins_route__ == r.id, (r.id, fn)\n"
        "assert routes.problems() == [], routes.problems()\n"
        "print('BOUND', len(sites))\n",
        env={"DS_PLUGINS_SIMULATE": ROUTED},
    ).ok()
    states = outcomes(res.state)
    routes = {k: v for k, v in states.items() if k.startswith("vllm.route.")}
    assert routes and set(routes.values()) <= {"applied", "other-version"}, routes
    assert "other-version" in routes.values()  # the legacy sites of older releases stay quiet
    assert not res.lines("skipping patch")


@pytest.mark.parametrize(
    "machine",
    [
        "--capability 9.0 --lib deep_gemm=yes",
        "--capability 10.0 --lib deep_gemm=yes",
        "--capability 12.0 --lib deep_gemm=sm12x --lib flashinfer=sm120",
    ],
)
def test_no_route_where_upstream_kernels_serve(vllm_env, machine):
    res = vllm_env.run(
        LOAD + IMPORT_SITES + "for r in sites:\n"
        "    fn = getattr(importlib.import_module(r.module), r.attribute)\n"
        "    assert not hasattr(fn, '__ds_plugins_route__'), r.id\n"
        "print('UNTOUCHED')\n",
        env={"DS_PLUGINS_SIMULATE": machine},
    ).ok()
    assert "UNTOUCHED" in res.proc.stdout
    assert all(v == "not-selected" for k, v in outcomes(res.state).items() if k.startswith("vllm.route."))


def test_forcing_triton_routes_attention_even_where_flashinfer_serves(vllm_env):
    res = vllm_env.run(
        LOAD + IMPORT_SITES + "import vllm.models.deepseek_v4.nvidia.flashmla as f\n"
        "assert f.flash_mla_with_kvcache.__ds_plugins_route__ == 'vllm.route.decode'\n"
        "import vllm.model_executor.layers.sparse_attn_indexer as i\n"
        "assert not hasattr(i.fp8_fp4_mqa_logits, '__ds_plugins_route__')\n"
        "print('FORCED')\n",
        env={
            "DS_PLUGINS_SIMULATE": "--capability 12.0 --lib deep_gemm=sm12x --lib flashinfer=sm120",
            "DS_PLUGINS_SPARSE_MLA": "triton",
        },
    ).ok()
    assert "FORCED" in res.proc.stdout
    assert res.state["decisions"]["sparse_mla"] == "triton" and res.state["decisions"]["indexer"] == "upstream"


def test_routed_seams_called_as_vllm_calls_them_match_the_references(vllm_env):
    res = vllm_env.run(
        script=HERE / "vllm_seam_script.py",
        state=False,
        timeout=900,
        env={"DS_PLUGINS_SIMULATE": ROUTED, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
    ).ok()
    seen = {line.split()[1] for line in res.proc.stdout.splitlines() if line.startswith("SEAM ")}
    assert SEAMS <= seen, res.output[-4000:]
    assert "problems []" in res.proc.stderr


MOVED = '''
import importlib.abc, importlib.util, sys
class MovedSeam(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """vLLM's own source of {module}, edited by {edits!r}: a release where the seam moved."""
    def find_spec(self, name, path, target=None):
        if name != {module!r}:
            return None
        real = importlib.util.find_spec(name.rpartition(".")[0]).submodule_search_locations[0]
        self.origin = real + "/" + name.rpartition(".")[2] + ".py"
        return importlib.util.spec_from_loader(name, self, origin=self.origin)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        module.__file__ = self.origin
        source = open(self.origin).read()
        for old, new in {edits!r}:
            assert old in source, old
            source = source.replace(old, new)
        exec(compile(source, self.origin, "exec"), module.__dict__)
sys.meta_path.insert(0, MovedSeam())
'''


def test_a_seam_that_moved_is_skipped_with_one_warning_and_the_model_refuses_clearly(vllm_env):
    module = "vllm.models.deepseek_v4.nvidia.flashmla"
    res = vllm_env.run(
        MOVED.format(
            module=module,
            edits=[
                ("    flash_mla_with_kvcache,\n", "    flash_mla_with_kvcache as flash_mla_decode_v2,\n"),
                ("flash_mla_with_kvcache(", "flash_mla_decode_v2("),
            ],
        )
        + LOAD
        + f"import {module} as f\n"
        "assert not hasattr(f, 'flash_mla_with_kvcache') and callable(f.flash_mla_decode_v2)\n"
        "from vllm.model_executor.models.registry import ModelRegistry as R\n"
        "cls = R.models['DeepseekV4ForCausalLM'].load_model_cls()\n"
        "from ds_plugins.vllm.dsv4.hookup import RoutesMissing\n"
        "try:\n"
        "    cls(vllm_config=None)\n"
        "except RoutesMissing as e:\n"
        "    print('REFUSED ' + str(e))\n",
        env={"DS_PLUGINS_SIMULATE": ROUTED},
    ).ok()
    assert outcomes(res.state)["vllm.route.decode"] == "skipped"
    [warning] = res.lines("skipping patch vllm.route.decode ")
    assert "target not found" in warning and "upstream behaviour kept" in warning
    [refusal] = res.lines("REFUSED ")
    assert "vllm.route.decode" in refusal and "DS_PLUGINS_DSV4_MODEL=upstream" in refusal


def test_a_selector_with_another_signature_is_left_alone(vllm_env):
    module = "vllm.models.deepseek_v4.nvidia.model"
    res = vllm_env.run(
        MOVED.format(
            module=module,
            edits=[
                (
                    "def _select_dsv4_attn_cls(vllm_config: VllmConfig)",
                    "def _select_dsv4_attn_cls(vllm_config: VllmConfig, layer_id: int = 0)",
                )
            ],
        )
        + LOAD
        + f"import {module} as m\n"
        "assert 'ds-plugins' not in repr(getattr(m._select_dsv4_attn_cls, '__wrapped__', ''))\n"
        "assert not hasattr(m._select_dsv4_attn_cls, '__wrapped__')\n"
        "print('LEFT-ALONE')\n",
        env={"DS_PLUGINS_SIMULATE": ROUTED},
    ).ok()
    assert "LEFT-ALONE" in res.proc.stdout
    assert outcomes(res.state)["vllm.route.attention_class"] == "skipped"
    assert len(res.lines("skipping patch vllm.route.attention_class")) == 1

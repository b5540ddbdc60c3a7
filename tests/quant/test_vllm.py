"""`--quantization ascend` in real vLLM processes (every live vLLM of ci/versions.toml: 0.24, 0.27, 0.28, 0.30):
registration through vLLM's public API, vLLM's own CLI parser, its config verification (which reads
and validates the checkpoint), and vLLM's own linear / FusedMoE layers built on CPU, loaded through
their own weight loaders and run against the float64 formulas. Also: vLLM's DeepSeek-V4 name mapper
against ds-plugins' rename rules. Script: tests/quant/vllm_script.py.
"""

import random
import shutil
from pathlib import Path

import pytest
import torch

from .fixtures import layer_checkpoint
from .test_format import _drop_tensor as _drop

SCRIPT = Path(__file__).with_name("vllm_script.py")
NATIVE_KEYS = [
    "embed.weight",
    "head.weight",
    "norm.weight",
    "hc_head_fn",
    "hc_head_base",
    "hc_head_scale",
    "layers.0.attn.wq_a.weight",
    "layers.0.attn.wq_a.weight_scale",
    "layers.0.attn.wkv.weight",
    "layers.1.attn.wq_b.weight_offset",
    "layers.2.attn.compressor.wkv.weight",
    "layers.2.attn.indexer.compressor.wgate.weight",
    "layers.2.attn.indexer.weights_proj.weight",
    "layers.3.attn.wo_a.weight",
    "layers.3.attn.wo_b.weight",
    "layers.3.ffn.gate.weight",
    "layers.3.ffn.gate.bias",
    "layers.3.ffn.experts.17.w1.weight",
    "layers.3.ffn.experts.17.w2.weight_scale",
    "layers.3.ffn.experts.17.w3.scale_bias",
    "layers.3.ffn.shared_experts.w1.weight",
    "layers.3.ffn.shared_experts.w2.weight",
    "layers.3.ffn.shared_experts.w2.weight_scale",
    "layers.3.hc_attn_fn",
    "layers.3.attn_norm.weight",
    "mtp.0.attn.wq_a.weight",
]


@pytest.mark.engines
def test_ascend_config_in_real_vllm(vllm_env, tmp_path):
    ref = layer_checkpoint(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "ckpt_bad")  # same, less one listed tensor
    _drop(tmp_path / "ckpt_bad", "layers.0.attn.wkv.weight_scale")
    ref.pop("experts")
    ref["native_keys"] = NATIVE_KEYS
    ref["port"] = random.randint(20000, 40000)
    torch.save(ref, tmp_path / "ref.pt")
    # VLLM_PLUGINS="": vLLM's loader skips ds-plugins here, so the script sees vLLM before and after
    # install() itself (the plugin path is the next test)
    res = vllm_env.run(
        script=SCRIPT,
        state=False,
        env={"OMP_NUM_THREADS": "1", "VLLM_PLUGINS": ""},
        cwd=tmp_path,
        pythonpath=(str(Path(__file__).resolve().parents[2]),),
    )
    ok = {line.split()[1] for line in res.proc.stdout.splitlines() if line.startswith("OK ")}
    assert res.proc.returncode == 0, res.output[-6000:]
    assert ok == {
        "registered",
        "parser",
        "config",
        "linear_w8a8_dynamic",
        "linear_float",
        "linear_w8a8_static",
        "moe_w4a8",
        "names",
    }, res.output[-3000:]


@pytest.mark.engines
def test_vllms_own_plugin_loader_registers_ascend_without_loading_torch_early(vllm_env, tmp_path):
    """Through ds-plugins' entry point alone: armed at plugin load (no torch import caused by us), registered
    when vLLM imports its quantization package, before vLLM's own `vllm serve` parser and config check run."""
    layer_checkpoint(tmp_path / "ckpt")
    res = vllm_env.run(
        "import sys\n"
        "import vllm.plugins as p\n"
        "before = set(sys.modules)\n"
        "p.load_general_plugins()\n"
        "import ds_plugins.registration as r\n"
        "assert 'vllm.model_executor.layers.quantization' not in set(sys.modules) - before\n"
        "assert r.get('vllm').notes['ascend_quant'].startswith('armed'), r.get('vllm').notes\n"
        "import vllm.platforms as platforms\n"
        "from vllm.platforms.cpu import CpuPlatform\n"
        "platforms._current_platform = CpuPlatform()\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "mc = EngineArgs(model='ckpt', quantization='ascend', dtype='bfloat16').create_model_config()\n"
        "assert mc.quantization == 'ascend'\n"
        "print('NOTE', r.get('vllm').notes['ascend_quant'])\n",
        env={"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    ).ok()
    assert "NOTE registered 'ascend'" in res.proc.stdout

"""The SGLang covers of the path manifest (ds_plugins/paths/sglang.py), in real SGLang processes.

SGLang 0.5.15-0.5.18 on SM12x: ds-plugins decides sparse_mla=triton and carries it with SGLang's own
switches SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=0 (V4 prefill off FlashMLA's SM90a/SM100f-only sparse kernel)
and SGLANG_SM120_FLASHMLA_BACKEND=triton (SGLang's SM120 attention off its FlashInfer default, which
0.5.15's pinned FlashInfer 0.6.12 lacks). The policy is given SGLang 0.5.15 on an SM120 GPU through
DS_PLUGINS_SIMULATE; the SGLang reading the switches is the live 0.5.23, whose `envs` and
`flash_mla_sm120` module read them the same way (EnvBool/EnvStr; the backend at the module's import),
in the process that registered and in a `spawn`ed child, as SGLang starts its schedulers.
"""

import pytest

pytestmark = pytest.mark.engines

SM120_0515 = {"DS_PLUGINS_SIMULATE": "--engine sglang==0.5.15 --capability 12.0 --lib deep_gemm=no-sm12x"}
READ = (
    "def read():\n"
    "    from sglang.srt.environ import envs\n"
    "    import sglang.kernels.ops.attention.flash_mla_sm120 as m\n"
    "    return (envs.SGLANG_OPT_FLASHMLA_SPARSE_PREFILL.get(), envs.SGLANG_SM120_FLASHMLA_BACKEND.get(),\n"
    "            m._sm120_default_backend)\n"
)
PARENT_AND_CHILD = (
    "import multiprocessing as mp\n"
    "import sglang.srt.plugins as p\np.load_plugins()\n"
    "print('PARENT', read())\n"
    "if __name__ == '__main__':\n"
    "    ctx = mp.get_context('spawn')\n"
    "    with ctx.Pool(1) as pool:\n"
    "        print('CHILD', pool.apply(read))\n"
)


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "covers.py"
    path.write_text(
        READ + PARENT_AND_CHILD + "import json, ds_plugins.registration as r\n"
        "print('DSP-STATE ' + json.dumps(r.get('sglang').snapshot()), flush=True)\n"
    )
    return path


def test_sparse_prefill_off_and_triton_backend_reach_sglang_and_its_workers(sglang_plugins_env, script):
    res = sglang_plugins_env.run(script=script, env=SM120_0515).ok()
    assert "PARENT (False, 'triton', 'triton')" in res.proc.stdout
    assert "CHILD (False, 'triton', 'triton')" in res.proc.stdout
    assert res.state["decisions"]["sparse_mla"] == "triton"
    assert res.state["status"] == "supported"


def test_the_users_own_values_stay(sglang_plugins_env, script):
    user = {**SM120_0515, "SGLANG_SM120_FLASHMLA_BACKEND": "flashinfer", "SGLANG_OPT_FLASHMLA_SPARSE_PREFILL": "1"}
    res = sglang_plugins_env.run(
        "import sglang.srt.plugins as p\np.load_plugins()\n" + READ + "print('PARENT', read())\n", env=user
    ).ok()
    assert "PARENT (True, 'flashinfer', 'flashinfer')" in res.proc.stdout
    kept = res.lines("ds-plugins keeps the user's value")  # one line per switch and process
    assert len([line for line in kept if "SGLANG_SM120_FLASHMLA_BACKEND=flashinfer" in line]) == 1
    assert len([line for line in kept if "SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=1" in line]) == 1


def test_sglang_0512_on_sm120_registers_nothing_and_says_upgrade(sglang_plugins_env):
    env = {"DS_PLUGINS_SIMULATE": "--engine sglang==0.5.12 --capability 12.0 --lib deep_gemm=no-sm12x"}
    res = sglang_plugins_env.run("import sglang.srt.plugins as p\np.load_plugins()\n", env=env).ok()
    assert res.state["status"] == "unsupported"
    assert [line for line in res.lines("upgrade to SGLang >= 0.5.13") if "MXFP4 expert MoE" in line]
    assert not [o for o in res.state["outcomes"] if o["state"] == "applied"]

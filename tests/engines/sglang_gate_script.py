"""Run by tests/engines/test_sglang_deepgemm_gate.py in a real SGLang environment (not collected by pytest).

    GATE_HOW=<how> GATE_WHEN=<when> python sglang_gate_script.py

how:  hook   (PYTHONPATH hook: `import sglang` is what reaches ds-plugins)
      entry  (SGLang's own sglang.srt.plugins.load_plugins(), as launch_server / Engine.__init__ /
              run_scheduler_process call it)
when: spawn  the parent registers, then a multiprocessing "spawn" child (like SGLang's schedulers)
             imports SGLang's real DeepGEMM configurer and reports what SGLang decided there
      stale  one process imports the configurer first, then registers (the gate computed before us)

The machine has no GPU, where SGLang's gate always says False. So that a test can tell "ds-plugins
turned it off" from "there was nothing to turn off", `fake_sm120()` makes SGLang's own gate see an
SM120 GPU with a DeepGEMM that has the SM12x APIs: sglang.srt.utils' device queries answer as on
SM120 and `deep_gemm` is a module with those three names. SGLang's configurer code itself is real.

The configurer is loaded without running deep_gemm_wrapper/__init__.py (which pulls in torchvision,
absent here): the package module is created empty, then SGLang's configurer.py is imported into it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import types

TAG = "GATE "


def fake_sm120() -> None:
    import sglang.srt.utils as utils

    utils.get_device_sm = lambda: 120
    utils.is_cuda = lambda: True
    deep_gemm = types.ModuleType("deep_gemm")
    for name in ("fp8_einsum", "m_grouped_fp8_fp4_gemm_nt_contiguous", "transform_sf_into_required_layout"):
        setattr(deep_gemm, name, lambda *a, **k: None)
    sys.modules["deep_gemm"] = deep_gemm


def import_configurer():
    import importlib
    import importlib.util

    import sglang.srt.layers as layers

    folder = os.path.join(list(layers.__path__)[0], "deep_gemm_wrapper")
    name = "sglang.srt.layers.deep_gemm_wrapper"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return importlib.import_module(name + ".configurer")


def register(how: str) -> None:
    if how == "hook":
        import sglang  # noqa: F401
    else:
        import sglang.srt.plugins as plugins

        plugins.load_plugins()


def report(where: str) -> dict:
    import ds_plugins.registration as r
    from sglang.srt.environ import envs

    configurer = sys.modules.get("sglang.srt.layers.deep_gemm_wrapper.configurer")
    copy = sys.modules.get("sglang.srt.batch_invariant_ops.batch_invariant_ops")
    out = {
        "where": where,
        "pid": os.getpid(),
        "env": os.environ.get("SGLANG_ENABLE_JIT_DEEPGEMM"),
        "sglang_switch": envs.SGLANG_ENABLE_JIT_DEEPGEMM.get(),
        "registration": r.get("sglang").snapshot(),
    }
    if configurer is not None:
        out.update(
            {
                name: getattr(configurer, name, None)
                for name in (
                    "ENABLE_JIT_DEEPGEMM",
                    "DEEPGEMM_BLACKWELL",
                    "DEEPGEMM_SCALE_UE8M0",
                    "DEEPGEMM_NEED_TMA_ALIGNED_SCALES",
                )
            }
        )
    if copy is not None:
        out["copy_in_batch_invariant_ops"] = copy.ENABLE_JIT_DEEPGEMM
    print(TAG + json.dumps(out), flush=True)
    return out


def child(how: str, queue) -> None:
    # As in SGLang's scheduler: the modules (and the configurer) load while the target is unpickled,
    # before run_scheduler_process calls load_plugins(): only the inherited environment is in force.
    import sglang  # noqa: F401

    fake_sm120()
    import_configurer()
    import sglang.srt.batch_invariant_ops.batch_invariant_ops  # noqa: F401  (holds a copy of the flag)

    if how == "entry":
        register(how)
    queue.put(report("child"))


def main(how: str, when: str) -> None:
    if when == "stale":
        import sglang.srt.utils  # noqa: F401  (with the hook, this is where ds-plugins registers)

        fake_sm120()
        import_configurer()
        import sglang.srt.batch_invariant_ops.batch_invariant_ops  # noqa: F401

        report("before")
        register(how)
        report("after")
        return
    register(how)
    report("parent")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(how, queue))
    proc.start()
    queue.get(timeout=300)
    proc.join(60)
    assert proc.exitcode == 0, proc.exitcode


if __name__ == "__main__":
    main(os.environ["GATE_HOW"], os.environ["GATE_WHEN"])

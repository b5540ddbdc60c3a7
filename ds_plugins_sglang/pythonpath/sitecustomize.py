"""ds-plugins' PYTHONPATH hook for SGLang (`PYTHONPATH=$(ds-plugins sglang-path)`).

Runs at the start of every interpreter that has this folder on PYTHONPATH,
including each worker SGLang spawns. It only arms an import hook: nothing else
happens unless the interpreter imports sglang. Then it hands over to the
sitecustomize that would have run without us, so none is shadowed.
"""


def _arm():
    try:
        from ds_plugins_sglang.pythonpath_hook import install
    except Exception:
        return  # ds-plugins is not installed for this interpreter: stay out of its way
    try:
        install()
    except Exception as exc:  # never break interpreter start-up
        import sys

        print(f"ds-plugins: PYTHONPATH hook not armed ({type(exc).__name__}: {exc})", file=sys.stderr)


def _chain():
    """Run the next sitecustomize on sys.path (a distro's, a venv's, a user's), as site.py would have."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.realpath(os.path.dirname(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # from here on, that one is "the" sitecustomize
    spec.loader.exec_module(module)


_arm()
_chain()

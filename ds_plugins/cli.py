"""The `ds-plugins` command: doctor, explain, selftest, sglang-path, pd-proxy."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor, settings, simulate
    from .registration import current_probe

    notes = []
    try:
        if args.simulate:
            probe = simulate.build(args)
            if settings.value("DS_PLUGINS_SIMULATE"):
                notes.append("DS_PLUGINS_SIMULATE is set but ignored: --simulate describes the machine")
        else:
            probe = current_probe()
    except simulate.SimulateError as exc:  # a bad --simulate flag: a usage error
        return fail(args, f"ds-plugins doctor: {exc}", doctor.EXIT_USAGE)
    except settings.ConfigError as exc:  # a bad DS_PLUGINS_SIMULATE (the message names it)
        return fail(args, f"ds-plugins doctor: {exc}", doctor.EXIT_CONFIG)
    report = doctor.build(probe, notes=notes)
    print(json.dumps(report, indent=2) if args.json else doctor.render(report))
    return report["exit_code"]


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    """One line on stderr; with --json also a JSON object on stdout, so scripts always get one."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    print(message, file=sys.stderr)
    return code


def _selftest(args: argparse.Namespace) -> int:
    from .kernels.selftest import main

    return main(as_json=args.json)


def _sglang_path(_args: argparse.Namespace) -> int:
    from ds_plugins_sglang import sglang_path

    print(sglang_path())
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with doctor.EXIT_USAGE (64, sysexits' EX_USAGE) in every subcommand:
    argparse's own 2 would read as doctor's "unsupported"."""

    def error(self, message):
        from .doctor import EXIT_USAGE

        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    from . import simulate

    top = _Parser(prog="ds-plugins", description="DeepSeek-V4 on stock vLLM and SGLang.")
    top.add_argument("--version", action="version", version=f"ds-plugins {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    doc = sub.add_parser(
        "doctor",
        help="explain this machine: environment, decisions, patches",
        description="Exit status: 0 supported, 1 bad DS_PLUGINS_* setting, "
        "2 unsupported (no engine with DeepSeek-V4), 64 bad command-line flags.",
    )
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.add_argument(
        "--simulate",
        action="store_true",
        help="decide for the hypothetical machine the flags below describe, not this one",
    )
    simulate.add_arguments(doc.add_argument_group("simulated environment (with --simulate)"))
    doc.set_defaults(func=_doctor)
    test = sub.add_parser(
        "selftest",
        help="run every ds-plugins kernel on a small V4-shaped problem here "
        "(GPU, or Triton's interpreter on a CPU) against its reference",
        description="Exit status: 0 all kernels match, 1 a kernel does not, 2 cannot run here "
        "(torch, triton or numpy missing), 64 bad command-line flags.",
    )
    test.add_argument("--json", action="store_true", help="machine-readable output")
    test.set_defaults(func=_selftest)
    path = sub.add_parser("sglang-path", help="print the folder to put on PYTHONPATH for SGLang")
    path.set_defaults(func=_sglang_path)
    from . import explain

    why = sub.add_parser(
        "explain",
        help="which known upstream failure an error or a log shows, and what to do here",
        description="Exit status: 0 a known failure recognised, 1 bad DS_PLUGINS_* setting, "
        "3 nothing recognised, 64 bad command-line flags, 66 the log cannot be read.",
    )
    explain.add_arguments(why)
    why.set_defaults(func=explain.run)
    from . import pd_proxy

    front = sub.add_parser(
        "pd-proxy",
        help="an OpenAI-compatible front for vLLM prefill/decode instances "
        "(Mooncake P/D with the ds-plugins connector)",
        description=pd_proxy.config.DESCRIPTION,
    )
    pd_proxy.add_arguments(front)
    front.set_defaults(func=pd_proxy.run)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if getattr(args, "simulate", None) is False and (
        args.engine or args.capability or args.lib or args.npu or args.torch
    ):
        top.error("--engine/--capability/--npu/--lib/--torch describe a simulated machine: add --simulate")
    try:
        return args.func(args)
    except BrokenPipeError:  # `ds-plugins doctor | head`: the reader left; nothing more to say
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

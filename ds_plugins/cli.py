"""The `ds-plugins` command: doctor, selftest, sglang-path."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor, settings, simulate
    from .registration import current_probe
    try:
        probe = simulate.build(args) if args.simulate else current_probe()
    except settings.ConfigError as exc:
        print(f"ds-plugins doctor: {exc}", file=sys.stderr)
        return doctor.EXIT_CONFIG
    report = doctor.build(probe)
    print(json.dumps(report, indent=2) if args.json else doctor.render(report))
    return report["exit_code"]


def _selftest(args: argparse.Namespace) -> int:
    from .kernels.selftest import main
    return main(as_json=args.json)


def _sglang_path(_args: argparse.Namespace) -> int:
    from ds_plugins_sglang import sglang_path
    print(sglang_path())
    return 0


def parser() -> argparse.ArgumentParser:
    from . import simulate
    top = argparse.ArgumentParser(prog="ds-plugins", description="DeepSeek-V4 on stock vLLM and SGLang.")
    top.add_argument("--version", action="version", version=f"ds-plugins {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="explain this machine: environment, decisions, patches",
                         description="Exit status: 0 supported, 1 bad DS_PLUGINS_* setting, "
                                     "2 unsupported (no engine with DeepSeek-V4).")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.add_argument("--simulate", action="store_true",
                     help="decide for the hypothetical machine the flags below describe, not this one")
    simulate.add_arguments(doc.add_argument_group("simulated environment (with --simulate)"))
    doc.set_defaults(func=_doctor)
    test = sub.add_parser("selftest", help="run every ds-plugins kernel on a small V4-shaped problem here "
                                           "(GPU, or Triton's interpreter on a CPU) against its reference",
                          description="Exit status: 0 all kernels match, 1 a kernel does not, 2 cannot run here.")
    test.add_argument("--json", action="store_true", help="machine-readable output")
    test.set_defaults(func=_selftest)
    path = sub.add_parser("sglang-path", help="print the folder to put on PYTHONPATH for SGLang")
    path.set_defaults(func=_sglang_path)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "doctor" and not args.simulate and (args.engine or args.capability or args.lib
                                                           or args.npu or args.torch):
        parser().error("--engine/--capability/--npu/--lib/--torch describe a simulated machine: add --simulate")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

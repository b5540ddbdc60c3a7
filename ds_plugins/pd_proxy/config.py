"""The proxy's command-line flags and the settings they make (no aiohttp here: parsing must work,
and fail clearly, where aiohttp is not installed)."""

from __future__ import annotations

import argparse
import urllib.parse
from dataclasses import dataclass

EXIT_OK = 0
EXIT_CANNOT_LISTEN = 1  # the address is taken or not ours
EXIT_CANNOT_RUN = 2  # aiohttp missing: `pip install 'ds-plugins[pd-proxy]'`
# 64 (usage) comes from the cli's parser, as for every subcommand

DESCRIPTION = (
    "An OpenAI-compatible front for a vLLM prefill/decode pair (or pool) with the ds-plugins Mooncake "
    "connector: each /v1/completions or /v1/chat/completions request is prefilled on a prefill instance "
    "(max_tokens 1, all but the last prompt token, kv_transfer_params do_remote_decode) and generated on a "
    "decode instance with the kv_transfer_params the prefill returned. "
    "Exit status: 0 stopped by a signal, 1 cannot listen on --host/--port, 2 aiohttp is not installed "
    "(pip install 'ds-plugins[pd-proxy]'), 64 bad command-line flags."
)


@dataclass(frozen=True)
class ProxyConfig:
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    timeout_s: float = 600.0  # the longest a side may keep the proxy waiting for its next bytes
    connect_timeout_s: float = 5.0
    health_interval_s: float = 5.0
    all_but_last: bool = True  # False: --full-prompt-prefill


def base_url(text: str) -> str:
    """An instance's base URL, http(s)://host:port with no path; the argparse type of --prefill/--decode."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host")
    if parts.path.rstrip("/") or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the server's base URL (http://host:port), without a path such as /v1"
        )
    try:
        parts.port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has a bad port") from None
    return f"{parts.scheme}://{parts.netloc}"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 0-65535")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill",
        nargs="+",
        type=base_url,
        required=True,
        metavar="URL",
        help="base URL of each prefill instance (vllm serve with kv_role kv_producer)",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        type=base_url,
        required=True,
        metavar="URL",
        help="base URL of each decode instance (vllm serve with kv_role kv_consumer)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"
    )
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--timeout-s",
        type=_positive,
        default=600.0,
        help="the longest a prefill or decode instance may go without sending a byte "
        "before the request fails with 504 (default 600)",
    )
    parser.add_argument(
        "--connect-timeout-s",
        type=_positive,
        default=5.0,
        help="connecting to an instance; past it the instance counts as down (default 5)",
    )
    parser.add_argument(
        "--health-interval-s",
        type=_positive,
        default=5.0,
        help="how often every instance's /health is checked (default 5)",
    )
    parser.add_argument(
        "--full-prompt-prefill",
        action="store_true",
        help="send the prefill the whole prompt, as vLLM's example proxies do, not all but its "
        "last token (which the connector needs for exact output with sliding-window KV)",
    )


def from_args(args: argparse.Namespace) -> ProxyConfig:
    for side in ("prefill", "decode"):
        urls = getattr(args, side)
        if len(set(urls)) != len(urls):
            raise ValueError(f"--{side} lists an instance twice: {' '.join(urls)}")
    shared = set(args.prefill) & set(args.decode)
    if shared:
        raise ValueError(f"{', '.join(sorted(shared))} is given as both --prefill and --decode")
    return ProxyConfig(
        prefill=tuple(args.prefill),
        decode=tuple(args.decode),
        host=args.host,
        port=args.port,
        timeout_s=args.timeout_s,
        connect_timeout_s=args.connect_timeout_s,
        health_interval_s=args.health_interval_s,
        all_but_last=not args.full_prompt_prefill,
    )

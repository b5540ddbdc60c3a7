"""One side of a two-process transfer, run as a script by the tests (mooncake loads only in a child).

    python peer_script.py '<json spec>'

Reads commands as JSON lines on stdin, writes JSON lines (one event each) on stdout.
Memory: one zeroed numpy buffer per region of the V4-shaped layout in the spec; a source fills its
buffers with bytes derived from its seed, which the sink regenerates to check what it received.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time

import numpy as np

from ds_plugins.kv.mooncake.allow import AllowList
from ds_plugins.kv.mooncake.auth import Authenticator
from ds_plugins.kv.mooncake.engine import Engine
from ds_plugins.kv.mooncake.messages import Region
from ds_plugins.kv.mooncake.peers import KVSink, KVSource, SourceRef


def emit(kind: str, **data) -> None:
    print(json.dumps({"event": kind, **data}), flush=True)


def buffers(layout: list[list[dict]]) -> list[list[np.ndarray]]:
    return [[np.zeros(r["stride"] * r["num_blocks"], dtype=np.uint8) for r in g] for g in layout]


def fill(bufs: list[list[np.ndarray]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for g in bufs:
        for b in g:
            b[:] = rng.integers(0, 256, size=b.size, dtype=np.uint8)


def regions(layout, bufs) -> list[list[Region]]:
    return [
        [
            Region(base=b.ctypes.data, block_len=r["block_len"], stride=r["stride"], num_blocks=r["num_blocks"])
            for r, b in zip(gl, gb)
        ]
        for gl, gb in zip(layout, bufs)
    ]


def security(spec: dict) -> dict:
    """The side channel's secret and allow-list from the spec (absent: unauthenticated, any address)."""
    secret = spec.get("secret")
    return {"auth": Authenticator(secret.encode() if secret else None), "allowed": AllowList(spec.get("allowed"))}


def leaks(engine: Engine) -> dict:
    return {
        "registered": len(engine.registered),
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("mooncake-")),
    }


def run_source(spec: dict) -> None:
    bufs = buffers(spec["layout"])
    fill(bufs, spec["seed"])
    engine = Engine("127.0.0.1", "tcp", "", spec.get("transfer_timeout_s", 5))
    src = KVSource(
        engine,
        spec["engine_id"],
        0,
        regions(spec["layout"], bufs),
        spec.get("host", "127.0.0.1"),
        spec["port"],
        spec.get("abort_timeout_s", 30),
        tp_size=spec.get("tp_size", 0),
        decode_tp_size=spec.get("decode_tp_size", 0),
        **security(spec),
    )
    for rid in spec["expose"]:
        src.expose(rid)
    emit("ready", session=engine.session, port=src.address[1])
    done: set[str] = set()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    while not stop.is_set():  # until the test says quit (any line on stdin, or EOF)
        for rid in src.poll_finished():
            done.add(rid)
            emit("finished", request_id=rid, failed=src.failed.get(rid))
        time.sleep(0.02)
    src.close()
    emit(
        "closed",
        pending=sorted(src.pending),
        rejected=src.rejected,
        refused=src.refused,
        failed_kept=len(src.failed),
        **leaks(engine),
    )
    engine.close()


def run_sink(spec: dict) -> None:
    """Fetches as told; each result is emitted when it arrives ("wait": false lets several run at once)."""
    layout = spec["layout"]
    bufs = buffers(layout)
    engine = Engine("127.0.0.1", "tcp", "", spec.get("transfer_timeout_s", 5))
    sink = KVSink(
        engine,
        spec["engine_id"],
        regions(layout, bufs),
        spec.get("handshake_timeout_s", 2),
        num_workers=2,
        null_block=0,
        tp_size=spec.get("tp_size", 0),
        **security(spec),
    )
    expected = buffers(layout)
    fill(expected, spec["source_seed"])
    emit("ready", session=engine.session)
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [commands.put(json.loads(line)) for line in sys.stdin], daemon=True).start()
    started: dict[str, tuple[dict, float]] = {}
    waiting = False
    while True:
        if not waiting:
            try:
                cmd = commands.get(timeout=0.005)
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if cmd["op"] == "quit":
                    break
                ref = SourceRef(
                    cmd.get("host", "127.0.0.1"),
                    cmd["port"],
                    cmd.get("engine_id", spec["source_engine_id"]),
                    cmd["request_id"],
                    tp_size=cmd.get("tp_size", 0),
                )
                started[cmd["request_id"]] = (cmd, time.perf_counter())
                sink.fetch(cmd["request_id"], ref, cmd["local"], cmd["remote"])
                waiting = cmd.get("wait", True)
        for res in sink.poll():
            cmd, t0 = started.pop(res.request_id)
            waiting = waiting and bool(started)
            emit(
                "result",
                request_id=res.request_id,
                ok=res.ok,
                nbytes=res.nbytes,
                error=res.error,
                failed_blocks=sorted(res.failed_blocks),
                seconds=time.perf_counter() - t0,
                check=verify(layout, bufs, expected, cmd["local"], cmd["remote"], set(res.failed_blocks)),
            )
        if waiting:
            time.sleep(0.005)
    sources = sink.sources
    sink.close()
    emit("closed", inflight=sink.inflight, open_sockets=sink.open_sockets, sources=sources, **leaks(engine))
    engine.close()


def verify(layout, got, expected, local_blocks, remote_blocks, failed) -> dict:
    """Per region: filled blocks equal the source's blocks (block_len bytes), everything else still zero."""
    mismatched, dirty, filled = [], [], 0
    for g, (gl, gg, ge) in enumerate(zip(layout, got, expected)):
        pairs = {
            lid: remote_blocks[g][i]
            for i, lid in enumerate(local_blocks[g])
            if lid != 0 and lid not in failed and i < len(remote_blocks[g]) and remote_blocks[g][i] != 0
        }
        for r, (rl, bg, be) in enumerate(zip(gl, gg, ge)):
            s, n = rl["stride"], rl["block_len"]
            for blk in range(rl["num_blocks"]):
                mine = bg[blk * s : (blk + 1) * s]
                if blk in pairs:
                    rid = pairs[blk]
                    if not np.array_equal(mine[:n], be[rid * s : rid * s + n]):
                        mismatched.append([g, r, blk])
                    if mine[n:].any():
                        dirty.append([g, r, blk])  # padding past block_len must not be written
                    filled += 1
                elif mine.any():
                    dirty.append([g, r, blk])
    return {"mismatched": mismatched, "dirty": dirty, "filled_blocks": filled}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    {"source": run_source, "sink": run_sink}[spec["role"]](spec)

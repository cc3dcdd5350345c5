"""Batch decode over a paged KV cache: flashinfer_jit (eager run() and CUDA-graph replay) against
FlashAttention-2 on a dense (gathered) KV cache and FlexAttention decode, as achieved memory bandwidth
against the device-to-device copy bandwidth measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_decode.py [--out DIR] [--workloads a,b] [--impls a,b]
                                                    [--quick] [--deadline SECONDS] [--dry-run]

Workloads: bf16, 32 q heads, 8 kv heads, head_dim 128, page size 16, NHD pages in shuffled order
(torch.randperm, a few unused pages), one query token per request:
  b1_kv32768 (batch 1 x 32768 keys), b16_kv4096, b128_kv2048.

Bandwidth: bytes = K + V bytes read once (sum of kv_len * Hkv * D * 2 bytes, times 2) + q bytes + out
bytes (page-table and LSE bytes ignored); GB/s = bytes / median time, 1 GB = 1e9 bytes. copy_gbps: a
1 GiB device-to-device dst.copy_(src), counting read + write (2 GiB); pct_of_copy = gbps / copy_gbps.

Timing: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") (L2 flushed between calls).
* flashinfer_jit: BatchDecodeWithPagedKVCacheWrapper; plan() outside the timing; run() into a
  preallocated out. Each call pays run()'s Python overhead; do_bench's L2 flush usually hides it.
* flashinfer_jit_graph: the same run() captured once in a CUDA graph (use_cuda_graph=True wrapper);
  graph.replay() timed: no Python launch overhead.
* fa2_dense_kv: torch.ops.aten._flash_attention_forward (PyTorch's FlashAttention-2) with cu_seqlens
  (q_len 1 per request) on K/V already gathered into one dense tensor, each request's keys contiguous
  (the gather is not timed). It reads the same K/V bytes, without a page table.
* flex_decode: torch.compile(flex_attention) on q [B, Hq, 1, D] and dense K/V [B, Hkv, L, D] (uniform
  lengths: no mask), enable_gqa=True; compile time reported in the row. Same bytes, no page table.

Also reported: run() host overhead (microseconds per call, 200 back-to-back calls on a tiny batch so the
GPU keeps up; the same for graph.replay()) and plan() host time for every workload from CPU int32
page tables. Correctness per row: max |diff| against the float32 reference (every request) and against
our eager output.

Each peer runs in its own try/except: a failing peer prints its error and the run goes on. Results are
written after every workload to <out>/<card>-<date>-decode.json and .md (the prefill JSON's shape:
card, date, commit, torch, rows of workload, impl, ms, gbps, copy_gbps, pct_of_copy, notes).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import reference  # noqa: E402

IMPLS = ("flashinfer_jit", "flashinfer_jit_graph", "fa2_dense_kv", "flex_decode")
NUM_QO_HEADS = common.NUM_QO_HEADS
NUM_KV_HEADS = common.NUM_KV_HEADS
HEAD_DIM = 128
PAGE_SIZE = 16
KV_LAYOUT = "NHD"
DTYPE = common.DTYPE
WORKSPACE_BYTES = 256 << 20
COPY_BYTES = 1 << 30
BYTES_CONVENTION = (
    "K+V bytes read once (sum kv_len * Hkv * D * 2 B, x2) + q bytes + out bytes; page table and LSE ignored; "
    "GB = 1e9 B. copy: 1 GiB dst.copy_(src) counted as read + write (2 GiB)")


@dataclass(frozen=True)
class DecodeWorkload:
    name: str
    batch_size: int
    kv_len: int
    num_qo_heads: int = NUM_QO_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    head_dim: int = HEAD_DIM
    page_size: int = PAGE_SIZE
    window_left: int = -1   # attention variants (issue #12): the query sees its last window_left + 1 keys
    soft_cap: float = 0.0
    pos_encoding: str = ""  # FlashInfer's pos_encoding_mode ("ROPE_LLAMA", "ALIBI"); "" is "NONE"
    kv_dtype: str = ""      # an fp8 cache (issue #16): "float8_e4m3fn" / "float8_e5m2"; "" is DTYPE

    @property
    def variant(self) -> str:
        label = common.variant_label(self.window_left, self.soft_cap)
        return ", ".join(p for p in (label, f"pos_encoding_mode {self.pos_encoding}" if self.pos_encoding else "",
                                     f"{self.kv_dtype} KV" if self.kv_dtype else "") if p)

    @property
    def cache_dtype(self) -> torch.dtype:
        return getattr(torch, self.kv_dtype) if self.kv_dtype else DTYPE

    @property
    def visible_kv(self) -> int:
        """Keys one query reads: all of them, or the window's."""
        return self.kv_len if self.window_left < 0 else min(self.kv_len, self.window_left + 1)

    @property
    def kv_lens(self) -> list[int]:
        return [self.kv_len] * self.batch_size

    @property
    def num_pages(self) -> int:
        return self.batch_size * reference.num_pages_for(self.kv_len, self.page_size)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch_size * self.visible_kv * self.num_kv_heads * self.head_dim * self.cache_dtype.itemsize

    @property
    def bytes(self) -> int:
        q_bytes = self.batch_size * self.num_qo_heads * self.head_dim * DTYPE.itemsize
        return self.kv_bytes + 2 * q_bytes  # q read, out written

    def describe(self) -> str:
        return (f"{self.name}: batch {self.batch_size} x kv {self.kv_len}, Hq={self.num_qo_heads}, "
                f"Hkv={self.num_kv_heads}, D={self.head_dim}, page {self.page_size} {KV_LAYOUT} "
                f"({self.num_pages} pages, shuffled), {self.bytes / 1e6:.1f} MB moved"
                + (f", {self.variant} (bytes: the keys it sees)" if self.variant else ""))


WORKLOADS = (
    DecodeWorkload("b1_kv32768", 1, 32768),
    DecodeWorkload("b16_kv4096", 16, 4096),
    DecodeWorkload("b128_kv2048", 128, 2048),
    # variants (issue #12: within 5% of plain decode's bandwidth); the window reads the last 1024 keys
    DecodeWorkload("b128_kv2048_softcap30", 128, 2048, soft_cap=30.0),
    DecodeWorkload("b128_kv2048_window1023", 128, 2048, window_left=1023),
    # positional encodings (issue #16: fused RoPE within 5% of plain decode); ALiBi
    DecodeWorkload("b128_kv2048_rope", 128, 2048, pos_encoding="ROPE_LLAMA"),
    DecodeWorkload("b16_kv4096_rope", 16, 4096, pos_encoding="ROPE_LLAMA"),
    DecodeWorkload("b128_kv2048_alibi", 128, 2048, pos_encoding="ALIBI"),
    # fp8 KV caches (issue #16: >= 85% of the copy bandwidth counting fp8 bytes, <= 0.6x the bf16 time at
    # b128 x 2048); bytes count the fp8 cache's
    DecodeWorkload("b1_kv32768_fp8", 1, 32768, kv_dtype="float8_e4m3fn"),
    DecodeWorkload("b16_kv4096_fp8", 16, 4096, kv_dtype="float8_e4m3fn"),
    DecodeWorkload("b128_kv2048_fp8", 128, 2048, kv_dtype="float8_e4m3fn"),
    DecodeWorkload("b128_kv2048_fp8e5m2", 128, 2048, kv_dtype="float8_e5m2"),
)
# Targets of the paged-KV issue (% of copy bandwidth, eager run()); FlashInfer 0.7.2 reached 65 / 80 / 97.
TARGET_PCT = {"b1_kv32768": 70.0, "b16_kv4096": 85.0, "b128_kv2048": 95.0}


def gbps(nbytes: int, ms: float | None) -> float | None:
    if ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


# ---- data ----------------------------------------------------------------------------------------

@dataclass
class Data:
    wl: DecodeWorkload
    batch: reference.PagedBatch  # q [B, Hq, D]; dense k/v [B * L, Hkv, D]; cache; page table (CPU int32)
    scale: float
    ref_out: torch.Tensor = field(default=None)  # float32 [B, Hq, D]


def make_data(wl: DecodeWorkload, seed: int = 0) -> Data:
    batch = reference.make_paged_batch([1] * wl.batch_size, wl.kv_lens, wl.num_qo_heads, wl.num_kv_heads,
                                       wl.head_dim, DTYPE, "cuda", KV_LAYOUT, wl.page_size, seed, extra_pages=16)
    v = batch.v
    if wl.kv_dtype:  # an fp8 cache: the kernel reads those bytes; the reference their values (scale 1)
        batch = dataclasses.replace(batch, cache=batch.cache.to(wl.cache_dtype), k=batch.k.to(wl.cache_dtype),
                                    v=batch.v.to(wl.cache_dtype))
        v = batch.v.float()
    data = Data(wl, batch, 1.0 / math.sqrt(wl.head_dim))
    q, k, score_fn = batch.q, batch.k.float() if wl.kv_dtype else batch.k, None
    if wl.pos_encoding == "ROPE_LLAMA":  # rotated in float64 at FlashInfer's positions (the query at kv_len - 1)
        q_pos, k_pos = reference.rope_positions(batch.qo_indptr, batch.kv_indptr)
        q = reference.rope_reference(q, q_pos.to(q.device), wl.head_dim, False, 1.0, 1e4)
        k = reference.rope_reference(k, k_pos.to(k.device), wl.head_dim, False, 1.0, 1e4)
    elif wl.pos_encoding == "ALIBI":
        slopes = reference.alibi_slopes_ref(wl.num_qo_heads).to(q.device).view(-1, 1, 1)
        score_fn = lambda s, qi, ki, h, qp, r: s + slopes * (ki - qp).float()  # noqa: E731
    data.ref_out, _ = reference.ragged_attention_ref(q, k, v, batch.qo_indptr, batch.kv_indptr,
                                                     False, data.scale, window_left=wl.window_left,
                                                     logits_soft_cap=wl.soft_cap, score_fn=score_fn)
    return data


# ---- implementations -----------------------------------------------------------------------------

@dataclass
class Prepared:
    fn: Callable[[], Any]  # the timed call
    to_out: Callable[[Any], torch.Tensor]  # fn's result -> [B, Hq, D]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _plan_decode(wrapper, data: Data) -> None:
    t = data.batch.table
    wl = data.wl
    wrapper.plan(t.indptr, t.indices, t.last_page_len, wl.num_qo_heads, wl.num_kv_heads, wl.head_dim, wl.page_size,
                 q_data_type=DTYPE, kv_data_type=wl.cache_dtype, window_left=wl.window_left,
                 logits_soft_cap=wl.soft_cap, pos_encoding_mode=wl.pos_encoding or "NONE")


def _plan_shape(wrapper) -> str:
    """Work items of the plan in force (internal state; informational only). Decode has one q tile per
    request, so items beyond the batch size are split-KV chunks."""
    state = getattr(getattr(wrapper, "_inner", None), "_state", None)
    try:
        if wrapper.is_cuda_graph_enabled:
            return f"grid sized for {state.grid_items} work items x {state.num_kv_heads} kv heads (CUDA graph)"
        split = "split-KV" if state.grid_items > state.batch else "no split"
        return f"{state.grid_items} work items x {state.num_kv_heads} kv heads for {state.batch} requests ({split})"
    except AttributeError:
        return "plan shape unknown"


def _new_decode_wrapper(use_cuda_graph: bool = False):
    import flashinfer_jit

    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    return flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout=KV_LAYOUT,
                                                             use_cuda_graph=use_cuda_graph)


def setup_flashinfer_jit(data: Data) -> Prepared:
    wrapper = _new_decode_wrapper()
    t0 = time.perf_counter()
    _plan_decode(wrapper, data)
    plan_s = time.perf_counter() - t0
    q, cache = data.batch.q, data.batch.cache
    out = torch.empty_like(q)

    def fn():
        return wrapper.run(q, cache, out=out)

    return Prepared(fn, lambda r: out, ["plan() outside the timing; run() into a preallocated out",
                                        _plan_shape(wrapper)], {"first_plan_ms": round(plan_s * 1e3, 3)})


def setup_flashinfer_jit_graph(data: Data) -> Prepared:
    wrapper = _new_decode_wrapper(use_cuda_graph=True)
    _plan_decode(wrapper, data)
    q, cache = data.batch.q, data.batch.cache
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        wrapper.run(q, cache, out=out)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        wrapper.run(q, cache, out=out)
    def replay():
        # The wrapper owns the plan metadata the captured kernel reads: keep it alive with the graph
        # (a freed wrapper's buffers get reused and the replay reads garbage).
        graph.replay()
        return wrapper

    return Prepared(replay, lambda r: out, ["run() captured once in a CUDA graph; graph.replay() timed",
                                            _plan_shape(wrapper)])


def _no_variant(wl: DecodeWorkload, who: str) -> None:
    if wl.variant:
        raise NotImplementedError(f"{who}: the {wl.variant} rows compare our variant with our plain decode")


def setup_fa2_dense_kv(data: Data) -> Prepared:
    wl = data.wl
    _no_variant(wl, "fa2_dense_kv")
    b = data.batch
    cu_q = b.qo_indptr.to("cuda")
    cu_k = b.kv_indptr.to("cuda")
    notes = ["K/V gathered into one dense [total_kv, Hkv, D] tensor, per-request contiguous (gather not timed); "
             "no page table"]
    k, v = b.k, b.v
    try:
        common.fa2_varlen_call(b.q, k, v, cu_q, cu_k, 1, wl.kv_len, False, data.scale)
        torch.cuda.synchronize()
        notes.append(f"GQA native ({wl.num_kv_heads} kv heads)")
    except RuntimeError as exc:
        group = wl.num_qo_heads // wl.num_kv_heads
        k = b.k.repeat_interleave(group, dim=1).contiguous()
        v = b.v.repeat_interleave(group, dim=1).contiguous()
        notes.append(f"k/v heads EXPANDED {wl.num_kv_heads}->{wl.num_qo_heads}: reads {group}x the K/V bytes "
                     f"(native GQA failed: {str(exc).splitlines()[0][:120]})")

    def fn():
        return common.fa2_varlen_call(b.q, k, v, cu_q, cu_k, 1, wl.kv_len, False, data.scale)

    return Prepared(fn, lambda r: r, notes)


def setup_flex_decode(data: Data) -> Prepared:
    wl = data.wl
    _no_variant(wl, "flex_decode")
    b = data.batch
    q_f = b.q.view(wl.batch_size, 1, wl.num_qo_heads, wl.head_dim).transpose(1, 2).contiguous()
    k_f = b.k.view(wl.batch_size, wl.kv_len, wl.num_kv_heads, wl.head_dim).transpose(1, 2).contiguous()
    v_f = b.v.view(wl.batch_size, wl.kv_len, wl.num_kv_heads, wl.head_dim).transpose(1, 2).contiguous()
    flex = common.compiled_flex_attention()

    def fn():
        return flex(q_f, k_f, v_f, scale=data.scale, enable_gqa=True)

    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    notes = [f"q [B, Hq, 1, D], dense K/V [B, Hkv, L, D] (no page table, no mask), enable_gqa; "
             f"first call (compile) {compile_s:.1f} s"]
    return Prepared(fn, lambda r: r.transpose(1, 2).reshape(wl.batch_size, wl.num_qo_heads, wl.head_dim), notes,
                    {"compile_s": round(compile_s, 3)})


SETUP = {
    "flashinfer_jit": setup_flashinfer_jit,
    "flashinfer_jit_graph": setup_flashinfer_jit_graph,
    "fa2_dense_kv": setup_fa2_dense_kv,
    "flex_decode": setup_flex_decode,
}


# ---- copy bandwidth, host overheads --------------------------------------------------------------

def measure_copy(warmup: int, rep: int) -> dict[str, Any]:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    src.fill_(1)
    dst = torch.empty_like(src)
    ms = common.bench_ms(lambda: dst.copy_(src), warmup=warmup, rep=rep)
    ms_clean = clean_l2_ms(lambda: dst.copy_(src), rep)
    return {"bytes_copied": COPY_BYTES, "bytes_counted": 2 * COPY_BYTES, "ms": ms, "gbps": gbps(2 * COPY_BYTES, ms),
            "ms_clean_l2": ms_clean, "gbps_clean_l2": gbps(2 * COPY_BYTES, ms_clean),
            "note": "1 GiB device-to-device dst.copy_(src), read + write counted, do_bench median "
                    "(and with a clean-L2 read sweep instead of do_bench's write flush)"}


_CLEAN_SWEEP: list[torch.Tensor] = []


def clean_l2_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median ms with L2 swept by a *read* of 256 MB before each call (CUDA events around fn only).

    do_bench flushes L2 by writing a buffer, so a short kernel first pays for writing back ~50 MB of
    dirty lines (~10 us on H100): that is the flush's cost, not the kernel's. Reading leaves only clean
    lines, which the kernel evicts for free."""
    if not _CLEAN_SWEEP:
        _CLEAN_SWEEP.append(torch.ones(256 << 20, dtype=torch.uint8, device="cuda"))
    sweep = _CLEAN_SWEEP[0]
    for _ in range(5):
        fn()
    events = []
    for i in range(reps):
        if i % 10 == 0:
            # A ~2 ms spin ahead of every 10 calls: the GPU never waits for the host to enqueue the
            # next call, so run()'s Python overhead (or a hiccup of it) stays out of the timing.
            torch.cuda._sleep(4_000_000)
        sweep.max()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def _host_us(fn: Callable[[], Any], calls: int) -> dict[str, float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    torch.cuda.synchronize()
    times.sort()
    return {"median_us": round(times[len(times) // 2], 2), "min_us": round(times[0], 2),
            "p90_us": round(times[int(0.9 * (len(times) - 1))], 2), "mean_us": round(sum(times) / len(times), 2)}


def measure_run_overhead(calls: int) -> dict[str, Any]:
    """Host microseconds per run() (and per graph.replay()) on a tiny batch (1 x 16 keys): the kernel
    takes a few microseconds, so the GPU keeps up and the call time is the Python/launch overhead."""
    wl = DecodeWorkload("tiny_b1_kv16", 1, 16)
    data = Data(wl, reference.make_paged_batch([1], [16], wl.num_qo_heads, wl.num_kv_heads, wl.head_dim, DTYPE,
                                               "cuda", KV_LAYOUT, wl.page_size, seed=1), 1.0 / math.sqrt(wl.head_dim))
    eager = setup_flashinfer_jit(data)
    graph = setup_flashinfer_jit_graph(data)
    for fn in (eager.fn, graph.fn):
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    result = {"batch": "1 x kv 16 (Hq 32, Hkv 8, D 128, page 16)", "calls": calls,
              "run": _host_us(eager.fn, calls), "graph_replay": _host_us(graph.fn, calls),
              "note": "host time per call, back to back, no sync between calls"}
    wrapper = _new_decode_wrapper()
    _plan_decode(wrapper, data)
    result["plan"] = _host_us(lambda: _plan_decode(wrapper, data), calls)
    return result


def measure_plan_us(data: Data, calls: int) -> dict[str, Any]:
    """Host time of plan() from CPU int32 page tables (no device sync between calls)."""
    wrapper = _new_decode_wrapper()
    _plan_decode(wrapper, data)  # first call: kernel load, first-use allocations
    torch.cuda.synchronize()
    stats = _host_us(lambda: _plan_decode(wrapper, data), calls)
    return {"workload": data.wl.name, "calls": calls, **stats, "pages": data.wl.num_pages,
            "note": "plan() host time from CPU int32 indptr/indices/last_page_len"}


# ---- results -------------------------------------------------------------------------------------

def markdown(payload: dict[str, Any]) -> str:
    env = payload["env"]
    copy = payload.get("copy") or {}
    lines = [
        f"# Paged decode: {payload['card']} ({payload['date']}, commit {payload['commit']})",
        "",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}; bf16, 32 q heads / "
        f"8 kv heads, head_dim 128, page 16 {KV_LAYOUT}, shuffled pages; {payload['timing']}.",
        f"Bytes: {payload['bytes_convention']}. Copy bandwidth this run: {common.fmt(copy.get('gbps'), '.0f')} GB/s "
        f"(clean-L2 timing: {common.fmt(copy.get('gbps_clean_l2'), '.0f')} GB/s).",
        "Clean L2: the same run timed with L2 swept by a 256 MB *read* before each call (CUDA events around the "
        "call), since do_bench's *write* flush leaves ~50 MB of dirty lines that the next kernel pays to write back.",
        "",
        "| workload | impl | ms | GB/s | % of copy | clean-L2 ms | clean-L2 % of copy | max abs vs ref | max abs vs ours | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['workload']} | {r['impl']} | {common.fmt(r['ms'], '.4f')} | {common.fmt(r['gbps'], '.0f')} | "
            f"{common.fmt(r['pct_of_copy'], '.1f')} | {common.fmt(r.get('ms_clean_l2'), '.4f')} | "
            f"{common.fmt(r.get('pct_of_copy_clean_l2'), '.1f')} | {common.fmt(r.get('max_abs_vs_ref'), '.3g')} | "
            f"{common.fmt(r.get('max_abs_vs_ours'), '.3g')} | {r['notes'].replace('|', '/')} |")
    overhead = payload.get("run_overhead") or {}
    lines += ["", "Host overhead (tiny batch, microseconds per call, median): "
              f"run() {overhead.get('run', {}).get('median_us', '-')}, "
              f"graph.replay() {overhead.get('graph_replay', {}).get('median_us', '-')}, "
              f"plan() {overhead.get('plan', {}).get('median_us', '-')}.", ""]
    plans = payload.get("plan_time") or []
    if plans:
        lines += ["| workload | pages | plan() median us | p90 us |", "|---|---:|---:|---:|"]
        for p in plans:
            lines.append(f"| {p.get('workload')} | {p.get('pages', '-')} | {p.get('median_us', '-')} | "
                         f"{p.get('p90_us', '-')} |")
        lines.append("")
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'workload':<14} {'impl':<21} {'ms':>9} {'GB/s':>7} {'% copy':>7} {'|d| ref':>8} {'|d| ours':>9}")
    for r in rows:
        print(f"{r['workload']:<14} {r['impl']:<21} {common.fmt(r['ms'], '9.4f'):>9} {common.fmt(r['gbps'], '7.0f'):>7} "
              f"{common.fmt(r['pct_of_copy'], '7.1f'):>7} {common.fmt(r.get('max_abs_vs_ref'), '8.3g'):>8} "
              f"{common.fmt(r.get('max_abs_vs_ours'), '9.3g'):>9}")
    sys.stdout.flush()


def _row(wl: DecodeWorkload, impl: str, ms: float | None, notes: str, copy_gbps: float | None) -> dict[str, Any]:
    g = gbps(wl.bytes, ms)
    return {"workload": wl.name, "impl": impl, "ms": ms, "gbps": g, "copy_gbps": copy_gbps,
            "pct_of_copy": (100.0 * g / copy_gbps) if (g and copy_gbps) else None, "notes": notes,
            "bytes": wl.bytes, "max_abs_vs_ref": None, "max_abs_vs_ours": None}


def variant_vs_plain(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Our GB/s on each variant workload (a *_softcap* / *_window* / *_rope* / *_alibi* name) over our plain
    decode's on the workload it extends (issues #12, #16: within 5%), eager run() rows, do_bench timing.
    The fp8 rows are fp8_vs_bf16's."""
    gb = {(r["workload"], r["impl"]): r.get("gbps") for r in rows}
    out = {}
    for (name, impl), g in gb.items():
        suffixes = ("_softcap", "_window", "_rope", "_alibi")
        if impl == "flashinfer_jit" and g and any(x in name for x in suffixes):
            base = name
            for x in suffixes:
                base = base.split(x)[0]
            plain = gb.get((base, "flashinfer_jit"))
            if plain:
                out[name] = g / plain
    return out


def fp8_vs_bf16(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each fp8 row (a *_fp8* name, eager run()): its time over the bf16 cache's on the same batch (issue #16:
    <= 0.6 at b128 x 2048) and its % of the copy bandwidth counting fp8 bytes (>= 85 on every row)."""
    by = {(r["workload"], r["impl"]): r for r in rows}
    out = {}
    for (name, impl), r in by.items():
        if impl != "flashinfer_jit" or "_fp8" not in name or not r.get("ms"):
            continue
        bf16 = by.get((name.split("_fp8")[0], "flashinfer_jit"), {})
        out[name] = {"time_vs_bf16": r["ms"] / bf16["ms"] if bf16.get("ms") else None,
                     "pct_of_copy": r.get("pct_of_copy")}
    return out


def target_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against our eager rows, under both timings (a target can fail here)."""
    verdicts = []
    for r in rows:
        target = TARGET_PCT.get(r["workload"])
        if r["impl"] != "flashinfer_jit" or target is None:
            continue
        clean, dirty = r.get("pct_of_copy_clean_l2"), r.get("pct_of_copy")
        verdicts.append({"workload": r["workload"], "target_pct": target, "clean_pct": clean, "do_bench_pct": dirty,
                         "clean_met": clean is not None and clean >= target,
                         "do_bench_met": dirty is not None and dirty >= target})
    return verdicts


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(common.REPO / "benchmarks" / "results"),
                   help="directory for <card>-<date>-decode.json/.md (default: benchmarks/results)")
    p.add_argument("--workloads", default=None, help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS))
    p.add_argument("--impls", default=None, help="comma-separated subset of: " + ", ".join(IMPLS))
    p.add_argument("--quick", action="store_true",
                   help="do_bench warmup=5 rep=20 and 20 host-timing calls instead of 25/100 and 200")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after start past which remaining impls are skipped (results so far are kept)")
    p.add_argument("--dry-run", action="store_true", help="print workloads and byte counts; no GPU needed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    names = common.select([w.name for w in WORKLOADS], args.workloads, "workload")
    impls = common.select(IMPLS, args.impls, "impl")
    selected = [w for w in WORKLOADS if w.name in names]
    warmup, rep, calls = (5, 20, 20) if args.quick else (25, 100, 200)

    if args.dry_run:
        for wl in selected:
            print(wl.describe())
            print(f"  K+V {wl.kv_bytes / 1e6:.1f} MB, q+out {(wl.bytes - wl.kv_bytes) / 1e3:.1f} KB; at 3000 GB/s: "
                  f"{wl.bytes / 3000e9 * 1e3:.4f} ms")
        print("impls:", ", ".join(impls))
        print(f"timing: do_bench warmup={warmup} rep={rep} median; host timings: {calls} calls")
        print(f"bytes: {BYTES_CONVENTION}")
        return 0

    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device visible (use --dry-run to inspect the workloads)", file=sys.stderr)
        return 2

    card = common.card_slug()
    out_dir = Path(args.out)
    stem = f"{card}-{common.today()}-decode"
    payload: dict[str, Any] = {
        "card": card,
        "date": common.today(),
        "commit": common.git_commit(),
        "torch": torch.__version__,
        "env": common.environment(),
        "timing": f"triton do_bench(warmup={warmup}, rep={rep}, return_mode='median'), L2 flushed by do_bench",
        "bytes_convention": BYTES_CONVENTION,
        "workloads": {w.name: {"batch_size": w.batch_size, "kv_len": w.kv_len, "num_qo_heads": w.num_qo_heads,
                               "num_kv_heads": w.num_kv_heads, "head_dim": w.head_dim, "page_size": w.page_size,
                               "kv_layout": KV_LAYOUT, "pages": w.num_pages, "bytes": w.bytes} for w in selected},
        "rows": [],
        "plan_time": [],
    }

    def save() -> None:
        common.write_json(out_dir / f"{stem}.json", payload)
        (out_dir / f"{stem}.md").write_text(markdown(payload))

    print(f"bench_decode: {payload['env'].get('device_name')} | torch {torch.__version__} | commit {payload['commit']}")
    try:
        payload["copy"] = measure_copy(warmup, rep)
        torch.cuda.empty_cache()  # the two 1 GiB buffers
    except Exception as exc:  # noqa: BLE001
        payload["copy"] = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    copy_gbps = payload["copy"].get("gbps")
    print(f"copy: {payload['copy']}")
    if any(i.startswith("flashinfer_jit") for i in impls):
        try:
            payload["run_overhead"] = measure_run_overhead(calls)
        except Exception as exc:  # noqa: BLE001
            payload["run_overhead"] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        print(f"host overhead: {payload['run_overhead']}")
    save()

    for wl in selected:
        print(f"\n== {wl.describe()}")
        sys.stdout.flush()
        try:
            data = make_data(wl)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            for impl in impls:
                payload["rows"].append(_row(wl, impl, None, f"input setup failed: {exc}", copy_gbps))
            save()
            continue
        if any(i.startswith("flashinfer_jit") for i in impls):
            try:
                payload["plan_time"].append(measure_plan_us(data, max(10, calls // 4)))
            except Exception as exc:  # noqa: BLE001
                payload["plan_time"].append({"workload": wl.name, "error": f"{type(exc).__name__}: {exc}"})
                traceback.print_exc()
            print(f"  plan(): {payload['plan_time'][-1]}")
        ours_out = None
        for impl in impls:
            if args.deadline is not None and time.perf_counter() - start > args.deadline:
                payload["rows"].append(_row(wl, impl, None, f"skipped: past --deadline {args.deadline:.0f} s", copy_gbps))
                print(f"  {impl:<21} skipped (deadline)")
                continue
            prep = result = out = None
            try:
                t0 = time.perf_counter()
                prep = SETUP[impl](data)
                result = prep.fn()
                torch.cuda.synchronize()
                out = prep.to_out(result)
                setup_s = time.perf_counter() - t0
                ms = common.bench_ms(prep.fn, warmup=warmup, rep=rep)
                row = _row(wl, impl, ms, "; ".join(prep.notes), copy_gbps)
                row.update(prep.extra)
                ms_clean = clean_l2_ms(prep.fn, rep)
                copy_clean = payload["copy"].get("gbps_clean_l2")
                row["ms_clean_l2"] = ms_clean
                row["gbps_clean_l2"] = gbps(wl.bytes, ms_clean)
                row["pct_of_copy_clean_l2"] = (100.0 * row["gbps_clean_l2"] / copy_clean) if copy_clean else None
                row["setup_s"] = round(setup_s, 3)
                row["max_abs_vs_ref"] = reference.max_abs_diff(out, data.ref_out)
                if impl == "flashinfer_jit":
                    ours_out = out.clone()
                    row["max_abs_vs_ours"] = 0.0
                elif ours_out is not None:
                    row["max_abs_vs_ours"] = reference.max_abs_diff(out, ours_out)
                nonfinite = int((~torch.isfinite(out)).sum())
                if nonfinite:
                    row["notes"] += f"; {nonfinite} NON-FINITE output values"
                print(f"  {impl:<21} {ms:9.4f} ms  {row['gbps']:7.0f} GB/s  "
                      f"{common.fmt(row['pct_of_copy'], '5.1f')}% of copy "
                      f"(clean L2: {ms_clean:.4f} ms, {common.fmt(row['pct_of_copy_clean_l2'], '5.1f')}%)"
                      f"  |d| ref {row['max_abs_vs_ref']:.3g}"
                      f"  ({row['notes']})")
            except Exception as exc:  # noqa: BLE001 - one failing peer must not stop the run
                print(f"  {impl:<21} FAILED: {type(exc).__name__}: {str(exc)[:500]}")
                traceback.print_exc()
                first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                row = _row(wl, impl, None, f"error: {type(exc).__name__}: {first_line}", copy_gbps)
            finally:
                del prep, result, out
            payload["rows"].append(row)
            sys.stdout.flush()
        del data, ours_out
        torch.cuda.empty_cache()
        save()

    payload["elapsed_s"] = round(time.perf_counter() - start, 1)
    save()
    print_table(payload["rows"])
    payload["targets"] = target_verdicts(payload["rows"])
    payload["variant_vs_plain"] = variant_vs_plain(payload["rows"])
    payload["fp8_vs_bf16"] = fp8_vs_bf16(payload["rows"])
    save()
    for name, ratio in payload["variant_vs_plain"].items():
        print(f"variant {name}: GB/s / plain decode's {ratio:.3f} (issues #12 / #16: >= 0.95)")
    for name, r in payload["fp8_vs_bf16"].items():
        print(f"fp8 {name}: time / bf16 cache's {common.fmt(r['time_vs_bf16'], '.3f')} (#16: <= 0.6 at b128), "
              f"{common.fmt(r['pct_of_copy'], '.1f')} % of copy counting fp8 bytes (#16: >= 85)")
    for t in payload["targets"]:
        print(f"target {t['workload']}: >= {t['target_pct']:.0f} % of copy: clean L2 {common.fmt(t['clean_pct'], '.1f')} % "
              f"({'met' if t['clean_met'] else 'NOT met'}), do_bench {common.fmt(t['do_bench_pct'], '.1f')} % "
              f"({'met' if t['do_bench_met'] else 'NOT met'})")
    overhead = payload.get("run_overhead") or {}
    print(f"\nhost overhead per call (median us): run() {overhead.get('run', {}).get('median_us')}, "
          f"graph.replay() {overhead.get('graph_replay', {}).get('median_us')}, plan() "
          f"{overhead.get('plan', {}).get('median_us')} (tiny batch)")
    for p in payload["plan_time"]:
        print(f"plan() {p.get('workload')}: median {p.get('median_us')} us, p90 {p.get('p90_us')} us "
              f"({p.get('pages')} pages)")
    print(f"\nwrote {out_dir / (stem + '.json')} and .md ({payload['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

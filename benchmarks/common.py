"""Shared pieces of the benchmarks: workloads, exact FLOP counts, timing, result files.

Workloads (bf16, 32 query heads, 8 kv heads) come from one seeded generator, drawn in a fixed order
so every run and every machine benchmarks the same batches:

    g = torch.Generator().manual_seed(1)
    chat = 16 lengths in [256, 4096]
    mix  = [16384] + 31 lengths in [128, 512]
    qa   = 32 lengths in [64, 512]
    pref = qa + 32 draws in [1024, 8192]    (kv length of append request i = qa[i] + draw[i])

FLOPs are the useful ragged matmul FLOPs (QK^T and PV; softmax ignored), the same number for every
implementation whatever it computes on padding: 4 * q * k * D * Hq per request, non-causal; with the
bottom-right causal mask, 4 * D * Hq * (number of visible (query, key) pairs), which is
q * k - q * (q - 1) / 2 for q <= k.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
import reference  # noqa: E402  (tests/reference.py: the float32 reference and ragged helpers)

NUM_QO_HEADS = 32
NUM_KV_HEADS = 8
DTYPE = torch.bfloat16
FLOP_CONVENTION = (
    "useful ragged matmul FLOPs, identical for every impl: non-causal 4*q*k*D*Hq per request; causal "
    "(bottom-right) 4*D*Hq*visible pairs = 4*D*Hq*(q*k - q*(q-1)/2) for q <= k; a sliding window counts the "
    "pairs inside it (query i at p = k - q + i sees keys [p - window_left, p]); padding never counted"
)


# ---- workloads -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    causal: bool
    head_dim: int
    num_qo_heads: int = NUM_QO_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    window_left: int = -1     # attention variants (issue #12): a sliding window, FlashInfer's window_left
    soft_cap: float = 0.0     # logits_soft_cap
    snippet: str = ""         # a user variant of examples/custom_variants.py, by name
    pos_encoding: str = ""    # FlashInfer's pos_encoding_mode ("ROPE_LLAMA", "ALIBI"); "" is "NONE"
    kv_dtype: str = ""        # an fp8 KV cache (issue #16): "float8_e4m3fn" / "float8_e5m2"; "" is DTYPE

    @property
    def variant(self) -> str:
        label = variant_label(self.window_left, self.soft_cap)
        return ", ".join(p for p in (label, f"snippet {self.snippet}" if self.snippet else "",
                                     f"pos_encoding_mode {self.pos_encoding}" if self.pos_encoding else "",
                                     f"{self.kv_dtype} KV" if self.kv_dtype else "") if p)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The K/V dtype the kernels read: DTYPE, or the fp8 one."""
        return getattr(torch, self.kv_dtype) if self.kv_dtype else DTYPE

    @property
    def batch_size(self) -> int:
        return len(self.q_lens)

    @property
    def total_q(self) -> int:
        return sum(self.q_lens)

    @property
    def total_kv(self) -> int:
        return sum(self.kv_lens)

    @property
    def flops(self) -> int:
        if self.snippet == "prefix_lm":  # keys [0, max(p + 1, PREFIX)) of each row at position p
            prefix = custom_variants().PREFIX
            pairs = sum(min(k, max(k - q + i + 1, prefix)) for q, k in zip(self.q_lens, self.kv_lens) for i in range(q))
            return 4 * self.head_dim * self.num_qo_heads * pairs
        return attention_flops(self.q_lens, self.kv_lens, self.causal, self.head_dim, self.num_qo_heads,
                               self.window_left)

    def describe(self) -> str:
        return (f"{self.name}: batch {self.batch_size}, total q {self.total_q}, total kv {self.total_kv}, "
                f"max q {max(self.q_lens)}, max kv {max(self.kv_lens)}, {'causal' if self.causal else 'non-causal'}, "
                f"D={self.head_dim}, Hq={self.num_qo_heads}, Hkv={self.num_kv_heads}, {self.flops / 1e12:.3f} TFLOP"
                + (f", {self.variant}" if self.variant else ""))


@functools.lru_cache(maxsize=1)
def custom_variants():
    """examples/custom_variants.py as a module (its user-defined variants are bench rows too)."""
    import importlib.util

    path = REPO / "examples" / "custom_variants.py"
    spec = importlib.util.spec_from_file_location("custom_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snippet_variant(name: str, device: torch.device, num_qo_heads: int):
    """(AttentionVariant, causal, score_fn, mask_fn) of the example variant `name`."""
    for variant, causal, score_fn, mask_fn in custom_variants().variants(device, num_qo_heads):
        if variant.name == name:
            return variant, causal, score_fn, mask_fn
    raise KeyError(f"no user variant {name!r} in examples/custom_variants.py")


def variant_label(window_left: int, soft_cap: float) -> str:
    """'window_left 4096, soft-cap 50' for a variant workload, '' for plain attention."""
    parts = ([f"window_left {window_left}"] if window_left >= 0 else []) + (
        [f"soft-cap {soft_cap:g}"] if soft_cap > 0 else [])
    return ", ".join(parts)


def draw_lengths() -> dict[str, list[int]]:
    """The benchmark lengths, drawn in this exact order from one generator seeded with 1."""
    g = torch.Generator().manual_seed(1)

    def draw(lo: int, hi: int, n: int) -> list[int]:
        return [int(x) for x in torch.randint(lo, hi + 1, (n,), generator=g).tolist()]

    chat = draw(256, 4096, 16)
    mix = [16384] + draw(128, 512, 31)
    qa = draw(64, 512, 32)
    pref_draw = draw(1024, 8192, 32)
    pref = [a + b for a, b in zip(qa, pref_draw)]
    return {"chat": chat, "mix": mix, "qa": qa, "pref": pref}


def workloads() -> list[Workload]:
    L = draw_lengths()
    chat, mix, qa, pref = (tuple(L[k]) for k in ("chat", "mix", "qa", "pref"))
    return [
        Workload("chat16_causal_hd128", chat, chat, True, 128),
        Workload("chat16_full_hd128", chat, chat, False, 128),
        Workload("long1+short31_causal_hd128", mix, mix, True, 128),
        Workload("append32_prefix_causal_hd128", qa, pref, True, 128),
        Workload("chat16_causal_hd64", chat, chat, True, 64),
        Workload("chat16_causal_hd256", chat, chat, True, 256),
        Workload("dense8x4096_causal_hd128", (4096,) * 8, (4096,) * 8, True, 128),
        # Attention variants (issue #12): against FlexAttention with the same score_mod / mask_mod; the
        # soft-cap row is compared with chat16_causal_hd128 (the same kernel without the cap). chat16's
        # requests are shorter than 4096: that window changes nothing but the kernel; the 16k request
        # of long1+short31 is where a 4096-key window skips tiles.
        Workload("chat16_causal_hd128_softcap50", chat, chat, True, 128, soft_cap=50.0),
        Workload("chat16_causal_hd128_window4096", chat, chat, True, 128, window_left=4096),
        Workload("long1+short31_causal_hd128_window4096", mix, mix, True, 128, window_left=4096),
        # user-defined variants (examples/custom_variants.py) against FlexAttention's same score / mask
        Workload("chat16_causal_hd128_alibi", chat, chat, True, 128, snippet="alibi"),
        Workload("chat16_full_hd128_prefix_lm", chat, chat, False, 128, snippet="prefix_lm"),
        Workload("chat16_causal_hd128_sigmoid", chat, chat, True, 128, snippet="sigmoid_score"),
        # positional encodings on plan(): fused RoPE (the fa2 kernel's; compared with the fa2 kernel without
        # it and with apply_rope + attention as two calls) and the built-in ALiBi (vs the alibi snippet's row)
        Workload("chat16_causal_hd128_rope", chat, chat, True, 128, pos_encoding="ROPE_LLAMA"),
        Workload("chat16_causal_hd128_alibi_mode", chat, chat, True, 128, pos_encoding="ALIBI"),
        # an fp8 KV cache (issue #16: paged prefill within 10% of the bf16 cache's); the fa2 kernel reads it
        Workload("chat16_causal_hd128_fp8kv", chat, chat, True, 128, kv_dtype="float8_e4m3fn"),
    ]


def attention_flops(q_lens: Sequence[int], kv_lens: Sequence[int], causal: bool, head_dim: int,
                    num_qo_heads: int, window_left: int = -1) -> int:
    """Exact useful FLOPs of a ragged batch (integer arithmetic)."""
    pairs = 0
    for q, k in zip(q_lens, kv_lens):
        if window_left >= 0:
            pairs += windowed_pairs(q, k, causal, window_left)
        else:
            pairs += reference.causal_visible_keys(q, k) if causal else q * k
    return 4 * head_dim * num_qo_heads * pairs


def windowed_pairs(q_len: int, kv_len: int, causal: bool, window_left: int) -> int:
    """(query, key) pairs one request keeps under a sliding window: query i at p = kv_len - q_len + i sees
    keys [max(0, p - window_left), min(p + 1, kv_len) if causal else kv_len)."""
    pairs = 0
    for i in range(q_len):
        p = kv_len - q_len + i
        end = max(0, min(p + 1, kv_len)) if causal else kv_len
        pairs += max(0, end - max(0, p - window_left))
    return pairs


# ---- timing --------------------------------------------------------------------------------------

def bench_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench (L2 flushed between calls by do_bench)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _bench_events(fn, warmup, rep)
    try:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # a triton without return_mode
        return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5]))
    except RuntimeError as exc:  # triton present but its driver unusable: time with CUDA events
        print(f"bench_ms: triton do_bench failed ({exc}); falling back to CUDA events", file=sys.stderr)
        return _bench_events(fn, warmup, rep)


def _bench_events(fn: Callable[[], Any], warmup: int, rep: int) -> float:
    """Fallback without triton: CUDA events around each call, median (no L2 flush)."""
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(stop), 1e-3)
    for _ in range(max(1, int(warmup / est))):
        fn()
    times = []
    for _ in range(max(1, int(rep / est))):
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def tflops(flops: int, ms: float | None) -> float | None:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


# ---- provenance ----------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def card_slug() -> str:
    if torch.cuda.is_available():
        return slug(torch.cuda.get_device_name())
    return "no-gpu"


def today() -> str:
    return datetime.date.today().isoformat()


def git_commit() -> str:
    """$BENCH_COMMIT when set (the device machine's copy of the checkout can carry stale .git metadata:
    run_device.sh and device calls pass the commit in), else `git rev-parse --short HEAD`, else 'unknown'."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        info["cudnn"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device_name"] = torch.cuda.get_device_name()
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


# ---- helpers shared by the benchmarks --------------------------------------------------------------

def fa2_varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left: int = -1):
    """PyTorch's FA2 varlen forward across torch versions (scale= is keyword-only since 2.1); a sliding
    window through the op's window_size_left / window_size_right."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        raise RuntimeError("torch.ops.aten._flash_attention_forward is missing in this torch")
    if window_left >= 0:
        res = op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, window_size_left=window_left,
                 window_size_right=0 if causal else -1)
        return res[0] if isinstance(res, (tuple, list)) else res
    try:
        res = op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
    except TypeError:
        if abs(scale - 1.0 / math.sqrt(q.shape[-1])) > 1e-12:
            raise
        res = op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False)  # default scale = 1/sqrt(D)
    return res[0] if isinstance(res, (tuple, list)) else res


_FLEX_COMPILED = None


def compiled_flex_attention():
    """torch.compile(flex_attention), compiled once per process, with room for the shapes we run."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(64, getattr(cfg, name)))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def select(all_names, wanted: "str | None", what: str) -> list:
    """The comma-separated subset `wanted` of `all_names` (all of them when empty)."""
    if not wanted:
        return list(all_names)
    picked = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [w for w in picked if w not in all_names]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from: {', '.join(all_names)}")
    return picked

"""Random small attention batches through the public API, for compute-sanitizer (device run).

    # 1. outside the sanitizer: build every kernel the cases need (nvcc under memcheck is pointless)
    PYTHONPATH=. python3 benchmarks/sanitizer_fuzz.py --n 300 --prebuild-only
    # 2. the run itself
    PYTHONPATH=. compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python3 benchmarks/sanitizer_fuzz.py --n 300 --out $OUT/sanitizer.json

Each case is drawn from one seeded generator (same --seed, same cases everywhere) and is one of:

  ragged   BatchPrefillWithRaggedKVCacheWrapper (NHD or HND K/V)
  paged    BatchPrefillWithPagedKVCacheWrapper (NHD or HND pages, one 5-D cache tensor or a (k, v) tuple)
  decode   BatchDecodeWithPagedKVCacheWrapper
  append   append_paged_kv_cache (index tensors on the CPU or the GPU)

mixing head_dim 64/128/256, fp16/bf16, causal on/off, GQA groups 1/2/4, 1-2 KV heads, page sizes
1/5/16, batches of 0-4 requests with empty ones (q_len 0, kv_len 0), shuffled pages and spare pages.
Sizes are small (q_len <= 24, kv_len <= 80) so 300 cases finish in minutes under memcheck.

Every result is compared with a float32 reference computed on the CPU (tests/reference.py), so a wrong
answer fails the run as well as a bad memory access: outputs and LSE within tolerance, rows with no
visible key exactly 0 / -inf; append: the whole cache equal to the expected one, NaN where nothing
was written. Slots no request owns are NaN, so reading them shows up in the output.

PYTORCH_NO_CUDA_MEMORY_CACHING=1 is set before torch is imported (unless already set): every tensor
is then its own cudaMalloc and memcheck sees an access past its end, which the caching allocator's
large blocks would hide.

Writes a JSON summary to --out: cases run per kind, failures (first 20 with their description),
seconds, device. Exit status 1 if any case failed (memcheck adds its own with --error-exitcode).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import reference as ref  # noqa: E402  (tests/reference.py: float32 attention reference, checks)

HEAD_DIMS = (64, 128, 256)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PAGE_SIZES = (1, 5, 16)
KINDS = (("ragged", 0.35), ("paged", 0.30), ("decode", 0.20), ("append", 0.15))
MAX_Q, MAX_KV = 24, 80
WORKSPACE_BYTES = 16 << 20


# ---- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    index: int
    kind: str
    head_dim: int
    dtype: str
    causal: bool
    num_kv_heads: int
    group: int
    kv_layout: str       # "NHD" / "HND"
    q_lens: list[int]
    kv_lens: list[int]   # append: the lengths before appending
    page_size: int = 0
    append_lens: list[int] = field(default_factory=list)
    tuple_cache: bool = False
    host_indices: bool = False
    seed: int = 0
    window_left: int = -1     # attention variants (issue #12): sliding window, soft-cap
    soft_cap: float = 0.0
    pos_encoding: str = "NONE"  # issue #16: fused RoPE ("ROPE_LLAMA") or "ALIBI"
    fp8: str = ""               # issue #16: an fp8 K/V dtype name ("float8_e4m3fn" / "float8_e5m2")

    @property
    def num_qo_heads(self) -> int:
        return self.num_kv_heads * self.group

    def describe(self) -> str:
        what = (f"#{self.index} {self.kind} hd{self.head_dim} {self.dtype} {'causal' if self.causal else 'full'} "
                f"Hq={self.num_qo_heads} Hkv={self.num_kv_heads} {self.kv_layout}")
        if self.kind == "append":
            return f"{what} page={self.page_size} prefix={self.kv_lens} append={self.append_lens}"
        pairs = ", ".join(f"{q}/{k}" for q, k in zip(self.q_lens, self.kv_lens))
        paged = f" page={self.page_size}{' (k,v) tuple' if self.tuple_cache else ''}" if self.page_size else ""
        variant = (f" window_left={self.window_left}" if self.window_left >= 0 else "") + (
            f" soft_cap={self.soft_cap:g}" if self.soft_cap > 0 else "") + (
            f" {self.pos_encoding}" if self.pos_encoding != "NONE" else "") + (f" {self.fp8} KV" if self.fp8 else "")
        return f"{what}{paged}{variant} q/kv: [{pairs}]"

    def backend(self, prefill_backend: str) -> str:
        """The backend= of this case's wrapper: --prefill-backend for ragged cases and paged ones with pages
        the sm90 kernel copies whole (16), "auto" for the rest."""
        forced = self.kind == "ragged" or (self.kind == "paged" and self.page_size == 16)
        fa2_only = bool(self.fp8)  # "auto" resolves fp8 K/V to fa2
        return prefill_backend if forced and not fa2_only else "auto"

    def specs(self, prefill_backend: str = "auto"):
        """The kernel variants this case may load (what --prebuild-only builds): both backends under auto."""
        from flashinfer_jit.spec import AppendPagedSpec, PrefillSpec
        if self.kind == "append":
            return [AppendPagedSpec(self.head_dim, self.dtype)]
        kv_dtype = {"float8_e4m3fn": "fp8e4m3", "float8_e5m2": "fp8e5m2"}.get(self.fp8, "")
        layout = "ragged" if self.kind == "ragged" else f"paged_{self.kv_layout.lower()}"
        backend = self.backend(prefill_backend)
        backends = ("fa2", "sm90") if backend == "auto" and self.kind != "decode" else (
            ("fa2",) if backend == "auto" else (backend,))
        if kv_dtype:
            backends = ("fa2",)
        return [PrefillSpec(layout, self.head_dim, self.dtype, self.causal and self.kind != "decode", backend=b,
                            sliding_window=self.window_left >= 0, soft_cap=self.soft_cap > 0,
                            rope=self.pos_encoding == "ROPE_LLAMA", alibi=self.pos_encoding == "ALIBI",
                            kv_dtype=kv_dtype)
                for b in backends]


def make_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS)
    cases = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        batch = rng.choice((0, 1, 1, 2, 3, 4, 4)) if kind != "decode" else rng.choice((1, 2, 3, 4, 7))
        q_lens, kv_lens = ref.random_lengths(rng, batch, MAX_Q, MAX_KV)
        case = Case(
            index=i, kind=kind, head_dim=rng.choice(HEAD_DIMS), dtype=rng.choice(tuple(DTYPES)),
            causal=rng.random() < 0.5 and kind in ("ragged", "paged"), num_kv_heads=rng.choice((1, 2)),
            group=rng.choice((1, 2, 4)), kv_layout=rng.choice(("NHD", "HND")), q_lens=q_lens, kv_lens=kv_lens,
            seed=rng.randrange(1 << 30),
        )
        if kind in ("paged", "decode", "append"):
            case.page_size = rng.choice(PAGE_SIZES)
            case.tuple_cache = rng.random() < 0.3 and kind != "append"
        if kind == "decode":
            case.q_lens = [1] * batch
        if kind == "append":
            case.append_lens = [rng.choice((0, 1, 1, 3, rng.randint(1, MAX_Q))) for _ in range(batch)]
            case.host_indices = rng.random() < 0.5
        if kind != "append":  # the variants' kernels too (their masks and skipped tiles touch memory differently)
            case.window_left = rng.choice((0, 1, 5, 40)) if rng.random() < 0.3 else -1
            case.soft_cap = rng.choice((5.0, 30.0)) if rng.random() < 0.25 else 0.0
            draw = rng.random()  # fused RoPE, ALiBi (not with a soft-cap: plan() refuses the pair), fp8 K/V
            case.pos_encoding = "ROPE_LLAMA" if draw < 0.15 else ("ALIBI" if draw < 0.25 and not case.soft_cap
                                                                  else "NONE")
            case.fp8 = rng.choice(("float8_e4m3fn", "float8_e5m2")) if rng.random() < 0.2 else ""
        cases.append(case)
    return cases


# ---- paged KV helpers (self-contained: dense K/V <-> pages) ---------------------------------------

@dataclass
class Pages:
    indptr: torch.Tensor         # int32 CPU [batch + 1]
    indices: torch.Tensor        # int32 CPU [used]
    last_page_len: torch.Tensor  # int32 CPU [batch]
    num_pages: int


def make_pages(kv_lens: list[int], page_size: int, gen: torch.Generator, spare: int = 3) -> Pages:
    counts = [math.ceil(n / page_size) for n in kv_lens]
    used = sum(counts)
    order = torch.randperm(used + spare, generator=gen)[:used].to(torch.int32)  # shuffled, with unused pages
    last = [0 if n == 0 else n - (c - 1) * page_size for n, c in zip(kv_lens, counts)]
    return Pages(ref.make_indptr(counts), order.contiguous(), torch.tensor(last, dtype=torch.int32), used + spare)


def token_slots(pages: Pages, lens: list[int], page_size: int, first: list[int] | None = None):
    """(page, slot) of tokens first[i] .. lens[i]-1 of every request, in request order."""
    ptr = pages.indptr.tolist()
    page_ids, slots = [], []
    for i, n in enumerate(lens):
        t = torch.arange(first[i] if first else 0, n)
        page_ids.append(pages.indices.long()[ptr[i] + t // page_size])
        slots.append(t % page_size)
    return torch.cat(page_ids) if page_ids else torch.zeros(0, dtype=torch.long), \
        torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)


def new_cache(num_pages: int, page_size: int, heads: int, head_dim: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    shape = (page_size, heads, head_dim) if layout == "NHD" else (heads, page_size, head_dim)
    return torch.full((num_pages, 2, *shape), float("nan"), dtype=dtype)


def scatter(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, page_ids, slots, layout: str) -> None:
    if layout == "NHD":
        cache[page_ids, 0, slots] = k
        cache[page_ids, 1, slots] = v
    else:
        cache[page_ids, 0, :, slots] = k
        cache[page_ids, 1, :, slots] = v


# ---- running one case ----------------------------------------------------------------------------

class Runner:
    def __init__(self, device: torch.device, prefill_backend: str = "auto"):
        import flashinfer_jit as fij
        self.fij = fij
        self.device = device
        self.prefill_backend = prefill_backend
        self._wrappers: dict[tuple[str, str, str], Any] = {}

    def wrapper(self, kind: str, layout: str, backend: str = "auto"):
        key = (kind, layout, backend)
        if key not in self._wrappers:
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            cls = {"ragged": self.fij.BatchPrefillWithRaggedKVCacheWrapper,
                   "paged": self.fij.BatchPrefillWithPagedKVCacheWrapper,
                   "decode": self.fij.BatchDecodeWithPagedKVCacheWrapper}[kind]
            self._wrappers[key] = cls(workspace, kv_layout=layout, backend=backend)
        return self._wrappers[key]

    def run(self, case: Case) -> None:
        getattr(self, f"_{case.kind}")(case)
        torch.cuda.synchronize(self.device)  # attribute any asynchronous error to this case

    def _dense(self, case: Case, gen: torch.Generator):
        dtype = DTYPES[case.dtype]
        q = torch.randn((sum(case.q_lens), case.num_qo_heads, case.head_dim), generator=gen).to(dtype)
        k = torch.randn((sum(case.kv_lens), case.num_kv_heads, case.head_dim), generator=gen).to(dtype)
        v = torch.randn((sum(case.kv_lens), case.num_kv_heads, case.head_dim), generator=gen).to(dtype)
        return q, k, v

    def _kv(self, case: Case, x: torch.Tensor) -> torch.Tensor:
        """K / V as the kernel reads them: x, or x cast to the case's fp8 dtype."""
        return x.to(getattr(torch, case.fp8)) if case.fp8 else x

    def _check(self, case: Case, out: torch.Tensor, lse: torch.Tensor, q, k, v) -> None:
        qo, kv = ref.make_indptr(case.q_lens), ref.make_indptr(case.kv_lens)
        if case.fp8:  # the reference reads the fp8 values the kernel reads
            k, v = self._kv(case, k).float(), self._kv(case, v).float()
        score_fn = None
        if case.pos_encoding == "ROPE_LLAMA":
            q_pos, k_pos = ref.rope_positions(qo, kv)
            q = ref.rope_reference(q, q_pos, case.head_dim, False, 1.0, 1e4)
            k = ref.rope_reference(k, k_pos, case.head_dim, False, 1.0, 1e4)
        elif case.pos_encoding == "ALIBI":
            slopes = ref.alibi_slopes_ref(case.num_qo_heads).view(-1, 1, 1)
            score_fn = lambda s, qi, ki, h, qp, r: s + slopes * (ki - qp).float()  # noqa: E731
        ref_out, ref_lse = ref.ragged_attention_ref(q, k, v, qo, kv, case.causal, window_left=case.window_left,
                                                    logits_soft_cap=case.soft_cap, score_fn=score_fn)
        ref.check_attention(out.cpu(), ref_out, DTYPES[case.dtype], case.describe(), lse.cpu(), ref_lse)

    def _ragged(self, case: Case) -> None:
        gen = torch.Generator().manual_seed(case.seed)
        q, k, v = self._dense(case, gen)
        w = self.wrapper("ragged", case.kv_layout, case.backend(self.prefill_backend))
        w.plan(ref.make_indptr(case.q_lens), ref.make_indptr(case.kv_lens), case.num_qo_heads, case.num_kv_heads,
               case.head_dim, causal=case.causal, q_data_type=DTYPES[case.dtype], window_left=case.window_left,
               logits_soft_cap=case.soft_cap, pos_encoding_mode=case.pos_encoding, kv_data_type=case.fp8 or None)
        dev = self.device
        k_in, v_in = (self._kv(case, ref.from_nhd(x, case.kv_layout).to(dev)) for x in (k, v))
        out, lse = w.run(q.to(dev), k_in, v_in, return_lse=True)
        self._check(case, out, lse, q, k, v)

    def _paged_inputs(self, case: Case):
        gen = torch.Generator().manual_seed(case.seed)
        q, k, v = self._dense(case, gen)
        pages = make_pages(case.kv_lens, case.page_size, gen)
        cache = new_cache(pages.num_pages, case.page_size, case.num_kv_heads, case.head_dim, DTYPES[case.dtype],
                          case.kv_layout)
        scatter(cache, k, v, *token_slots(pages, case.kv_lens, case.page_size), case.kv_layout)
        gpu = self._kv(case, cache.to(self.device))
        paged = (gpu[:, 0].contiguous(), gpu[:, 1].contiguous()) if case.tuple_cache else gpu
        return q, k, v, pages, paged

    def _paged(self, case: Case) -> None:
        q, k, v, pages, paged = self._paged_inputs(case)
        w = self.wrapper("paged", case.kv_layout, case.backend(self.prefill_backend))
        w.plan(ref.make_indptr(case.q_lens), pages.indptr, pages.indices, pages.last_page_len, case.num_qo_heads,
               case.num_kv_heads, case.head_dim, case.page_size, causal=case.causal, q_data_type=DTYPES[case.dtype],
               window_left=case.window_left, logits_soft_cap=case.soft_cap, pos_encoding_mode=case.pos_encoding,
               kv_data_type=case.fp8 or None)
        out, lse = w.run(q.to(self.device), paged, return_lse=True)
        self._check(case, out, lse, q, k, v)

    def _decode(self, case: Case) -> None:
        q, k, v, pages, paged = self._paged_inputs(case)
        w = self.wrapper("decode", case.kv_layout)
        w.plan(pages.indptr, pages.indices, pages.last_page_len, case.num_qo_heads, case.num_kv_heads,
               case.head_dim, case.page_size, q_data_type=DTYPES[case.dtype], window_left=case.window_left,
               logits_soft_cap=case.soft_cap, pos_encoding_mode=case.pos_encoding, kv_data_type=case.fp8 or None)
        out, lse = w.run(q.to(self.device), paged, return_lse=True)
        self._check(case, out, lse, q, k, v)

    def _append(self, case: Case) -> None:
        gen = torch.Generator().manual_seed(case.seed)
        dtype = DTYPES[case.dtype]
        final = [a + b for a, b in zip(case.kv_lens, case.append_lens)]
        pages = make_pages(final, case.page_size, gen)
        heads, d = case.num_kv_heads, case.head_dim
        cache = new_cache(pages.num_pages, case.page_size, heads, d, dtype, case.kv_layout)
        old_k = torch.randn((sum(case.kv_lens), heads, d), generator=gen).to(dtype)
        old_v = torch.randn((sum(case.kv_lens), heads, d), generator=gen).to(dtype)
        scatter(cache, old_k, old_v, *token_slots(pages, case.kv_lens, case.page_size), case.kv_layout)
        nnz = sum(case.append_lens)
        new_k = torch.randn((nnz, heads, d), generator=gen).to(dtype)
        new_v = torch.randn((nnz, heads, d), generator=gen).to(dtype)
        expected = cache.clone()
        scatter(expected, new_k, new_v, *token_slots(pages, final, case.page_size, first=case.kv_lens), case.kv_layout)

        gpu = cache.to(self.device)
        append_indptr = ref.make_indptr(case.append_lens)
        seq_lens = torch.tensor(final, dtype=torch.int32)
        batch_indices, positions = self.fij.get_batch_indices_positions(
            append_indptr.to(self.device), seq_lens.to(self.device), nnz)
        index = [batch_indices, positions, pages.indices, pages.indptr, pages.last_page_len]
        index = [t.cpu() for t in index] if case.host_indices else [t.to(self.device) for t in index]
        self.fij.append_paged_kv_cache(new_k.to(self.device), new_v.to(self.device), index[0], index[1], gpu,
                                       index[2], index[3], index[4], kv_layout=case.kv_layout)
        got = gpu.cpu()
        same = (got == expected) | (torch.isnan(got) & torch.isnan(expected))
        if not bool(same.all()):
            bad = torch.nonzero(~same)[0].tolist()
            raise AssertionError(f"{case.describe()}: cache differs from the expected one at {tuple(bad)}: got "
                                 f"{float(got[tuple(bad)])}, expected {float(expected[tuple(bad)])}")


# ---- main ----------------------------------------------------------------------------------------

def prebuild(cases: list[Case], prefill_backend: str = "auto") -> int:
    """Build (or find) every kernel the cases load, in parallel, before the sanitizer run."""
    from flashinfer_jit import cache, prebuild as pb, toolchain
    specs = list(dict.fromkeys(s for c in cases for s in c.specs(prefill_backend)))
    layer = cache.writable_layer()
    report = pb.run(specs, [toolchain.target_archs()], layer,
                    on_progress=lambda o, i, n: print(f"[{i}/{n}] {o.status} {o.uri}", flush=True))
    print(f"prebuild: {report.count(pb.BUILT)} built, {report.count(pb.CACHED)} cached, "
          f"{report.count(pb.FAILED)} failed in {report.seconds:.1f} s ({layer.root})")
    for o in report.failed:
        print(f"--- {o.uri} failed ---\n{o.error}", file=sys.stderr)
    return 1 if report.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="number of random cases")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, help="write the JSON summary here")
    parser.add_argument("--prebuild-only", action="store_true",
                        help="only build the kernels the cases need (run this outside the sanitizer)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    parser.add_argument("--max-failures", type=int, default=20, help="stop after this many failed cases")
    parser.add_argument("--prefill-backend", default="auto", choices=("auto", "fa2", "sm90"),
                        help="backend= of the ragged wrappers and the paged ones with 16-token pages")
    args = parser.parse_args()

    cases = make_cases(args.n, args.seed)
    if args.list:
        for case in cases:
            print(case.describe())
        return 0
    if args.prebuild_only:
        return prebuild(cases, args.prefill_backend)
    if not torch.cuda.is_available():
        print("sanitizer_fuzz: no CUDA device visible (use --list or --prebuild-only without one)", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    runner = Runner(device, args.prefill_backend)
    counts: dict[str, int] = {}
    failures: list[dict[str, str]] = []
    start = time.perf_counter()
    for case in cases:
        try:
            runner.run(case)
        except Exception as exc:  # noqa: BLE001  (record, keep going: one run should show every failure)
            failures.append({"case": case.describe(), "error": f"{type(exc).__name__}: {exc}"[:2000],
                             "where": traceback.format_exc(limit=3)[-1500:]})
            print(f"FAILED {case.describe()}\n  {type(exc).__name__}: {str(exc)[:500]}", file=sys.stderr, flush=True)
            if len(failures) >= args.max_failures:
                break
        counts[case.kind] = counts.get(case.kind, 0) + 1
    seconds = time.perf_counter() - start
    summary = {
        "cases": sum(counts.values()), "requested": args.n, "seed": args.seed, "per_kind": counts,
        "failed": len(failures), "failures": failures, "seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "no_caching_allocator": os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
        # a heuristic (the sanitizer injects itself through CUDA_INJECTION64_PATH); False proves nothing
        "sanitizer_env_detected": any(k.startswith(("NV_SANITIZER", "CUDA_INJECTION64_PATH")) for k in os.environ),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

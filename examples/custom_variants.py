"""User-defined attention variants: a few lines of CUDA rendered into the prefill kernel, compiled and
cached like any other kernel (flashinfer_jit.AttentionVariant; see flashinfer_jit/variants.py).

Three examples, each checked on a ragged batch against a float32 PyTorch reference that computes the
same score / mask in torch:

  * ALiBi as a snippet: score - slope[head] * (q_pos - kv_idx), per-head slopes as a tensor parameter;
  * a prefix-LM mask: the first `prefix` keys of a request are seen by every query, the rest causally
    (non-causal kernel + mask_mod);
  * a sigmoid-attention style score: log(sigmoid(score)) + bias (so the softmax weighs sigmoid(score)),
    a scalar parameter.

    python examples/custom_variants.py

Running needs a CUDA GPU; without one it says so and exits 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import flashinfer_jit  # noqa: E402

SEQ_LENS = [37, 1, 200, 129, 64, 300]  # ragged: not tile multiples, a length-1 request
NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 4, 128
PREFIX, BIAS = 48, 0.5  # the prefix-LM's shared prefix; the sigmoid score's bias


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes (num_heads a power of two): 2^(-8 (h + 1) / num_heads)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)], dtype=torch.float32)


def variants(device: torch.device, num_qo_heads: int = NUM_QO_HEADS
             ) -> list[tuple[flashinfer_jit.AttentionVariant, bool, object, object]]:
    """(variant, causal, score_fn, mask_fn) for tests/reference.py's attention_ref (also used by
    benchmarks/bench_prefill.py's snippet rows)."""
    slopes = alibi_slopes(num_qo_heads).to(device)
    prefix, bias = PREFIX, BIAS
    alibi = flashinfer_jit.AttentionVariant(
        "alibi", score_mod="score - slopes[head] * float(q_pos - kv_idx)", params={"slopes": slopes})
    prefix_lm = flashinfer_jit.AttentionVariant(
        "prefix_lm", mask_mod="kv_idx < int(prefix) || kv_idx <= q_pos", params={"prefix": float(prefix)})
    sigmoid = flashinfer_jit.AttentionVariant(
        "sigmoid_score", score_mod="-log1pf(__expf(-score)) + bias", params={"bias": bias})
    return [
        (alibi, True, lambda s, qi, ki, h, qp, r: s - slopes[h] * (qp - ki).float(), None),
        (prefix_lm, False, None, lambda qi, ki, h, qp, r: (ki < prefix) | (ki <= qp)),
        (sigmoid, True, lambda s, qi, ki, h, qp, r: torch.nn.functional.logsigmoid(s) + bias, None),
    ]


def run(variant: flashinfer_jit.AttentionVariant, causal: bool, score_fn, mask_fn, dtype=torch.bfloat16) -> float:
    """Max |out - reference| / tolerance for one variant on the ragged batch (<= 1 passes)."""
    import reference

    batch = reference.make_ragged_batch(SEQ_LENS, SEQ_LENS, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, dtype, "cuda", "NHD",
                                        seed=3)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace)
    wrapper.plan(batch.qo_indptr, batch.kv_indptr, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, causal=causal,
                 q_data_type=dtype, variant=variant)
    out = torch.full_like(batch.q, float("nan"))
    lse = torch.full(batch.q.shape[:2], float("nan"), device="cuda")
    wrapper.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
    ref_out, ref_lse = reference.ragged_attention_ref(batch.q, batch.k, batch.v, batch.qo_indptr, batch.kv_indptr,
                                                      causal, score_fn=score_fn, mask_fn=mask_fn)
    reference.check_attention(out, ref_out, dtype, f"variant {variant.name} ({wrapper.backend})", lse, ref_lse)
    atol, rtol = reference.output_tolerance(dtype)
    return float(((out.float() - ref_out).abs() / (atol + rtol * ref_out.abs())).max())


def main() -> int:
    if not torch.cuda.is_available():
        print("running this example needs a CUDA GPU (flashinfer-jit's kernels run on NVIDIA GPUs); none found")
        return 0
    for variant, causal, score_fn, mask_fn in variants(torch.device("cuda")):
        worst = run(variant, causal, score_fn, mask_fn)
        print(f"{variant.name:<14} ({'causal' if causal else 'non-causal'}): matches the float32 reference "
              f"(worst |diff| / tolerance {worst:.2f}) on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

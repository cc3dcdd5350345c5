"""Tensor-parallel ragged prefill: attention heads split across ranks with torch.distributed (NCCL).

    torchrun --nproc-per-node N examples/tensor_parallel.py [--check]

Every rank builds the same random batch (same seed), keeps its shard of the query heads and of the KV
heads (Hq / N and Hkv / N; GQA groups stay whole), runs BatchPrefillWithRaggedKVCacheWrapper on its
own GPU, and the shards are all-gathered back into [tokens, Hq, D]. With --check, rank 0 also runs the
whole batch on its own GPU and compares. All ranks share one kernel cache: the first rank to need a
kernel builds it, the others wait on its lock and load it.
"""
from __future__ import annotations

import argparse
import os
import sys

# NVLink multicast off (the lent multi-GPU machines require it; harmless elsewhere).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import flashinfer_jit  # noqa: E402


def make_batch(device: torch.device, num_qo_heads: int, num_kv_heads: int, head_dim: int):
    g = torch.Generator().manual_seed(1234)
    q_lens = torch.randint(1, 700, (8,), generator=g)
    kv_lens = q_lens + torch.randint(0, 300, (8,), generator=g)
    qo_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).to(torch.int32)
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), kv_lens.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(qo_indptr[-1]), num_qo_heads, head_dim, generator=g).to(device, torch.bfloat16)
    k = torch.randn(int(kv_indptr[-1]), num_kv_heads, head_dim, generator=g).to(device, torch.bfloat16)
    v = torch.randn(int(kv_indptr[-1]), num_kv_heads, head_dim, generator=g).to(device, torch.bfloat16)
    return qo_indptr, kv_indptr, q, k, v


def attention(qo_indptr, kv_indptr, q, k, v, head_dim: int) -> torch.Tensor:
    workspace = torch.empty(64 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout="NHD")
    # No split-KV: the shard and the whole-batch run then do identical arithmetic per head.
    wrapper.plan(qo_indptr, kv_indptr, q.shape[1], k.shape[1], head_dim, causal=True,
                 q_data_type=q.dtype, disable_split_kv=True)
    return wrapper.run(q, k, v)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--check", action="store_true", help="rank 0 compares with a single-GPU run")
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    if args.kv_heads % world or args.heads % world:
        raise SystemExit(f"--heads {args.heads} and --kv-heads {args.kv_heads} must divide by world size {world}")
    hq, hkv = args.heads // world, args.kv_heads // world

    qo_indptr, kv_indptr, q, k, v = make_batch(device, args.heads, args.kv_heads, args.head_dim)
    # Rank r owns KV heads [r * hkv, (r + 1) * hkv) and the query heads of their GQA groups.
    q_shard = q[:, rank * hq:(rank + 1) * hq].contiguous()
    k_shard = k[:, rank * hkv:(rank + 1) * hkv].contiguous()
    v_shard = v[:, rank * hkv:(rank + 1) * hkv].contiguous()
    out_shard = attention(qo_indptr, kv_indptr, q_shard, k_shard, v_shard, args.head_dim)

    gathered = [torch.empty_like(out_shard) for _ in range(world)]
    dist.all_gather(gathered, out_shard)
    out = torch.cat(gathered, dim=1)

    status = 0
    if rank == 0:
        print(f"world size {world}: {q.shape[0]} query tokens, {hq} query / {hkv} KV heads per rank, "
              f"output {tuple(out.shape)}")
        if args.check:
            full = attention(qo_indptr, kv_indptr, q, k, v, args.head_dim)
            diff = (out.float() - full.float()).abs().max().item()
            same = torch.equal(out, full)
            print(f"tensor-parallel vs single GPU: max |diff| = {diff:.3e}, bitwise equal: {same}")
            status = 0 if diff < 1e-2 and torch.isfinite(out).all() else 1
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())

"""FlashInfer's Python signatures, as data: the parameter lists flashinfer-jit must take.

Read from the flashinfer-python 0.7.2 wheel on PyPI (flashinfer/_build_meta.py: __version__ "0.7.2",
__git_commit__ d84335d8c54e0c8f9f7e22faa15c7e34a58abf94), by parsing its source (ast), not by importing it.
tests/test_flashinfer_api.py checks every entry against flashinfer-jit with inspect.signature.

Format (append new entries in the same form):
  SIGNATURES["flashinfer.<module>.<Class>.<method>" or "flashinfer.<module>.<function>"] = [parameter, ...]
  in FlashInfer's order. A parameter is "name" (no default), "name=<Python literal>" (its default, compared
  with ours by ==), "name=..." (has a default we do not compare), "*" (the parameters after it are
  keyword-only), "*args" (var-positional; the parameters after it are keyword-only) or "**kwargs".
  ALIASES[name] = other: FlashInfer defines `name` as `other` (begin_forward = plan), so ours must be too.
  TOP_LEVEL: names FlashInfer exports from `flashinfer` itself; ours must be the objects of our modules.
  ABSENT: callables the issue lists that FlashInfer 0.7.2 does not have (kept here so nobody looks again).

The rule the test enforces: every FlashInfer parameter is a parameter of ours with the same name, at the
same position, of the same kind (positional-or-keyword / keyword-only / var-positional); a FlashInfer
default that is a literal is our default too, unless the entry is in DEFAULT_DIFFERS (with the reason).
Our own extra parameters come after FlashInfer's, or keyword-only.
"""
from __future__ import annotations

FLASHINFER_VERSION = "0.7.2"
FLASHINFER_COMMIT = "d84335d8c54e0c8f9f7e22faa15c7e34a58abf94"

SIGNATURES: dict[str, list[str]] = {
    'flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.__init__': [
        'self', 'float_workspace_buffer', "kv_layout='NHD'", 'use_cuda_graph=False', 'qo_indptr_buf=None',
        'kv_indptr_buf=None', 'custom_mask_buf=None', 'mask_indptr_buf=None', "backend='auto'", 'jit_args=None',
        'jit_kwargs=None', 'variant_owns_mask=False',
    ],
    'flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.plan': [
        'self', 'qo_indptr', 'kv_indptr', 'num_qo_heads', 'num_kv_heads', 'head_dim_qk', 'head_dim_vo=None',
        'custom_mask=None', 'packed_custom_mask=None', 'causal=False', "pos_encoding_mode='NONE'",
        'use_fp16_qk_reduction=False', 'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None',
        'rope_scale=None', 'rope_theta=None', "q_data_type='float16'", 'kv_data_type=None', 'o_data_type=None',
        'non_blocking=True', 'prefix_len_ptr=None', 'token_pos_in_items_ptr=None', 'token_pos_in_items_len=0',
        'max_item_len_ptr=None', 'fixed_split_size=None', 'disable_split_kv=False', 'seq_lens=None',
        'seq_lens_q=None', 'max_token_per_sequence=None', 'max_sequence_kv=None', 'v_indptr=None', 'o_indptr=None',
    ],
    'flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.run': [
        'self', 'q', 'k', 'v', '*args', 'q_scale=None', 'k_scale=None', 'v_scale=None', 'o_scale=None', 'out=None',
        'lse=None', 'return_lse=False', "lse_base='log2'", "lse_layout='NH'", 'enable_pdl=None',
        'kv_cache_sf=None',
    ],
    'flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.forward': [
        'self', 'q', 'k', 'v', 'causal=False', "pos_encoding_mode='NONE'", 'use_fp16_qk_reduction=False',
        'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None', 'rope_scale=None', 'rope_theta=None',
    ],
    'flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.forward_return_lse': [
        'self', 'q', 'k', 'v', 'causal=False', "pos_encoding_mode='NONE'", 'use_fp16_qk_reduction=False',
        'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None', 'rope_scale=None', 'rope_theta=None',
    ],
    'flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.reset_workspace_buffer': [
        'self', 'float_workspace_buffer', 'int_workspace_buffer',
    ],
    'flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.__init__': [
        'self', 'float_workspace_buffer', "kv_layout='NHD'", 'use_cuda_graph=False', 'qo_indptr_buf=None',
        'paged_kv_indptr_buf=None', 'paged_kv_indices_buf=None', 'paged_kv_last_page_len_buf=None',
        'custom_mask_buf=None', 'mask_indptr_buf=None', "backend='auto'", 'jit_args=None', 'jit_kwargs=None',
        'variant_owns_mask=False',
    ],
    'flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.plan': [
        'self', 'qo_indptr', 'paged_kv_indptr', 'paged_kv_indices', 'paged_kv_last_page_len', 'num_qo_heads',
        'num_kv_heads', 'head_dim_qk', 'page_size', 'head_dim_vo=None', 'custom_mask=None',
        'packed_custom_mask=None', 'causal=False', "pos_encoding_mode='NONE'", 'use_fp16_qk_reduction=False',
        'sm_scale=None', 'window_left=-1', 'logits_soft_cap=None', 'rope_scale=None', 'rope_theta=None',
        "q_data_type='float16'", 'kv_data_type=None', 'o_data_type=None', 'non_blocking=True',
        'prefix_len_ptr=None', 'token_pos_in_items_ptr=None', 'token_pos_in_items_len=0', 'max_item_len_ptr=None',
        'seq_lens=None', 'seq_lens_q=None', 'block_tables=None', 'max_token_per_sequence=None',
        'max_sequence_kv=None', 'fixed_split_size=None', 'disable_split_kv=False',
    ],
    'flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.run': [
        'self', 'q', 'paged_kv_cache', '*args', 'q_scale=None', 'k_scale=None', 'v_scale=None', 'out=None',
        'lse=None', 'return_lse=False', "lse_base='log2'", "lse_layout='NH'", 'enable_pdl=None',
        'window_left=None', 'sinks=None', 'kv_cache_sf=None', 'skip_softmax_threshold_scale_factor=None',
        'use_fp16_softmax=None', 'uses_spcompress=None',
    ],
    'flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.forward': [
        'self', 'q', 'paged_kv_cache', 'causal=False', "pos_encoding_mode='NONE'", 'use_fp16_qk_reduction=False',
        'k_scale=None', 'v_scale=None', 'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None',
        'rope_scale=None', 'rope_theta=None',
    ],
    'flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.forward_return_lse': [
        'self', 'q', 'paged_kv_cache', 'causal=False', "pos_encoding_mode='NONE'", 'use_fp16_qk_reduction=False',
        'k_scale=None', 'v_scale=None', 'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None',
        'rope_scale=None', 'rope_theta=None',
    ],
    'flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.reset_workspace_buffer': [
        'self', 'float_workspace_buffer', 'int_workspace_buffer',
    ],
    'flashinfer.prefill.single_prefill_with_kv_cache': [
        'q', 'k', 'v', 'scale_q=None', 'scale_k=None', 'scale_v=None', 'o_dtype=None', 'custom_mask=None',
        'packed_custom_mask=None', 'causal=False', "kv_layout='NHD'", "pos_encoding_mode='NONE'",
        'use_fp16_qk_reduction=False', 'sm_scale=None', 'window_left=-1', 'logits_soft_cap=None',
        'rope_scale=None', 'rope_theta=None', "backend='auto'", 'return_lse=False', 'kv_cache_sf=None',
        'k_scale=None', 'v_scale=None',
    ],
}

# run_return_lse = functools.partialmethod(run, return_lse=True): run's parameters, return_lse=True.
for _cls in ("BatchPrefillWithRaggedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper"):
    SIGNATURES[f"flashinfer.prefill.{_cls}.run_return_lse"] = [
        "return_lse=True" if p == "return_lse=False" else p for p in SIGNATURES[f"flashinfer.prefill.{_cls}.run"]]

# single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache, return_lse=True):
# inspect.signature makes return_lse, and every parameter after it, keyword-only.
_single = SIGNATURES["flashinfer.prefill.single_prefill_with_kv_cache"]
_at = _single.index("return_lse=False")
SIGNATURES["flashinfer.prefill.single_prefill_with_kv_cache_return_lse"] = (
    _single[:_at] + ["*", "return_lse=True"] + _single[_at + 1:])

ALIASES: dict[str, str] = {
    "flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.begin_forward":
        "flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.plan",
    "flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.begin_forward":
        "flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.plan",
}

TOP_LEVEL: list[str] = [
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
]

# The issue lists end_forward; FlashInfer 0.7.2's prefill wrappers have none (older releases had a no-op).
# flashinfer-jit keeps a no-op end_forward() for old callers.
ABSENT: list[str] = [
    "flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.end_forward",
    "flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper.end_forward",
]

# (entry, parameter) -> why our default differs from FlashInfer's literal one.
DEFAULT_DIFFERS: dict[tuple[str, str], str] = {}


# ---- decode / page / cascade / attention: the same 0.7.2 wheel (flashinfer/decode.py, page.py, cascade.py,
# attention/_core.py), parsed the same way. ----------------------------------------------------------------
SIGNATURES.update({
    # FlashInfer 0.7.2 declares plan(self, indptr, ..., page_size, *deprecated_positional_args, **kwargs): the
    # options after page_size are still accepted by position (with a DeprecationWarning), in the order of its
    # _BATCH_DECODE_PLAN_LEGACY_POS_ARGS, and by keyword (_plan_impl's keyword-only parameters, which add
    # window_right and is_causal). This entry is that effective signature: vLLM passes 21-22 of them by position.
    'flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.plan': [
        'self', 'indptr', 'indices', 'last_page_len', 'num_qo_heads', 'num_kv_heads', 'head_dim', 'page_size',
        "pos_encoding_mode='NONE'", 'window_left=-1', 'logits_soft_cap=None', "q_data_type='float16'",
        'kv_data_type=None', 'o_data_type=None', 'data_type=None', 'sm_scale=None', 'rope_scale=None',
        'rope_theta=None', 'non_blocking=True', 'block_tables=None', 'seq_lens=None', 'fixed_split_size=None',
        'disable_split_kv=False', 'q_len_per_req=1', '*', 'window_right=0', 'is_causal=None',
    ],
    'flashinfer.decode.single_decode_with_kv_cache': [
        'q', 'k', 'v', "kv_layout='NHD'", "pos_encoding_mode='NONE'", 'use_tensor_cores=False', 'q_scale=None',
        'k_scale=None', 'v_scale=None', 'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None',
        'rope_scale=None', 'rope_theta=None', 'return_lse=False',
    ],
    'flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.__init__': [
        'self', 'float_workspace_buffer', "kv_layout='NHD'", 'use_cuda_graph=False', 'use_tensor_cores=False',
        'paged_kv_indptr_buffer=None', 'paged_kv_indices_buffer=None', 'paged_kv_last_page_len_buffer=None',
        "backend='auto'", 'jit_args=None',
    ],
    'flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.reset_workspace_buffer': [
        'self', 'float_workspace_buffer', 'int_workspace_buffer',
    ],
    'flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.prewarm_paged_kv_stride_variant': [
        'self', "variant='independent'",
    ],
    'flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.forward': [
        'self', 'q', 'paged_kv_cache', "pos_encoding_mode='NONE'", 'q_scale=None', 'k_scale=None', 'v_scale=None',
        'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None', 'rope_scale=None', 'rope_theta=None',
    ],
    'flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.run': [
        'self', 'q', 'paged_kv_cache', '*args', 'q_scale=None', 'k_scale=None', 'v_scale=None', 'out=None',
        'lse=None', 'return_lse=False', 'enable_pdl=None', 'window_left=None', 'sinks=None', 'q_len_per_req=None',
        'skip_softmax_threshold_scale_factor=None', 'kv_cache_sf=None',
    ],
    'flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.forward_return_lse': [
        'self', 'q', 'paged_kv_cache', "pos_encoding_mode='NONE'", 'q_scale=None', 'k_scale=None', 'v_scale=None',
        'window_left=-1', 'logits_soft_cap=None', 'sm_scale=None', 'rope_scale=None', 'rope_theta=None',
    ],
    'flashinfer.decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper.__init__': [
        'self', 'workspace_buffer', 'indptr_buffer', 'indices_buffer', 'last_page_len_buffer', "kv_layout='NHD'",
        'use_tensor_cores=False',
    ],
    'flashinfer.decode.fast_decode_plan': [
        'self', 'indptr', 'indices', 'last_page_len', 'num_qo_heads', 'num_kv_heads', 'head_dim', 'page_size',
        "pos_encoding_mode='NONE'", 'window_left=-1', 'logits_soft_cap=None', 'q_data_type=None',
        'kv_data_type=None', 'data_type=None', 'sm_scale=None', 'rope_scale=None', 'rope_theta=None',
        'non_blocking=True', 'fixed_split_size=None', 'disable_split_kv=False', 'q_len_per_req=1',
        'global_override_indptr_cpu=None',
    ],
    'flashinfer.page.get_batch_indices_positions': [
        'append_indptr', 'seq_lens', 'nnz', 'batch_indices=None', 'positions=None',
    ],
    'flashinfer.page.get_seq_lens': [
        'kv_indptr', 'kv_last_page_len', 'page_size',
    ],
    'flashinfer.page.append_paged_kv_cache': [
        'append_key', 'append_value', 'batch_indices', 'positions', 'paged_kv_cache', 'kv_indices', 'kv_indptr',
        'kv_last_page_len', "kv_layout='NHD'",
    ],
    'flashinfer.cascade.merge_state': [
        'v_a', 's_a', 'v_b', 's_b',
    ],
    'flashinfer.cascade.merge_state_in_place': [
        'v', 's', 'v_other', 's_other', 'mask=None',
    ],
    'flashinfer.cascade.merge_states': [
        'v', 's',
    ],
    'flashinfer.cascade.MultiLevelCascadeAttentionWrapper.__init__': [
        'self', 'num_levels', 'float_workspace_buffer', "kv_layout='NHD'", 'use_cuda_graph=False',
        'qo_indptr_buf_arr=None', 'paged_kv_indptr_buf_arr=None', 'paged_kv_indices_buf_arr=None',
        'paged_kv_last_page_len_buf_arr=None',
    ],
    'flashinfer.cascade.MultiLevelCascadeAttentionWrapper.reset_workspace_buffer': [
        'self', 'float_workspace_buffer', 'int_workspace_buffers',
    ],
    'flashinfer.cascade.MultiLevelCascadeAttentionWrapper.plan': [
        'self', 'qo_indptr_arr', 'paged_kv_indptr_arr', 'paged_kv_indices_arr', 'paged_kv_last_page_len',
        'num_qo_heads', 'num_kv_heads', 'head_dim', 'page_size', 'causal=False', "pos_encoding_mode='NONE'",
        'use_fp16_qk_reduction=False', 'sm_scale=None', 'window_left=-1', 'logits_soft_cap=None',
        'rope_scale=None', 'rope_theta=None', "q_data_type='float16'", 'kv_data_type=None',
    ],
    'flashinfer.cascade.MultiLevelCascadeAttentionWrapper.prewarm_paged_kv_stride_variant': [
        'self', "variant='independent'",
    ],
    'flashinfer.cascade.MultiLevelCascadeAttentionWrapper.run': [
        'self', 'q', 'paged_kv_cache',
    ],
    'flashinfer.cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper.__init__': [
        'self', 'float_workspace_buffer', "kv_layout='NHD'",
    ],
    'flashinfer.cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper.reset_workspace_buffer': [
        'self', 'float_workspace_buffer', 'int_workspace_buffer',
    ],
    'flashinfer.cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper.begin_forward': [
        'self', 'unique_kv_indptr', 'unique_kv_indices', 'unique_kv_last_page_len', 'num_qo_heads', 'num_kv_heads',
        'head_dim', 'page_size', "data_type='float16'",
    ],
    'flashinfer.cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper.forward': [
        'self', 'q', 'k_shared', 'v_shared', 'unique_kv_cache',
    ],
    'flashinfer.cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper.__init__': [
        'self', 'float_workspace_buffer', "kv_layout='NHD'",
    ],
    'flashinfer.cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper.reset_workspace_buffer': [
        'self', 'float_workspace_buffer', 'int_workspace_buffer',
    ],
    'flashinfer.cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper.begin_forward': [
        'self', 'qo_indptr', 'paged_kv_indptr', 'paged_kv_indices', 'paged_kv_last_page_len', 'num_qo_heads',
        'num_kv_heads', 'head_dim', 'page_size',
    ],
    'flashinfer.cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper.prewarm_paged_kv_stride_variant': [
        'self', "variant='independent'",
    ],
    'flashinfer.cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper.forward': [
        'self', 'q', 'k_shared', 'v_shared', 'unique_kv_cache', 'causal=False', 'use_fp16_qk_reduction=False',
        'sm_scale=None', 'rope_scale=None', 'rope_theta=None',
    ],
    'flashinfer.attention.BatchAttention.__init__': [
        'self', "kv_layout='NHD'", "device='cuda'",
    ],
    'flashinfer.attention.BatchAttention.plan': [
        'self', 'qo_indptr', 'kv_indptr', 'kv_indices', 'kv_len_arr', 'num_qo_heads', 'num_kv_heads',
        'head_dim_qk', 'head_dim_vo', 'page_size', 'causal=False', 'sm_scale=None', 'logits_soft_cap=None',
        'q_data_type=...', 'kv_data_type=...', 'use_profiler=False',
    ],
    'flashinfer.attention.BatchAttention.prewarm_paged_kv_stride_variant': [
        'self', "variant='independent'",
    ],
    'flashinfer.attention.BatchAttention.run': [
        'self', 'q', 'kv_cache', 'out=None', 'lse=None', 'k_scale=None', 'v_scale=None', 'logits_soft_cap=0.0',
        'profiler_buffer=None', 'kv_cache_sf=None',
    ],
})
SIGNATURES["flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.run_return_lse"] = [
    "return_lse=True" if p == "return_lse=False" else p
    for p in SIGNATURES["flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.run"]]

ALIASES.update({
    "flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.begin_forward":
        "flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.plan",
    "flashinfer.cascade.MultiLevelCascadeAttentionWrapper.begin_forward":
        "flashinfer.cascade.MultiLevelCascadeAttentionWrapper.plan",
    "flashinfer.cascade.MultiLevelCascadeAttentionWrapper.forward":
        "flashinfer.cascade.MultiLevelCascadeAttentionWrapper.run",
})

TOP_LEVEL += [
    "BatchAttention",
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "MultiLevelCascadeAttentionWrapper",
    "append_paged_kv_cache",
    "fast_decode_plan",
    "get_batch_indices_positions",
    "get_seq_lens",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "single_decode_with_kv_cache",
]

# FlashInfer 0.7.2's decode wrapper has no end_forward (older releases had a no-op); ours keeps the no-op.
ABSENT += ["flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.end_forward"]

DEFAULT_DIFFERS.update({
    ("flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.plan", "q_data_type"):
        "None: q takes the KV dtype (data_type / kv_data_type), else float16. FlashInfer's 'float16' default makes "
        "plan(..., data_type=torch.bfloat16) a float16-q / bf16-KV plan, which its kernels then refuse at run()",
})

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

"""flashinfer-jit: FlashInfer's attention API, with kernels generated, compiled and cached on demand."""
import logging as _logging

from .attention import BatchAttention
from .cascade import (
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
    BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    MultiLevelCascadeAttentionWrapper,
    merge_state,
    merge_state_in_place,
    merge_states,
)
from .errors import (
    BuildLockTimeout,
    CacheIntegrityError,
    CacheSecurityError,
    CacheWriteError,
    FlashInferJITError,
    KernelCompileError,
    KernelLaunchError,
    KernelLoadError,
    MissingKernelError,
    NotSupportedError,
    ToolchainNotFoundError,
    VariantCompileError,
)
from .decode import (
    BatchDecodeWithPagedKVCacheWrapper,
    CUDAGraphBatchDecodeWithPagedKVCacheWrapper,
    fast_decode_plan,
    single_decode_with_kv_cache,
)
from .page import append_paged_kv_cache, get_batch_indices_positions, get_seq_lens
from .prefill import (
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    single_prefill_with_kv_cache,
    single_prefill_with_kv_cache_return_lse,
)
from .rope import apply_rope, apply_rope_inplace, apply_rope_pos_ids, apply_rope_pos_ids_inplace
from .variants import AttentionVariant
from .version import __version__

# Library logging: silent unless the application configures logging (builds log at INFO).
_logging.getLogger("flashinfer_jit").addHandler(_logging.NullHandler())

__all__ = [
    "AttentionVariant",
    "BatchAttention",
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "MultiLevelCascadeAttentionWrapper",
    "BuildLockTimeout",
    "CacheIntegrityError",
    "CacheSecurityError",
    "CacheWriteError",
    "FlashInferJITError",
    "KernelCompileError",
    "KernelLaunchError",
    "KernelLoadError",
    "MissingKernelError",
    "NotSupportedError",
    "ToolchainNotFoundError",
    "VariantCompileError",
    "__version__",
    "append_paged_kv_cache",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "fast_decode_plan",
    "get_batch_indices_positions",
    "get_seq_lens",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "single_decode_with_kv_cache",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
]

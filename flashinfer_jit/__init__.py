"""flashinfer-jit: FlashInfer's attention API, with kernels generated, compiled and cached on demand."""
import logging as _logging

from .cascade import merge_state, merge_state_in_place, merge_states
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
)
from .decode import BatchDecodeWithPagedKVCacheWrapper
from .page import append_paged_kv_cache, get_batch_indices_positions
from .prefill import (
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    single_prefill_with_kv_cache,
    single_prefill_with_kv_cache_return_lse,
)
from .version import __version__

# Library logging: silent unless the application configures logging (builds log at INFO).
_logging.getLogger("flashinfer_jit").addHandler(_logging.NullHandler())

__all__ = [
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
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
    "__version__",
    "append_paged_kv_cache",
    "get_batch_indices_positions",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
]

// Batch-prefill kernels, the header the generated prefill sources include. One backend today: the
// FA2-class sm80+ kernel (prefill_sm80.cuh); each backend is its own prefill_<arch>.cuh built from
// the shared concern headers (variant, softmax, epilogue, state merge, tile scheduler).
#pragma once
#include "flashinfer_jit/prefill_sm80.cuh"

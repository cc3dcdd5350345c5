// plan() in one host call: the planner's work list, the page table and zeroed merge counters
// written into pinned memory and sent to the GPU by one asynchronous copy. Host-only (CUDA runtime
// API, no device code).
#pragma once
#include <cuda_runtime.h>
#include <string.h>

#include "flashinfer_jit/prefill_plan.h"

namespace fij {

// plan() in one host call (one C-ABI argument, so the Python side pays for one conversion).
// Mirrored by ctypes (flashinfer_jit/abi.py), checked field by field in the generated source.
struct PlanCall {
  const int32_t* qo_indptr;
  const int32_t* kv_indptr;
  const PlanConfig* config;
  int32_t* host;              // pinned staging buffer
  const UploadLayout* layout;
  const int32_t* page_indptr;  // paged layouts, else null
  const int32_t* page_indices;
  int64_t num_page_indices;
  void* device;               // int32 metadata buffer on the GPU
  cudaStream_t stream;
  cudaEvent_t host_free;      // recorded after the copy from `host`; waited on before reusing it
  PlanResult* result;
};

// Plan (with the variant's kv ranges) into the pinned host buffer, add counts, the page table and
// zeroed merge counters at their layout offsets, and start one host-to-device copy on the stream.
// Returns a PlanStatus, or -cudaError_t when a CUDA call failed. Nothing is uploaded unless the plan
// fits. MergeEntry records are not produced: the kernel finds everything in its WorkItem.
template <typename Variant>
int plan_and_upload(const PlanCall& c) {
  // The previous copy out of this staging buffer must be done before it is overwritten; in steady
  // state it finished long ago (the caller alternates two buffers), so this rarely waits.
  if (c.host_free != nullptr && cudaEventQuery(c.host_free) == cudaErrorNotReady) {
    const cudaError_t err = cudaEventSynchronize(c.host_free);
    if (err != cudaSuccess) return -int(err);
  }
  const PlanConfig& cfg = *c.config;
  const UploadLayout& layout = *c.layout;
  int32_t* host = c.host;
  const int32_t status = plan_prefill<Variant>(c.qo_indptr, c.kv_indptr, cfg,
                                               reinterpret_cast<WorkItem*>(host + layout.items), layout.item_capacity,
                                               nullptr, layout.merge_capacity, c.result);
  if (status != kPlanOk) return status;
  if (c.result->partial_rows * cfg.num_kv_heads > layout.partial_slots) return kPlanWorkspace;
  host[0] = int32_t(c.result->num_items);
  host[1] = int32_t(c.result->num_merges);
  if (c.page_indptr != nullptr) {
    memcpy(host + layout.page_indices, c.page_indices, sizeof(int32_t) * size_t(c.num_page_indices));
    WorkItem* items = reinterpret_cast<WorkItem*>(host + layout.items);
    for (int64_t i = 0; i < c.result->num_items; ++i) items[i].page_start = c.page_indptr[items[i].request];
  }
  memset(host + layout.counters, 0, sizeof(int32_t) * size_t(layout.total - layout.counters));
  cudaError_t err =
      cudaMemcpyAsync(c.device, host, sizeof(int32_t) * size_t(layout.total), cudaMemcpyHostToDevice, c.stream);
  if (err == cudaSuccess && c.host_free != nullptr) err = cudaEventRecord(c.host_free, c.stream);
  return err == cudaSuccess ? 0 : -int(err);
}

}  // namespace fij

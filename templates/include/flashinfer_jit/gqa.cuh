// GQA packing. The G = Hq / Hkv query heads of one KV head share its K/V tiles, so q tiles hold
// "packed rows": packed row p of KV head hk is token p / G of the request, query head hk * G + p % G.
// The planner counts rows this way (prefill_plan.h); on the device every row -> (token, head)
// mapping goes through unpack_row.
#pragma once

namespace fij {

struct PackedRow {
  int token;  // within the request
  int head;   // query head
};

__device__ __forceinline__ PackedRow unpack_row(int packed, int group, int kv_head) {
  return PackedRow{packed / group, kv_head * group + packed % group};
}

}  // namespace fij

// What the MoE decode kernels (moe.cpp: bf16 experts, fp8.cpp: FP8 experts) share: the twin's bf16 roundings, the
// order in which it sums each token's experts, and that sum (pass 3 of both kernels).
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace qwen35_moe {

inline float round_bf16(float v) { return static_cast<float>(static_cast<at::BFloat16>(v)); }
inline uint16_t bits_bf16(float v) { return at::BFloat16(v).x; }  // round to nearest even

// Per token, its k slots (m * k + j) in ascending expert id: the twin's accumulation order (a stable sort, as
// ExpertDispatch's argsort).
inline std::vector<int64_t> slots_by_expert(const int64_t* ids, int64_t M, int64_t k) {
  std::vector<int64_t> order(M * k);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < k; ++j) order[m * k + j] = m * k + j;
    std::stable_sort(order.begin() + m * k, order.begin() + (m + 1) * k,
                     [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  }
  return order;
}

// out[m, n] = the y[slot, n] of token m's experts summed in `order`, rounded to bf16 after each step, as
// index_add_ into a bf16 tensor does.
inline void sum_in_expert_order(const std::vector<float>& y, const std::vector<int64_t>& order, int64_t M, int64_t k,
                                int64_t H, at::BFloat16* out) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < H; ++n) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc = round_bf16(acc + y[order[m * k + j] * H + n]);
      out[m * H + n] = static_cast<at::BFloat16>(acc);
    }
  }
}

}  // namespace qwen35_moe

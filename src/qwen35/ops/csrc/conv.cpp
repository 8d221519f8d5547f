// The GDN's causal depthwise conv over a prompt chunk, fused with its SiLU, for one sequence.
//
// y[t, c] = silu(sum_j w[c, j] * in[t - (K-1) + j, c]) where `in` is the (K-1)-row window followed by x.
// Channels are contiguous in x, so each step is a vector over 16 channels; tasks are blocks of rows.
// Roundings follow the twin (ops/conv.py: conv output rounded to the model dtype, SiLU of that, rounded
// again). torch's path took ~75 ms per layer at 4K tokens on the 0.8B (mkldnn conv, transposes, SiLU).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include "simd.h"

namespace {

using namespace qwen35_simd;

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
// round to T and back (the twin's rounding of the conv output and of the SiLU output)
inline __m512 round_to(__m512 v, const float*) { return v; }
inline __m512 round_to(__m512 v, const at::BFloat16*) {
  // round to nearest even on the upper 16 bits, as c10::BFloat16's conversion does (NaN not expected here)
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {  // v already rounded: truncation is exact
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#elif defined(__AVX2__) && defined(__FMA__)
// the same with 8 lanes
inline __m256 round_to(__m256 v, const float*) { return v; }
inline __m256 round_to(__m256 v, const at::BFloat16*) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) {  // v already rounded: the upper halves, packed
  const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

template <typename T>
void run(const T* x, int64_t ldx, const float* wt, const float* pre, int64_t T_, int64_t C, int64_t K, T* y) {
  const int64_t W = K - 1;
  at::parallel_for(0, T_, 64, [&](int64_t t0, int64_t t1) {
    int64_t c0 = 0;
#if defined(__AVX512F__)
    // 16 channels at a time, their K weights in registers, over the task's rows
    if (K <= 8) {
      for (; c0 + 16 <= C; c0 += 16) {
        __m512 w[8];
        for (int64_t j = 0; j < K; ++j) w[j] = _mm512_loadu_ps(wt + j * C + c0);
        for (int64_t t = t0; t < t1; ++t) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t j = 0; j < K; ++j) {
            const int64_t s = t - W + j;  // input row; negative rows are the window's
            const __m512 in = s < 0 ? _mm512_loadu_ps(pre + (W + s) * C + c0) : load16(x + s * ldx + c0);
            acc = _mm512_fmadd_ps(w[j], in, acc);
          }
          store16(y + t * C + c0, round_to(silu(round_to(acc, y)), y));
        }
      }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (K <= 8) {
      for (; c0 + 8 <= C; c0 += 8) {
        __m256 w[8];
        for (int64_t j = 0; j < K; ++j) w[j] = _mm256_loadu_ps(wt + j * C + c0);
        for (int64_t t = t0; t < t1; ++t) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t j = 0; j < K; ++j) {
            const int64_t s = t - W + j;
            const __m256 in = s < 0 ? _mm256_loadu_ps(pre + (W + s) * C + c0) : load8(x + s * ldx + c0);
            acc = _mm256_fmadd_ps(w[j], in, acc);
          }
          store8(y + t * C + c0, round_to(silu8(round_to(acc, y)), y));
        }
      }
    }
#endif
    for (int64_t t = t0; t < t1; ++t) {  // channels left over (all of them without AVX-512 or AVX2)
      for (int64_t c = c0; c < C; ++c) {
        float acc = 0.f;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t s = t - W + j;
          acc += wt[j * C + c] * (s < 0 ? pre[(W + s) * C + c] : f32(x[s * ldx + c]));
        }
        const float r = f32(static_cast<T>(acc));
        y[t * C + c] = static_cast<T>(r / (1.f + std::exp(-r)));
      }
    }
  });
}

}  // namespace

// x [T, C] (fp32 or bf16, unit column stride), weight [C, K] (same dtype), window [C, K-1] (same dtype; numel 0 =
// zeros) -> silu(conv) [T, C] in x's dtype. The new window is the caller's: the last K-1 rows of (window, x).
torch::Tensor causal_conv1d_silu(torch::Tensor x, torch::Tensor weight, torch::Tensor window) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(0), "causal_conv1d_silu: shapes");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "causal_conv1d_silu: x and weight dtypes differ");
  const int64_t T_ = x.size(0), C = x.size(1), K = weight.size(1), W = K - 1;
  auto xc = x.stride(1) == 1 ? x : x.contiguous();  // rows may be strided (a column slice of a projection)
  const int64_t ldx = xc.stride(0);
  auto wt = weight.to(at::kFloat).t().contiguous();  // [K, C]
  auto pre = window.numel() == 0 ? torch::zeros({W, C}, x.options().dtype(at::kFloat))
                                 : window.reshape({C, W}).to(at::kFloat).t().contiguous();  // [W, C]
  auto y = torch::empty({T_, C}, xc.options());
  if (x.scalar_type() == at::kBFloat16) {
    run(xc.data_ptr<at::BFloat16>(), ldx, wt.data_ptr<float>(), pre.data_ptr<float>(), T_, C, K,
        y.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "causal_conv1d_silu: fp32 or bf16");
    run(xc.data_ptr<float>(), ldx, wt.data_ptr<float>(), pre.data_ptr<float>(), T_, C, K, y.data_ptr<float>());
  }
  return y;
}

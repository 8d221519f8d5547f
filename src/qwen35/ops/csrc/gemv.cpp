// Memory-bound matrix-vector products for decoding on x86 CPUs.
//
// y[m, n] = sum_k x[m, k] * W[n, k] for a few rows m (decode batches), W stored row-major in bf16
// (or int8 with one fp32 scale per row). Decoding reads every weight once per token, so the speed limit
// is memory bandwidth: each weight row is streamed once and dotted with all M inputs while in cache.
// With AVX512-BF16 the dot products use vdpbf16ps (bf16 pairs -> fp32 accumulate); otherwise bf16 is
// widened to fp32 with a shift and fused multiply-add. Results are accumulated in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>
#include "bf16_dot.h"
#include "gemv_amx.h"

namespace {

using namespace qwen35_bf16;

constexpr int kMaxM = 8;     // rows computed together in registers
constexpr int kMaxScreen = 32;  // batch rows of one head_screen_candidates pass (qwen35/ops/head_screen.py)
constexpr int kMaxRows = 32;  // rows per call: larger groups re-read each weight row from L1

#if defined(__AVX512BF16__)
// One weight row against MM input rows, MM a compile-time count so that every accumulator stays in a register.
// Each input's sums in row_bf16_m1's order (two chains over alternate 32-value halves of every 64, the last 32
// on the first chain, the chains added, then the tail), so a row's result does not depend on how many rows come
// with it (speculative decoding's verify rows equal decode rows).
template <int MM>
inline void row_bf16_mm(const uint16_t* w, int64_t K, const uint16_t* x, int64_t ldx, float* out) {
  __m512 a[MM], b[MM];
  for (int m = 0; m < MM; ++m) a[m] = b[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int m = 0; m < MM; ++m) {
      a[m] = _mm512_dpbf16_ps(a[m], w0, (__m512bh)_mm512_loadu_si512(x + m * ldx + k));
      b[m] = _mm512_dpbf16_ps(b[m], w1, (__m512bh)_mm512_loadu_si512(x + m * ldx + k + 32));
    }
  }
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int m = 0; m < MM; ++m) a[m] = _mm512_dpbf16_ps(a[m], wv, (__m512bh)_mm512_loadu_si512(x + m * ldx + k));
  }
  for (int m = 0; m < MM; ++m) {
    float r = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));
    for (int64_t kk = k; kk < K; ++kk) r += bf16_to_float(w[kk]) * bf16_to_float(x[m * ldx + kk]);
    out[m] = r;
  }
}

inline void rows_bf16_mm(const uint16_t* w, int64_t K, const uint16_t* x, int64_t ldx, int64_t M, float* out) {
  switch (M) {
    case 1: return row_bf16_mm<1>(w, K, x, ldx, out);
    case 2: return row_bf16_mm<2>(w, K, x, ldx, out);
    case 3: return row_bf16_mm<3>(w, K, x, ldx, out);
    case 4: return row_bf16_mm<4>(w, K, x, ldx, out);
    case 5: return row_bf16_mm<5>(w, K, x, ldx, out);
    case 6: return row_bf16_mm<6>(w, K, x, ldx, out);
    case 7: return row_bf16_mm<7>(w, K, x, ldx, out);
    default: return row_bf16_mm<8>(w, K, x, ldx, out);
  }
}
#endif

// One weight row for M inputs, without SIMD (hosts with neither AVX512-BF16 nor AVX-512; those use row_bf16_mm
// and row_f32x). x is bf16 [M, K] with row stride ldx.
inline void row_bf16_scalar(const uint16_t* w, int64_t K, const uint16_t* x, int64_t M, int64_t ldx, float* out) {
  for (int64_t m = 0; m < M; ++m) out[m] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float wk = bf16_to_float(w[k]);
    for (int64_t m = 0; m < M; ++m) out[m] += wk * bf16_to_float(x[m * ldx + k]);
  }
}

#if defined(__AVX512F__) && !defined(__AVX512BF16__)
// One weight row (bf16, widened here) against MG inputs already widened to fp32 (xf: [MG, K], row stride K): per
// input one accumulator along k, 16 values at a time, then the 16 lanes added up and the tail (dot_bf16's order),
// for any MG and any grouping of the rows: a row's result does not depend on the batch.
template <int MG>
inline void row_f32x(const uint16_t* w, int64_t K, const float* xf, float* out) {
  __m512 acc[MG];
  for (int m = 0; m < MG; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    for (int m = 0; m < MG; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + m * K + k), acc[m]);
  }
  for (int m = 0; m < MG; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
  for (; k < K; ++k) {
    const float wk = bf16_to_float(w[k]);
    for (int m = 0; m < MG; ++m) out[m] += wk * xf[m * K + k];
  }
}

constexpr int kGroupF32 = 16;  // inputs per pass over a weight row (16 accumulators, the row from L1 after the first)

inline void rows_f32x(const uint16_t* w, int64_t K, const float* xf, int64_t M, float* out) {
  for (int64_t m0 = 0; m0 < M; m0 += kGroupF32) {
    const int64_t mg = std::min<int64_t>(kGroupF32, M - m0);
    const float* x = xf + m0 * K;
    float* o = out + m0;
    switch (mg) {
      case 1: row_f32x<1>(w, K, x, o); break;
      case 2: row_f32x<2>(w, K, x, o); break;
      case 3: row_f32x<3>(w, K, x, o); break;
      case 4: row_f32x<4>(w, K, x, o); break;
      case 5: row_f32x<5>(w, K, x, o); break;
      case 6: row_f32x<6>(w, K, x, o); break;
      case 7: row_f32x<7>(w, K, x, o); break;
      case 8: row_f32x<8>(w, K, x, o); break;
      case 9: row_f32x<9>(w, K, x, o); break;
      case 10: row_f32x<10>(w, K, x, o); break;
      case 11: row_f32x<11>(w, K, x, o); break;
      case 12: row_f32x<12>(w, K, x, o); break;
      case 13: row_f32x<13>(w, K, x, o); break;
      case 14: row_f32x<14>(w, K, x, o); break;
      case 15: row_f32x<15>(w, K, x, o); break;
      default: row_f32x<16>(w, K, x, o); break;
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// Hosts with AVX2 + FMA and no AVX-512, any number of input rows (1-32; x already widened to fp32). A tile of kTileN
// weight rows meets x one kBlockK-wide slice at a time, in register blocks of 6 inputs x 2 weight rows: 12
// accumulators, 2 weight vectors and one input take 15 of the 16 ymm registers (4 x 3 made the compiler fold
// the input loads into the FMAs, 15 loads per 12 FMAs: ~0.7x as fast on a Zen 3 core). Each block prefetches the
// weight rows of the block after it into L1: without, the tile's interleaved row reads left the memory idle
// (batch 2 ran at half the bandwidth). Each (input, weight row) pair keeps one 8-lane accumulator along k, carried
// across the slices in `acc`, then the lanes added (hsum8) and the tail: the same order for any number of rows
// and any tiling, so a row's result does not depend on the batch. Measured (Zen 3 guest, 2 threads, 0.8B MLP
// shapes): batch 1 at 17-22 GB/s, batch 16 at 66-86 GFLOP/s, where one weight row at a time against all of x
// (x re-read from L2 per row past 4 inputs) ran 23-34.
constexpr int64_t kBlockK = 1024;
constexpr int64_t kTileN = 16;

template <int MQ, int NQ>
inline void block_f32x8(const uint16_t* w, int64_t K, const float* xf, int64_t k0, int64_t k1, __m256* acc,
                        int64_t lda) {
  __m256 a[MQ][NQ];
  for (int m = 0; m < MQ; ++m)
    for (int n = 0; n < NQ; ++n) a[m][n] = acc[n * lda + m];
  for (int64_t k = k0; k < k1; k += 8) {
    if (k % 32 == 0)  // one line of each row of the next block (the next tile's first rows after the last block)
      for (int n = 0; n < NQ; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + (n + NQ) * K + k), _MM_HINT_T0);
    __m256 wv[NQ];
    for (int n = 0; n < NQ; ++n) wv[n] = widen8_bf16(w + n * K + k);
    for (int m = 0; m < MQ; ++m) {
      const __m256 xv = _mm256_loadu_ps(xf + m * K + k);
      for (int n = 0; n < NQ; ++n) a[m][n] = _mm256_fmadd_ps(wv[n], xv, a[m][n]);
    }
  }
  for (int m = 0; m < MQ; ++m)
    for (int n = 0; n < NQ; ++n) acc[n * lda + m] = a[m][n];
}

template <int NQ>
inline void block_rows(const uint16_t* w, int64_t K, const float* xf, int64_t M, int64_t k0, int64_t k1, __m256* acc,
                       int64_t lda) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) block_f32x8<6, NQ>(w, K, xf + m * K, k0, k1, acc + m, lda);
  switch (M - m) {
    case 1: block_f32x8<1, NQ>(w, K, xf + m * K, k0, k1, acc + m, lda); break;
    case 2: block_f32x8<2, NQ>(w, K, xf + m * K, k0, k1, acc + m, lda); break;
    case 3: block_f32x8<3, NQ>(w, K, xf + m * K, k0, k1, acc + m, lda); break;
    case 4: block_f32x8<4, NQ>(w, K, xf + m * K, k0, k1, acc + m, lda); break;
    case 5: block_f32x8<5, NQ>(w, K, xf + m * K, k0, k1, acc + m, lda); break;
    default: break;
  }
}

// Weight rows [n0, n1) against all M inputs; store(m, n, value).
template <typename Store>
inline void rows_f32x_blocked(const uint16_t* w, int64_t K, const float* xf, int64_t M, int64_t n0, int64_t n1,
                              Store&& store) {
  constexpr int64_t lda = kMaxRows;
  __m256 acc[kTileN * lda];
  const int64_t K8 = K / 8 * 8;
  for (int64_t t0 = n0; t0 < n1; t0 += kTileN) {
    const int64_t nt = std::min<int64_t>(kTileN, n1 - t0);
    for (int64_t i = 0; i < nt * lda; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K8; k0 += kBlockK) {
      const int64_t k1 = std::min<int64_t>(K8, k0 + kBlockK);
      int64_t n = 0;
      for (; n + 2 <= nt; n += 2) block_rows<2>(w + (t0 + n) * K, K, xf, M, k0, k1, acc + n * lda, lda);
      if (nt - n == 1) block_rows<1>(w + (t0 + n) * K, K, xf, M, k0, k1, acc + n * lda, lda);
    }
    for (int64_t n = 0; n < nt; ++n) {
      const uint16_t* wr = w + (t0 + n) * K;
      for (int64_t m = 0; m < M; ++m) {
        float r = hsum8(acc[n * lda + m]);
        for (int64_t k = K8; k < K; ++k) r += bf16_to_float(wr[k]) * xf[m * K + k];
        store(m, t0 + n, r);
      }
    }
  }
}
#endif

// int8 weights with a per-row fp32 scale; x is fp32 [M, K].
inline void row_int8(const int8_t* w, float scale, const float* x, int64_t K, int64_t M, int64_t ldx, float* out) {
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 acc[kMaxM];
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[m]);
  }
  for (int64_t m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[kMaxM];
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m]);
  }
  for (int64_t m = 0; m < M; ++m) out[m] = hsum8(acc[m]);
#else
  for (int64_t m = 0; m < M; ++m) out[m] = 0.f;
#endif
  for (; k < K; ++k)
    for (int64_t m = 0; m < M; ++m) out[m] += static_cast<float>(w[k]) * x[m * ldx + k];
  for (int64_t m = 0; m < M; ++m) out[m] *= scale;
}

// Rows per task: at least ~1M weights (2 MB bf16), so small matrices run on one thread. A parallel region
// costs a barrier, and a barrier waits for every thread: with another process on the other core, that wait is
// a scheduler time slice (measured: a 1 MB matrix took 8 ms on 2 threads under load, 0.05 ms on one).
inline int64_t grain_rows(int64_t K) { return std::max<int64_t>(64, (int64_t{1} << 20) / std::max<int64_t>(K, 1)); }

void check(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "gemv: x must be [M, K] and w [N, K]");
  TORCH_CHECK(x.size(1) == w.size(1), "gemv: x has K=", x.size(1), " but w has K=", w.size(1));
  TORCH_CHECK(x.size(0) <= kMaxRows, "gemv: at most ", kMaxRows, " rows");
  TORCH_CHECK(w.is_contiguous() && x.stride(1) == 1, "gemv: w must be contiguous and x row-major");
}

}  // namespace

// x: bf16 [M, K], w: bf16 [N, K] -> fp32 [M, N], or bf16 (rounded to nearest even, as Tensor.to does) with
// out_bf16: decoding wants the model dtype, and a separate conversion costs a dispatch per layer.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, bool out_bf16) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 inputs");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  auto y = torch::empty({M, N}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* yf = out_bf16 ? nullptr : y.data_ptr<float>();
  at::BFloat16* yb = out_bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
  // AMX where the CPU and the OS allow it, for every row count alike (the rows' sums then never depend on the batch)
  if (qwen35_amx::gemv_bf16(xp, ldx, M, K, wp, N, yf, yb)) return y;
  auto store = [&](int64_t i, float v) {
    if (yb != nullptr) yb[i] = static_cast<at::BFloat16>(v);
    else yf[i] = v;
  };
  // One weight row after the other: a single sequential stream, which the hardware prefetcher follows at
  // full speed (interleaving 4 rows measured 2.4x slower: 10 vs 25 GB/s on one core).
#if (defined(__AVX512F__) && !defined(__AVX512BF16__)) || (defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__))
  {  // x widened to fp32 once, not again for every weight row (exact: the same sums as widening on the fly)
    std::vector<float> xf(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xf[m * K + k] = bf16_to_float(xp[m * ldx + k]);
    at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
      float out[kMaxRows];
      for (int64_t n = n0; n < n1; ++n) {
        rows_f32x(wp + n * K, K, xf.data(), M, out);
        for (int64_t m = 0; m < M; ++m) store(m * N + n, out[m]);
      }
#else
      rows_f32x_blocked(wp, K, xf.data(), M, n0, n1, [&](int64_t m, int64_t n, float v) { store(m * N + n, v); });
#endif
    });
    return y;
  }
#endif
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    float out[1][kMaxM];
#if defined(__AVX512BF16__)
    if (M == 1) {
      for (int64_t n = n0; n < n1; ++n) store(n, row_bf16_m1(wp + n * K, K, xp));
      return;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {  // the weight row stays in L1 across the groups
        const int64_t mg = std::min<int64_t>(kMaxM, M - m0);
#if defined(__AVX512BF16__)
        rows_bf16_mm(wp + n * K, K, xp + m0 * ldx, ldx, mg, out[0]);
#else
        row_bf16_scalar(wp + n * K, K, xp + m0 * ldx, mg, ldx, out[0]);
#endif
        for (int64_t m = 0; m < mg; ++m) store((m0 + m) * N + n, out[0][m]);
      }
    }
  });
  return y;
}

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 weights times int16 activations with vpdpwssd (pairs of int16 products summed into int32): one
// sign-extension and one dot instruction per 32 weights, against two conversions and a multiply-add per 16
// on the fp32 path (measured 21 -> ~2x GB/s). Each row of x was quantised to int16 with its own scale (see
// gemv_int8); int32 sums are moved to fp32 every kIntBlock weights, so they cannot overflow:
// 256 * 32767 * 127 < 2^31.
constexpr int64_t kIntBlock = 256;

// MM rows of x at once (a compile-time count, so that every accumulator lives in a register); two
// independent chains per row hide the latency of vpdpwssd.
template <int MM>
inline void row_int8_vnni(const int8_t* w, const int16_t* xq, int64_t K, int64_t K32, float* out) {
  __m512 facc[MM];
  for (int m = 0; m < MM; ++m) facc[m] = _mm512_setzero_ps();
  const __mmask32 tail = K % 32 == 0 ? ~__mmask32(0) : (__mmask32(1) << (K % 32)) - 1;
  for (int64_t kb = 0; kb < K; kb += kIntBlock) {
    __m512i ia[MM], ib[MM];
    for (int m = 0; m < MM; ++m) ia[m] = ib[m] = _mm512_setzero_si512();
    const int64_t ke = std::min<int64_t>(K, kb + kIntBlock);
    int64_t k = kb;
    for (; k + 64 <= ke; k += 64) {
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32)));
      for (int m = 0; m < MM; ++m) {
        ia[m] = _mm512_dpwssd_epi32(ia[m], w0, _mm512_loadu_si512(xq + m * K32 + k));
        ib[m] = _mm512_dpwssd_epi32(ib[m], w1, _mm512_loadu_si512(xq + m * K32 + k + 32));
      }
    }
    for (; k < ke; k += 32) {
      const __m256i wb = k + 32 <= K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))
                                     : _mm256_maskz_loadu_epi8(tail, w + k);
      const __m512i ww = _mm512_cvtepi8_epi16(wb);
      for (int m = 0; m < MM; ++m) ia[m] = _mm512_dpwssd_epi32(ia[m], ww, _mm512_loadu_si512(xq + m * K32 + k));
    }
    for (int m = 0; m < MM; ++m)
      facc[m] = _mm512_add_ps(facc[m], _mm512_cvtepi32_ps(_mm512_add_epi32(ia[m], ib[m])));
  }
  for (int m = 0; m < MM; ++m) out[m] = _mm512_reduce_add_ps(facc[m]);
}

inline void rows_int8_vnni(const int8_t* w, const int16_t* xq, int64_t K, int64_t K32, int64_t M, float* out) {
  switch (M) {
    case 1: return row_int8_vnni<1>(w, xq, K, K32, out);
    case 2: return row_int8_vnni<2>(w, xq, K, K32, out);
    case 3: return row_int8_vnni<3>(w, xq, K, K32, out);
    case 4: return row_int8_vnni<4>(w, xq, K, K32, out);
    case 5: return row_int8_vnni<5>(w, xq, K, K32, out);
    case 6: return row_int8_vnni<6>(w, xq, K, K32, out);
    case 7: return row_int8_vnni<7>(w, xq, K, K32, out);
    default: return row_int8_vnni<8>(w, xq, K, K32, out);
  }
}
#elif defined(__AVX2__) && !defined(__AVX512F__)
// The same integer sums with AVX2 (no AVX-512): vpmaddwd (pairs of int16 products into int32) and an add, 16
// weights per step, int32 moved to fp32 every kIntBlock weights (32 products per lane: 32 * 32767 * 127 < 2^31).
constexpr int64_t kIntBlock = 256;

template <int MM>
inline void row_int8_avx2(const int8_t* w, const int16_t* xq, int64_t K, int64_t K32, float* out) {
  __m256 facc[MM];
  for (int m = 0; m < MM; ++m) facc[m] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < K; kb += kIntBlock) {
    __m256i ia[MM];
    for (int m = 0; m < MM; ++m) ia[m] = _mm256_setzero_si256();
    const int64_t ke = std::min<int64_t>(K, kb + kIntBlock);
    int64_t k = kb;
    for (; k + 16 <= ke; k += 16) {
      const __m256i ww = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
      for (int m = 0; m < MM; ++m)
        ia[m] = _mm256_add_epi32(ia[m], _mm256_madd_epi16(ww, _mm256_loadu_si256(
                                                                  reinterpret_cast<const __m256i*>(xq + m * K32 + k))));
    }
    if (k < ke) {  // the row's last < 16 weights (xq is zero-padded to K32, so the padding adds nothing)
      alignas(16) int8_t tail[16] = {0};
      std::memcpy(tail, w + k, static_cast<size_t>(ke - k));
      const __m256i ww = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
      for (int m = 0; m < MM; ++m)
        ia[m] = _mm256_add_epi32(ia[m], _mm256_madd_epi16(ww, _mm256_loadu_si256(
                                                                  reinterpret_cast<const __m256i*>(xq + m * K32 + k))));
    }
    for (int m = 0; m < MM; ++m) facc[m] = _mm256_add_ps(facc[m], _mm256_cvtepi32_ps(ia[m]));
  }
  for (int m = 0; m < MM; ++m) out[m] = hsum8(facc[m]);
}

inline void rows_int8_vnni(const int8_t* w, const int16_t* xq, int64_t K, int64_t K32, int64_t M, float* out) {
  switch (M) {
    case 1: return row_int8_avx2<1>(w, xq, K, K32, out);
    case 2: return row_int8_avx2<2>(w, xq, K, K32, out);
    case 3: return row_int8_avx2<3>(w, xq, K, K32, out);
    case 4: return row_int8_avx2<4>(w, xq, K, K32, out);
    case 5: return row_int8_avx2<5>(w, xq, K, K32, out);
    case 6: return row_int8_avx2<6>(w, xq, K, K32, out);
    case 7: return row_int8_avx2<7>(w, xq, K, K32, out);
    default: return row_int8_avx2<8>(w, xq, K, K32, out);
  }
}
#endif

// The activations of an int8 product, prepared once per call: with VNNI each row of x rounded to int16 (its
// own scale, see gemv_int8); without, x itself. dot() gives the fp32 results of one weight row for rows
// [m0, m0 + mg) of x, scales applied.
class Int8Rows {
 public:
  Int8Rows(const float* x, int64_t M, int64_t K, int64_t ldx) : x_(x), K_(K), ldx_(ldx) {
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && !defined(__AVX512F__))
    K32_ = (K + 31) / 32 * 32;
    xq_.assign(M * K32_, 0);
    xs_.resize(M);
    for (int64_t m = 0; m < M; ++m) {
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[m * ldx + k]));
      const float inv = amax > 0.f ? 32767.0f / amax : 0.f;
      xs_[m] = amax / 32767.0f;
      for (int64_t k = 0; k < K; ++k) xq_[m * K32_ + k] = static_cast<int16_t>(std::nearbyint(x[m * ldx + k] * inv));
    }
#endif
  }
  void dot(const int8_t* w, float scale, int64_t m0, int64_t mg, float* out) const {
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && !defined(__AVX512F__))
    rows_int8_vnni(w, xq_.data() + m0 * K32_, K_, K32_, mg, out);
    for (int64_t m = 0; m < mg; ++m) out[m] = out[m] * (xs_[m0 + m] * scale);
#else
    row_int8(w, scale, x_ + m0 * ldx_, K_, mg, ldx_, out);
#endif
  }

 private:
  const float* x_;
  int64_t K_, ldx_, K32_ = 0;
  std::vector<int16_t> xq_;
  std::vector<float> xs_;
};

}  // namespace

// x: fp32 [M, K], w: int8 [N, K], scale: fp32 [N] -> fp32 [M, N]
//
// With AVX512-VNNI (or AVX2 without AVX-512: vpmaddwd) each row of x is first quantised to int16,
// xq = rint(x * (32767 / max|x|)), and y = (max|x| / 32767) * scale[n] * sum_k xq[k] * w[n, k] exactly in integers: the activation rounding is
// at most 1/65534 of max|x| per element, far below the int8 weight rounding (1/254 of the row's largest).
// `qwen35.ops.quant.int8_gemv_reference` is this computation in torch. Without VNNI: fp32 x times
// widened weights, the dequantised product itself.
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "gemv_int8: x fp32, w int8, scale fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  auto y = torch::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Int8Rows rows(xp, M, K, ldx);
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    float out[kMaxM];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
        const int64_t mg = std::min<int64_t>(kMaxM, M - m0);
        rows.dot(wp + n * K, sp[n], m0, mg, out);
        for (int64_t m = 0; m < mg; ++m) yp[(m0 + m) * N + n] = out[m];
      }
    }
  });
  return y;
}

// The head screen's pass (qwen35/ops/head_screen.py): the int8 logits approx[m, n] as gemv_int8 computes
// them, an interval approx +- bound with bound = coef_r[n] * x_norm[m] + coef_x[n] * e_x[m] + slack, and the rows n
// whose upper end reaches the largest lower end of some batch row m: every row that can hold that row's
// maximum. Returns them sorted (int64). One pass over the int8 head for up to kMaxScreen batch rows (in
// register groups of kMaxM, the weight row staying in L1 across them): each thread keeps the rows that reach
// its own running maximum (a superset, as that maximum only grows), filtered by the global one at the end.
torch::Tensor head_screen_candidates(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor coef_r,
                                     torch::Tensor coef_x, torch::Tensor x_norm, torch::Tensor e_x, double slack) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "head_screen_candidates: x fp32, w int8, scale fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  TORCH_CHECK(M <= kMaxScreen, "head_screen_candidates: at most ", kMaxScreen, " rows");
  for (const auto* t : {&scale, &coef_r, &coef_x})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                "head_screen_candidates: per-row fp32 vectors of ", N);
  for (const auto* t : {&x_norm, &e_x})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == M,
                "head_screen_candidates: per-input fp32 vectors of ", M);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float *sp = scale.data_ptr<float>(), *cr = coef_r.data_ptr<float>(), *cx = coef_x.data_ptr<float>();
  const float *xn = x_norm.data_ptr<float>(), *ex = e_x.data_ptr<float>();
  const Int8Rows rows(x.data_ptr<float>(), M, K, ldx);
  const float abs_slack = static_cast<float>(slack);
  struct Hit {
    int64_t n;
    float hi[kMaxScreen];
  };
  const int nt = at::get_num_threads();
  std::vector<std::vector<Hit>> hits(nt);
  std::vector<float> lo_max(static_cast<size_t>(nt) * kMaxScreen, -INFINITY);
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    const int tid = at::get_thread_num();
    float best[kMaxScreen];  // local: the threads' slots of lo_max share a cache line
    for (int64_t m = 0; m < M; ++m) best[m] = lo_max[tid * kMaxScreen + m];
    auto& mine = hits[tid];
    float out[kMaxScreen];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM) rows.dot(wp + n * K, sp[n], m0, std::min<int64_t>(kMaxM, M - m0),
                                                          out + m0);
      Hit h;
      bool keep = false;
      for (int64_t m = 0; m < M; ++m) {
        const float bound = cr[n] * xn[m] + cx[n] * ex[m] + abs_slack;
        best[m] = std::max(best[m], out[m] - bound);
        h.hi[m] = out[m] + bound;
        keep |= h.hi[m] >= best[m];
      }
      if (keep) {
        h.n = n;
        mine.push_back(h);
      }
    }
    for (int64_t m = 0; m < M; ++m) lo_max[tid * kMaxScreen + m] = best[m];
  });
  float L[kMaxScreen];
  for (int64_t m = 0; m < M; ++m) {
    L[m] = -INFINITY;
    for (int t = 0; t < nt; ++t) L[m] = std::max(L[m], lo_max[t * kMaxScreen + m]);
  }
  std::vector<int64_t> found;
  for (const auto& mine : hits)
    for (const Hit& h : mine)
      for (int64_t m = 0; m < M; ++m)
        if (h.hi[m] >= L[m]) {
          found.push_back(h.n);
          break;
        }
  std::sort(found.begin(), found.end());
  auto res = torch::empty({static_cast<int64_t>(found.size())}, x.options().dtype(at::kLong));
  std::copy(found.begin(), found.end(), res.data_ptr<int64_t>());
  return res;
}

// The head screen for samplers that need each batch row's k best logits (top_k): with lo = approx - bound and
// hi = approx + bound as in head_screen_candidates, L[m] = the k[m]-th largest lo of row m over the tokens it does not
// exclude, and the rows n whose hi reaches L[m] for some m (excluded tokens neither set L nor count: the caller
// computes them itself where it needs them). One pass over the int8 head: each thread keeps the k[m] largest lo it
// has seen (a min-heap per row) and the rows whose hi reaches its own running k-th (a superset, as it only grows);
// at the end the threads' heaps give L and the kept rows are filtered by it. Returns (rows int64 [C] ascending,
// their hi fp32 [C, M] (-inf where excluded), L fp32 [M]; -inf where a row has fewer than k tokens).
std::vector<torch::Tensor> head_screen_topk(torch::Tensor x, torch::Tensor w, torch::Tensor scale,
                                            torch::Tensor coef_r, torch::Tensor coef_x, torch::Tensor x_norm,
                                            torch::Tensor e_x, double slack, torch::Tensor ks,
                                            c10::optional<torch::Tensor> excluded) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "head_screen_topk: x fp32, w int8, scale fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  TORCH_CHECK(M <= kMaxScreen, "head_screen_topk: at most ", kMaxScreen, " rows");
  for (const auto* t : {&scale, &coef_r, &coef_x})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                "head_screen_topk: per-row fp32 vectors of ", N);
  for (const auto* t : {&x_norm, &e_x})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == M,
                "head_screen_topk: per-input fp32 vectors of ", M);
  TORCH_CHECK(ks.scalar_type() == at::kLong && ks.is_contiguous() && ks.numel() == M, "head_screen_topk: ks int64 [M]");
  const uint8_t* ex = nullptr;
  if (excluded.has_value()) {
    TORCH_CHECK(excluded->scalar_type() == at::kBool && excluded->is_contiguous() && excluded->dim() == 2 &&
                    excluded->size(0) == M && excluded->size(1) == N,
                "head_screen_topk: excluded must be a contiguous bool [M, N]");
    ex = reinterpret_cast<const uint8_t*>(excluded->data_ptr<bool>());
  }
  const int64_t* kp = ks.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(kp[m] >= 1, "head_screen_topk: k must be >= 1");
  const int8_t* wp = w.data_ptr<int8_t>();
  const float *sp = scale.data_ptr<float>(), *cr = coef_r.data_ptr<float>(), *cx = coef_x.data_ptr<float>();
  const float *xn = x_norm.data_ptr<float>(), *exn = e_x.data_ptr<float>();
  const Int8Rows rows(x.data_ptr<float>(), M, K, ldx);
  const float abs_slack = static_cast<float>(slack);
  struct Hit {
    int64_t n;
    float hi[kMaxScreen];
  };
  const int nt = at::get_num_threads();
  std::vector<std::vector<Hit>> hits(nt);
  std::vector<std::vector<std::vector<float>>> heaps(nt, std::vector<std::vector<float>>(M));
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    const int tid = at::get_thread_num();
    auto& heap = heaps[tid];
    float kth[kMaxScreen];  // this thread's running k-th largest lo per row (-inf until it has k)
    for (int64_t m = 0; m < M; ++m)
      kth[m] = static_cast<int64_t>(heap[m].size()) < kp[m] ? -INFINITY : heap[m].front();
    auto& mine = hits[tid];
    float out[kMaxScreen];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM) rows.dot(wp + n * K, sp[n], m0, std::min<int64_t>(kMaxM, M - m0),
                                                          out + m0);
      Hit h;
      bool keep = false;
      for (int64_t m = 0; m < M; ++m) {
        if (ex != nullptr && ex[m * N + n]) {
          h.hi[m] = -INFINITY;
          continue;
        }
        const float bound = cr[n] * xn[m] + cx[n] * exn[m] + abs_slack;
        const float lo = out[m] - bound;
        if (lo > kth[m] || static_cast<int64_t>(heap[m].size()) < kp[m]) {
          auto& hp = heap[m];
          if (static_cast<int64_t>(hp.size()) == kp[m]) {
            std::pop_heap(hp.begin(), hp.end(), std::greater<float>());
            hp.back() = lo;
          } else {
            hp.push_back(lo);
          }
          std::push_heap(hp.begin(), hp.end(), std::greater<float>());
          kth[m] = static_cast<int64_t>(hp.size()) < kp[m] ? -INFINITY : hp.front();
        }
        h.hi[m] = out[m] + bound;
        keep |= h.hi[m] >= kth[m];
      }
      if (keep) {
        h.n = n;
        mine.push_back(h);
      }
    }
  });
  auto L = torch::empty({M}, x.options());
  float* Lp = L.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    std::vector<float> all;
    for (int t = 0; t < nt; ++t) all.insert(all.end(), heaps[t][m].begin(), heaps[t][m].end());
    if (static_cast<int64_t>(all.size()) < kp[m]) {
      Lp[m] = -INFINITY;
      continue;
    }
    std::nth_element(all.begin(), all.begin() + (kp[m] - 1), all.end(), std::greater<float>());
    Lp[m] = all[kp[m] - 1];
  }
  std::vector<const Hit*> found;
  for (const auto& mine : hits)
    for (const Hit& h : mine)
      for (int64_t m = 0; m < M; ++m)
        if (h.hi[m] >= Lp[m] && h.hi[m] > -INFINITY) {
          found.push_back(&h);
          break;
        }
  std::sort(found.begin(), found.end(), [](const Hit* a, const Hit* b) { return a->n < b->n; });
  const int64_t C = static_cast<int64_t>(found.size());
  auto ids = torch::empty({C}, x.options().dtype(at::kLong));
  auto his = torch::empty({C, M}, x.options());
  int64_t* ip = ids.data_ptr<int64_t>();
  float* hp = his.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    ip[c] = found[c]->n;
    for (int64_t m = 0; m < M; ++m) hp[c * M + m] = found[c]->hi[m];
  }
  return {ids, his, L};
}

bool int8_uses_int16_activations() {
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && !defined(__AVX512F__))
  return true;
#else
  return false;
#endif
}

// Subnormal floats make x86 arithmetic ~100x slower, and the GDN state, multiplied by its decay every token,
// drifts into them. torch.set_flush_denormal only sets the calling thread; this sets flush-to-zero and
// denormals-are-zero on every thread of the OpenMP pool that torch's intra-op parallelism uses.
int64_t flush_denormals_all_threads() {
  int64_t n = 0;
#pragma omp parallel reduction(+ : n)
  {
    _mm_setcsr(_mm_getcsr() | 0x8040);
    n += 1;
  }
  return n;
}

// A full memory fence: stores before it (memcpy's non-temporal ones included, which x86 does not keep in order)
// are visible to other processes before any store after it (parallel/shm.py posts its counter after it).
void memory_fence() { _mm_mfence(); }

std::string isa() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

// The kernel gemv_bf16 runs here: "amx" or the instruction set of its vector kernels (isa()).
std::string gemv_bf16_kernel() { return qwen35_amx::available() ? "amx" : isa(); }

torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale);

torch::Tensor gdn_decode_step(torch::Tensor mixed, torch::Tensor conv_w, torch::Tensor conv_pool,
                              torch::Tensor state_pool, torch::Tensor slots, torch::Tensor fresh, torch::Tensor a,
                              torch::Tensor b, torch::Tensor A_log, torch::Tensor dt_bias, int64_t num_k_heads,
                              int64_t head_k_dim, c10::optional<torch::Tensor> src_slots);

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor causal_conv1d_silu(torch::Tensor x, torch::Tensor weight, torch::Tensor window);
torch::Tensor rms_norm_gated(torch::Tensor x, torch::Tensor gate, torch::Tensor w, double eps);
torch::Tensor moe_experts_bf16(torch::Tensor x, torch::Tensor gate_up, torch::Tensor down, torch::Tensor ids,
                               torch::Tensor weights);
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale);
bool prefill_attention_supported();
void gdn_chunked_prefill(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g, torch::Tensor beta,
                         torch::Tensor state, torch::Tensor out, int64_t chunk_size, double l2norm_eps,
                         double q_scale);
torch::Tensor gemv_fp8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor srow, bool out_bf16);
torch::Tensor fp8_dequant_bf16(torch::Tensor q, torch::Tensor scale, torch::Tensor srow, int64_t r0, int64_t r1);
torch::Tensor linear_fp8_prefill(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor srow);
torch::Tensor moe_experts_fp8(torch::Tensor x, torch::Tensor gu_q, torch::Tensor gu_scale, torch::Tensor gu_srow,
                              torch::Tensor dn_q, torch::Tensor dn_scale, torch::Tensor dn_srow, torch::Tensor ids,
                              torch::Tensor weights);
torch::Tensor gguf_dequant(torch::Tensor q, int64_t type, int64_t K, int64_t r0, int64_t r1, bool to_bf16);
torch::Tensor gguf_dequant_rows(torch::Tensor q, int64_t type, int64_t K, torch::Tensor ids, bool to_bf16);
torch::Tensor gemv_gguf(torch::Tensor x, torch::Tensor q, int64_t type);
torch::Tensor linear_gguf_prefill(torch::Tensor x, torch::Tensor q, int64_t type);
torch::Tensor moe_experts_gguf(torch::Tensor x, torch::Tensor gu_q, int64_t gu_type, torch::Tensor dn_q,
                               int64_t dn_type, int64_t I, torch::Tensor ids, torch::Tensor weights);
torch::Tensor moe_experts_gguf_grouped(torch::Tensor x, torch::Tensor gu_q, int64_t gu_type, torch::Tensor dn_q,
                                       int64_t dn_type, int64_t I, torch::Tensor ids, torch::Tensor weights);
bool gguf_prefill_bf16();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "bf16 matrix-vector product for a few rows", py::arg("x"), py::arg("w"),
        py::arg("out_bf16") = false);
  m.def("gemv_int8", &gemv_int8, "int8 (per-row scale) matrix-vector product for a few rows");
  m.def("head_screen_candidates", &head_screen_candidates, "rows of an int8 head whose bounds reach the maximum");
  m.def("head_screen_topk", &head_screen_topk, "rows of an int8 head whose bounds reach each row's k-th largest",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("coef_r"), py::arg("coef_x"), py::arg("x_norm"),
        py::arg("e_x"), py::arg("slack"), py::arg("ks"), py::arg("excluded") = py::none());
  m.def("int8_uses_int16_activations", &int8_uses_int16_activations, "gemv_int8 rounds x to int16 per row");
  m.def("paged_attention_decode", &paged_attention_decode, "one-query attention over a paged KV pool");
  m.def("flush_denormals_all_threads", &flush_denormals_all_threads, "FTZ+DAZ on every OpenMP thread");
  m.def("memory_fence", &memory_fence, "mfence: earlier stores visible before later ones");
  m.def("gdn_decode_step", &gdn_decode_step, "fused Gated DeltaNet decode step, in place on the pools",
        py::arg("mixed"), py::arg("conv_w"), py::arg("conv_pool"), py::arg("state_pool"), py::arg("slots"),
        py::arg("fresh"), py::arg("a"), py::arg("b"), py::arg("A_log"), py::arg("dt_bias"), py::arg("num_k_heads"),
        py::arg("head_k_dim"), py::arg("src_slots") = py::none());
  m.def("rms_norm", &rms_norm, "zero-centred RMSNorm, one pass per row");
  m.def("rms_norm_gated", &rms_norm_gated, "the GDN output norm: w * rmsnorm(x) * silu(gate)");
  m.def("causal_conv1d_silu", &causal_conv1d_silu, "prefill causal depthwise conv + SiLU, one sequence");
  m.def("gdn_chunked_prefill", &gdn_chunked_prefill, "chunked gated delta rule over a prompt, state in place");
  m.def("moe_experts_bf16", &moe_experts_bf16, "routed experts of a MoE block for a few tokens (decode)");
  m.def("prefill_attention", &prefill_attention, "causal GQA attention of a prompt chunk, bf16 (flash style)");
  m.def("prefill_attention_supported", &prefill_attention_supported, "prefill_attention was built (AVX512-BF16)");
  m.def("isa", &isa, "instruction set the kernels were compiled for");
  m.def("gemv_bf16_kernel", &gemv_bf16_kernel, "the kernel gemv_bf16 runs on this host: amx or isa()");
  m.def("gemv_fp8", &gemv_fp8, "block-FP8 (e4m3, 128x128 scales) matrix-vector product for a few rows",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("srow"), py::arg("out_bf16") = false);
  m.def("fp8_dequant_bf16", &fp8_dequant_bf16, "rows [r0, r1) of a block-FP8 weight widened to bf16",
        py::arg("q"), py::arg("scale"), py::arg("srow"), py::arg("r0"), py::arg("r1"));
  m.def("linear_fp8_prefill", &linear_fp8_prefill, "x @ W.T for a block-FP8 W, widened tile by tile (prefill)",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("srow"));
  m.def("moe_experts_fp8", &moe_experts_fp8, "routed experts of a MoE block with block-FP8 weights (decode)");
  m.def("gguf_dequant", &gguf_dequant, "rows [r0, r1) of a GGUF weight widened (fp32, or bf16)", py::arg("q"),
        py::arg("type"), py::arg("K"), py::arg("r0"), py::arg("r1"), py::arg("to_bf16"));
  m.def("gguf_dequant_rows", &gguf_dequant_rows, "rows ids of a GGUF weight widened (an embedding lookup)",
        py::arg("q"), py::arg("type"), py::arg("K"), py::arg("ids"), py::arg("to_bf16"));
  m.def("gemv_gguf", &gemv_gguf, "x @ W.T for a GGUF W and a few rows of x (decode)", py::arg("x"), py::arg("q"),
        py::arg("type"));
  m.def("linear_gguf_prefill", &linear_gguf_prefill, "x @ W.T for a GGUF W, widened tile by tile (prefill)",
        py::arg("x"), py::arg("q"), py::arg("type"));
  m.def("moe_experts_gguf", &moe_experts_gguf, "routed experts of a MoE block with GGUF weights (decode)",
        py::arg("x"), py::arg("gu_q"), py::arg("gu_type"), py::arg("dn_q"), py::arg("dn_type"), py::arg("I"),
        py::arg("ids"), py::arg("weights"));
  m.def("moe_experts_gguf_grouped", &moe_experts_gguf_grouped,
        "routed experts of a MoE block with GGUF weights, tokens grouped by expert (prefill)", py::arg("x"),
        py::arg("gu_q"), py::arg("gu_type"), py::arg("dn_q"), py::arg("dn_type"), py::arg("I"), py::arg("ids"),
        py::arg("weights"));
  m.def("gguf_prefill_bf16", &gguf_prefill_bf16, "linear_gguf_prefill widens to bf16 (else to fp32)");
}

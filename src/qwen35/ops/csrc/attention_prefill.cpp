// Causal GQA attention of a prompt chunk (prefill), bf16 in and out, flash-attention style on AVX512-BF16.
//
// n queries at positions [ctx, ctx + n) attend over L = ctx + n keys (key j is visible to query i when
// j <= ctx + i). Keys and values are first packed per KV head into blocks of kBk positions in the layout
// vdpbf16ps wants (pairs of adjacent bf16 in one 32-bit lane): K as [D/2][kBk] pairs of the head dimension,
// V as [kBk/2][D] pairs of positions. A task is (query head, block of kBq queries); it walks the key blocks
// up to the diagonal with an online softmax:
//     S = scale * Q K^T (bf16 products, exact in fp32, fp32 sums);  m, l, O updated per row;
//     P = exp(S - m) rounded to bf16 (as torch's CPU flash attention does for bf16) ;  O = alpha O + P V.
// Tasks are taken largest first from a shared counter (the causal triangle makes them unequal).
// The twin is torch's scaled_dot_product_attention (`attend` in model/attention.py); tests hold them together.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include <omp.h>
#include "simd.h"

namespace {

constexpr int64_t kBq = 64;  // queries per task
constexpr int64_t kBk = 64;  // keys per block

#if defined(__AVX512BF16__)
using namespace qwen35_simd;

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// s[r][0..64) = sum_p q_r[2p..2p+1] . kp[p][0..64) for 4 query rows (rows past `rows` repeat the last).
inline void scores_tile(const uint16_t* const* qrow, int64_t D, const uint32_t* kp, float* s) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    const uint32_t* kr = kp + p * kBk;
    __m512bh b[4];
    for (int j = 0; j < 4; ++j) b[j] = (__m512bh)_mm512_loadu_si512(kr + 16 * j);
    for (int r = 0; r < 4; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair_at(qrow[r] + 2 * p)));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(s + r * kBk + 16 * j, acc[r][j]);
}

// o[r][d0..d0+64) = alpha_r o[r][..] + sum_k' p_r[2k'..2k'+1] . vp[k'][d0..d0+64) for 4 rows.
inline void values_tile(const uint16_t* p, const uint32_t* vp, int64_t D, int64_t d0, const float* alpha, float* o) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_mul_ps(al, _mm512_loadu_ps(o + r * D + d0 + 16 * j));
  }
  for (int64_t kk = 0; kk < kBk / 2; ++kk) {
    const uint32_t* vr = vp + kk * D + d0;
    __m512bh b[4];
    for (int j = 0; j < 4; ++j) b[j] = (__m512bh)_mm512_loadu_si512(vr + 16 * j);
    for (int r = 0; r < 4; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair_at(p + r * kBk + 2 * kk)));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(o + r * D + d0 + 16 * j, acc[r][j]);
}

inline uint16_t to_bf16_bits(float v) { return c10::BFloat16(v).x; }
#endif

}  // namespace

// q [n, Hq, D], k and v [L, Hkv, D], all bf16 with a contiguous head dim; L >= n; query i sits at position
// L - n + i. -> [n, Hq, D] bf16. Needs AVX512-BF16 and D % 64 == 0 (`prefill_attention_supported()`).
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "prefill_attention: q [n, Hq, D], k/v [L, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "prefill_attention: bf16 inputs");
  const int64_t n = q.size(0), Hq = q.size(1), D = q.size(2), L = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(k.size(2) == D && Hq % Hkv == 0 && L >= n, "prefill_attention: head dims, head counts or lengths");
  TORCH_CHECK(D % 64 == 0, "prefill_attention: head dim must be a multiple of 64");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: contiguous head dim");
#if !defined(__AVX512BF16__)
  TORCH_CHECK(false, "prefill_attention: needs AVX512-BF16");
  return q;
#else
  const int64_t G = Hq / Hkv, ctx = L - n, nkb = (L + kBk - 1) / kBk, nqb = (n + kBq - 1) / kBq;
  const float sc = static_cast<float>(scale);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0),
                vs1 = v.stride(1);
  // packed K: [Hkv][nkb][D/2][kBk] pairs; packed V: [Hkv][nkb][kBk/2][D] pairs; zeros past L
  const int64_t blk = (D / 2) * kBk;
  std::vector<uint32_t> KP(static_cast<size_t>(Hkv * nkb * blk)), VP(static_cast<size_t>(Hkv * nkb * blk));
  at::parallel_for(0, Hkv * nkb, 1, [&](int64_t a, int64_t b) {
    for (int64_t hb = a; hb < b; ++hb) {
      const int64_t h = hb / nkb, j0 = (hb % nkb) * kBk;
      uint32_t* kd = KP.data() + hb * blk;
      uint32_t* vd = VP.data() + hb * blk;
      for (int64_t jj = 0; jj < kBk; ++jj) {
        const int64_t j = j0 + jj;
        const uint16_t* kr = kp + j * ks0 + h * ks1;
        for (int64_t p = 0; p < D / 2; ++p) kd[p * kBk + jj] = j < L ? pair_at(kr + 2 * p) : 0u;
      }
      for (int64_t kk = 0; kk < kBk / 2; ++kk) {
        const int64_t j = j0 + 2 * kk;
        const uint16_t* r0 = vp + j * vs0 + h * vs1;
        const uint16_t* r1 = r0 + vs0;
        for (int64_t d = 0; d < D; ++d) {
          const uint32_t lo = j < L ? r0[d] : 0u, hi = j + 1 < L ? r1[d] : 0u;
          vd[kk * D + d] = lo | (hi << 16);
        }
      }
    }
  });

  auto out = torch::empty({n, Hq, D}, q.options().dtype(at::kBFloat16));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // tasks largest first: later query blocks see more keys
  std::vector<int64_t> order(static_cast<size_t>(Hq * nqb));
  for (int64_t t = 0; t < Hq * nqb; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return a % nqb > b % nqb; });
  std::atomic<int64_t> next{0};
  const int64_t ntasks = Hq * nqb;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), ntasks));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> S(kBq * kBk), O(kBq * D), m(kBq), l(kBq), alpha(kBq);
    std::vector<uint16_t> P(kBq * kBk);
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t hq = order[t] / nqb, qb = order[t] % nqb, h = hq / G;
      const int64_t i0 = qb * kBq, rows = std::min(kBq, n - i0);
      const int64_t last_key = ctx + i0 + rows - 1;  // the last query's position
      const int64_t kb_end = last_key / kBk + 1;
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t kb = 0; kb < kb_end; ++kb) {
        const uint32_t* kblk = KP.data() + (h * nkb + kb) * blk;
        const uint32_t* vblk = VP.data() + (h * nkb + kb) * blk;
        const int64_t j0 = kb * kBk;
        for (int64_t r0 = 0; r0 < kBq; r0 += 4) {
          const uint16_t* qrow[4];
          for (int r = 0; r < 4; ++r) qrow[r] = qp + std::min(i0 + r0 + r, n - 1) * qs0 + hq * qs1;
          scores_tile(qrow, D, kblk, S.data() + r0 * kBk);
        }
        // scale, mask, online softmax; P in bf16
        for (int64_t r = 0; r < kBq; ++r) {
          float* s = S.data() + r * kBk;
          const int64_t qpos = ctx + i0 + std::min(r, rows - 1);
          const int64_t visible = std::clamp<int64_t>(qpos - j0 + 1, 0, kBk);  // keys j0 .. qpos
          float mx = -INFINITY;
          for (int64_t c = 0; c < visible; ++c) {
            s[c] *= sc;
            mx = std::max(mx, s[c]);
          }
          const float m_new = std::max(m[r], mx);
          uint16_t* pr = P.data() + r * kBk;
          if (m_new == -INFINITY) {  // nothing visible yet (cannot happen from block 0 on; kept safe)
            std::fill(pr, pr + kBk, uint16_t{0});
            alpha[r] = 1.f;
            continue;
          }
          alpha[r] = m[r] == -INFINITY ? 0.f : std::exp(m[r] - m_new);
          float sum = 0.f;
          int64_t c = 0;
          const __m512 mv = _mm512_set1_ps(m_new);
          __m512 acc = _mm512_setzero_ps();
          for (; c + 16 <= visible; c += 16) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + c), mv));
            acc = _mm512_add_ps(acc, e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c), (__m256i)_mm512_cvtneps_pbh(e));
          }
          sum = _mm512_reduce_add_ps(acc);
          for (; c < visible; ++c) {
            const float e = std::exp(s[c] - m_new);
            sum += e;
            pr[c] = to_bf16_bits(e);
          }
          for (; c < kBk; ++c) pr[c] = 0;
          l[r] = l[r] * alpha[r] + sum;
          m[r] = m_new;
        }
        for (int64_t r0 = 0; r0 < kBq; r0 += 4)
          for (int64_t d0 = 0; d0 < D; d0 += 64)
            values_tile(P.data() + r0 * kBk, vblk, D, d0, alpha.data() + r0, O.data() + r0 * D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / l[r];
        uint16_t* dst = op + ((i0 + r) * Hq + hq) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = to_bf16_bits(O[r * D + d] * inv);
      }
    }
  }
  return out;
#endif
}

bool prefill_attention_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

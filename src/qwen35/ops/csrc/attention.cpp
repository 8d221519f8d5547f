// Decode attention straight from the paged KV pool: one new query per sequence attends over its cached
// keys by walking its block table, so no key or value is ever copied.
//
// Work is split like flash-decoding: every (sequence, KV head) context is cut into partitions (partition_len)
// positions, each a task; a task computes, for all G query heads sharing that KV head (GQA), an online
// softmax over its keys (running max, running sum, unnormalised value sum), and the partitions are merged
// exactly at the end (log-sum-exp). A task walks its positions once, kChunk at a time:
//   * keys are read once for all G heads; with AVX512-BF16 and a bf16 query (a bf16 model) the dot products
//     use vdpbf16ps (bf16 products are exact in fp32, accumulation is fp32), otherwise bf16 is widened;
//   * values are accumulated in fp32, a strip of the head dimension at a time with the strip's accumulators
//     in registers;
//   * the key and value rows kAhead positions on are prefetched into L2 all along, so DRAM streams while
//     the chunk computes (a two-pass softmax measured 1.5x slower: its value pass did not overlap memory).
//     On the bf16 path the prefetches are spread evenly: one line of the row kSpreadAhead positions on per
//     line read, keys while scoring and values while accumulating, running on into the next partition.
//     Bursts of whole rows left the memory idle between phases. 0.8B shape at 32K, paired in one process:
//     2.6 ms per layer against 3.0-3.3 before, where a plain read of the same bytes took 2.2-2.3 and a
//     synthetic loop of the same prefetches, loads and vdpbf16ps count 2.4-2.45. Fewer prefetches (every
//     other line, or none for values) were 1.3-1.7x slower: this host's hardware prefetchers do not cover it.
// The torch twin is `attend` in model/attention.py; tests/test_ops_linear.py holds them together.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace qwen35_simd;

// Positions per task (the unit of parallel work): a sixteenth of the context, within [512, 2048] and a whole number
// of chunks. Long partitions have fewer task starts, where the prefetches restart (at 32K, paired in one process:
// 2048 was ~5% faster than 512); sixteen per (sequence, KV head) still feed many threads. It depends on the length
// only, so results do not change with the thread count.
inline int64_t partition_len(int64_t len) {
  const int64_t p = std::clamp<int64_t>(len / 16, 512, 2048);
  return (p + 15) / 16 * 16;
}
constexpr int64_t kChunk = 16;   // positions scored, exponentiated and accumulated together
constexpr int64_t kAhead = 16;   // rows prefetched ahead (measured: 8 rows into L1 was 1.6x slower)
constexpr int64_t kSpreadAhead = 64;  // the same, for the spread prefetches of the bf16 path (16-96 measured)

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

template <typename KV>
inline void prefetch_row(const KV* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(KV)); off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

// ---- scores: s[g * P + i] = scale * q_g . k_i for the n rows of a chunk ----------------------------------
// Each prefetches the key and value rows kAhead positions on (of the nvalid rows from `off` on): spread
// out like this they measured faster than a burst per chunk.

// Generic: fp32 query, keys widened to fp32. G accumulators in registers when G is a compile-time constant.
template <int G, typename KV>
void scores_f32(const float* q, const KV* pool, const KV* vpool, const int64_t* off, int64_t n, int64_t nvalid,
                int64_t D, float scale, float* s, int64_t P) {
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < nvalid) {
      prefetch_row(pool + off[i + kAhead], D);
      prefetch_row(vpool + off[i + kAhead], D);
    }
    const KV* k = pool + off[i];
    int64_t d0 = 0;
    float r[G];
#if defined(__AVX512F__)
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (; d0 + 16 <= D; d0 += 16) {
      const __m512 kv = load16(k + d0);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d0), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) r[g] = _mm512_reduce_add_ps(acc[g]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (; d0 + 8 <= D; d0 += 8) {
      const __m256 kv = load8(k + d0);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d0), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) r[g] = hsum8(acc[g]);
#else
    for (int g = 0; g < G; ++g) r[g] = 0.f;
#endif
    for (int g = 0; g < G; ++g) {
      for (int64_t d = d0; d < D; ++d) r[g] += q[g * D + d] * to_float(k[d]);
      s[g * P + i] = r[g] * scale;
    }
  }
}

#if defined(__AVX512F__)
// out[i] = the sum of the 16 lanes of v[i], i < 8: the eight horizontal sums folded together (25 shuffles and
// adds instead of ~8 each): halve the lanes of two vectors at a time until each sum sits in one lane.
inline void reduce8(const __m512* v, float scale, float* out) {
  __m512 w[4];  // v[2i] in the low 256 bits, v[2i+1] in the high: 8 partial sums each
  for (int i = 0; i < 4; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  // 128-bit chunk c of u0 / u1: 4 partial sums of v[c] / v[4 + c]
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
  // chunk c: lanes 0-1 partial sums of v[c], lanes 2-3 of v[4 + c]
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, 0x44), _mm512_shuffle_ps(u0, u1, 0xEE));
  const __m512 r = _mm512_add_ps(z, _mm512_shuffle_ps(z, z, 0xB1));  // lane 4c: v[c], lane 4c + 2: v[4 + c]
  const __m512 g = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), r);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm512_castps512_ps256(g), _mm256_set1_ps(scale)));
}
#endif

#if defined(__AVX512BF16__)
// bf16 query and keys, D % 32 == 0: two positions at a time so that 2G independent chains hide the latency.
// Prefetches one line of the key row kSpreadAhead positions on per line read, and of the value row too unless
// `values_later` (the value pass prefetches its own rows then); rows past the task's end are clamped to its last.
template <int G>
void scores_dpbf16(const uint16_t* q, const at::BFloat16* pool, const at::BFloat16* vpool, const int64_t* off,
                   int64_t n, int64_t nvalid, int64_t D, float scale, float* s, int64_t P, bool values_later) {
  constexpr int NP = G <= 8 ? 2 : 1;
  int64_t i = 0;
  for (; i + NP <= n; i += NP) {
    const char* fk[NP];
    const char* fv[NP];
    for (int p = 0; p < NP; ++p) {
      const int64_t ahead = off[std::min<int64_t>(i + p + kSpreadAhead, nvalid - 1)];
      fk[p] = reinterpret_cast<const char*>(pool + ahead);
      fv[p] = reinterpret_cast<const char*>(vpool + ahead);
    }
    __m512 acc[NP][G];
    for (int p = 0; p < NP; ++p)
      for (int g = 0; g < G; ++g) acc[p][g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      __m512bh kv[NP];
      for (int p = 0; p < NP; ++p) {
        kv[p] = (__m512bh)_mm512_loadu_si512(pool + off[i + p] + d);
        _mm_prefetch(fk[p] + 2 * d, _MM_HINT_T1);
        if (!values_later) _mm_prefetch(fv[p] + 2 * d, _MM_HINT_T1);
      }
      for (int g = 0; g < G; ++g) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + g * D + d);
        for (int p = 0; p < NP; ++p) acc[p][g] = _mm512_dpbf16_ps(acc[p][g], qv, kv[p]);
      }
    }
    if constexpr ((NP * G) % 8 == 0) {
      float sums[NP * G];  // [p][g]
      for (int j = 0; j < NP * G; j += 8) reduce8(&acc[0][0] + j, scale, sums + j);
      for (int p = 0; p < NP; ++p)
        for (int g = 0; g < G; ++g) s[g * P + i + p] = sums[p * G + g];
    } else {
      for (int p = 0; p < NP; ++p)
        for (int g = 0; g < G; ++g) s[g * P + i + p] = _mm512_reduce_add_ps(acc[p][g]) * scale;
    }
  }
  for (; i < n; ++i) {
    const int64_t ahead = off[std::min<int64_t>(i + kSpreadAhead, nvalid - 1)];
    prefetch_row(pool + ahead, D);
    if (!values_later) prefetch_row(vpool + ahead, D);
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(pool + off[i] + d);
      for (int g = 0; g < G; ++g)
        acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_loadu_si512(q + g * D + d), kv);
    }
    for (int g = 0; g < G; ++g) s[g * P + i] = _mm512_reduce_add_ps(acc[g]) * scale;
  }
}
#endif

// ---- values: o[g * D + d] += sum_i p[g * P + i] * v_i[d] -----------------------------------------------

template <int G, typename KV>
void values_acc(const float* p, int64_t P, const KV* pool, const int64_t* off, int64_t n, int64_t D, float* o) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  // NV vectors of 16 per strip: G * NV accumulators + NV value vectors + a broadcast within 32 registers
  constexpr int NV = G <= 4 ? 4 : (G <= 8 ? 2 : 1);
  for (; d0 + 16 * NV <= D; d0 += 16 * NV) {
    __m512 acc[G][NV];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_loadu_ps(o + g * D + d0 + 16 * j);
    for (int64_t i = 0; i < n; ++i) {
      const KV* v = pool + off[i] + d0;
      __m512 vv[NV];
      for (int j = 0; j < NV; ++j) vv[j] = load16(v + 16 * j);
      for (int g = 0; g < G; ++g) {
        const __m512 pg = _mm512_set1_ps(p[g * P + i]);
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(pg, vv[j], acc[g][j]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + g * D + d0 + 16 * j, acc[g][j]);
  }
  for (; d0 + 16 <= D; d0 += 16) {
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_loadu_ps(o + g * D + d0);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 vv = load16(pool + off[i] + d0);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * P + i]), vv, acc[g]);
    }
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(o + g * D + d0, acc[g]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  // the same with 8 lanes: G * NV accumulators + NV value vectors + a broadcast within 16 registers
  constexpr int NV = G <= 2 ? 4 : (G <= 4 ? 2 : 1);
  for (; d0 + 8 * NV <= D; d0 += 8 * NV) {
    __m256 acc[G][NV];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_loadu_ps(o + g * D + d0 + 8 * j);
    for (int64_t i = 0; i < n; ++i) {
      const KV* v = pool + off[i] + d0;
      __m256 vv[NV];
      for (int j = 0; j < NV; ++j) vv[j] = load8(v + 8 * j);
      for (int g = 0; g < G; ++g) {
        const __m256 pg = _mm256_set1_ps(p[g * P + i]);
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_fmadd_ps(pg, vv[j], acc[g][j]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < NV; ++j) _mm256_storeu_ps(o + g * D + d0 + 8 * j, acc[g][j]);
  }
  for (; d0 + 8 <= D; d0 += 8) {
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_loadu_ps(o + g * D + d0);
    for (int64_t i = 0; i < n; ++i) {
      const __m256 vv = load8(pool + off[i] + d0);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[g * P + i]), vv, acc[g]);
    }
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(o + g * D + d0, acc[g]);
  }
#endif
  for (int64_t d = d0; d < D; ++d)
    for (int g = 0; g < G; ++g) {
      float a = o[g * D + d];
      for (int64_t i = 0; i < n; ++i) a += p[g * P + i] * to_float(pool[off[i] + d]);
      o[g * D + d] = a;
    }
}

#if defined(__AVX512BF16__)
// P.V with vdpbf16ps, two positions per instruction, for bf16 values: P is rounded to bf16 first (as torch's
// CPU flash attention does for bf16 inputs; the softmax sum stays fp32). The value rows of positions 2k and
// 2k + 1 are interleaved with unpacklo/hi_epi16 into (v_2k[d], v_2k+1[d]) pairs, and each pair of
// probabilities is broadcast as one 32-bit lane. Half the multiply-adds of the fp32 path and no widening, so
// more of the compute hides under the memory reads (0.8B shape, KV in cache: 0.25 -> 0.20 ms per 4K positions;
// at 32K see the figures at the top).
//
// The interleave permutes the dimensions of each accumulator within 128-bit lanes: of a 32-dimension block,
// the "lo" vector holds dimensions 8L + c (c < 4) and the "hi" vector 8L + 4 + c, lane L = 0..3. `o` stays
// in that order while the task runs (the softmax rescaling treats every dimension alike) and
// `unpermute_pairs` restores it at the end.
// Also prefetches this strip's lines of the value rows kSpreadAhead positions on (of the nvalid rows from `off`).
template <int G, int NB>
inline void values_pairs_strip(const uint32_t (*pp)[kChunk / 2], int64_t npair, int64_t n, const at::BFloat16* pool,
                               const int64_t* off, int64_t nvalid, int64_t d0, int64_t D, float* o) {
  __m512 acc[G][2 * NB];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 2 * NB; ++j) acc[g][j] = _mm512_loadu_ps(o + g * D + d0 + 16 * j);
  for (int64_t k = 0; k < npair; ++k) {
    const at::BFloat16* va = pool + off[2 * k] + d0;
    const at::BFloat16* vb = 2 * k + 1 < n ? pool + off[2 * k + 1] + d0 : va;  // odd tail: its p is 0
    const char* fa = reinterpret_cast<const char*>(pool + off[std::min<int64_t>(2 * k + kSpreadAhead, nvalid - 1)] + d0);
    const char* fb =
        reinterpret_cast<const char*>(pool + off[std::min<int64_t>(2 * k + 1 + kSpreadAhead, nvalid - 1)] + d0);
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(fa + 64 * j, _MM_HINT_T1);
      _mm_prefetch(fb + 64 * j, _MM_HINT_T1);
    }
    __m512i lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) {
      const __m512i a = _mm512_loadu_si512(va + 32 * j), b = _mm512_loadu_si512(vb + 32 * j);
      lo[j] = _mm512_unpacklo_epi16(a, b);
      hi[j] = _mm512_unpackhi_epi16(a, b);
    }
    for (int g = 0; g < G; ++g) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[g][k]));
      for (int j = 0; j < NB; ++j) {
        acc[g][2 * j] = _mm512_dpbf16_ps(acc[g][2 * j], (__m512bh)lo[j], w);
        acc[g][2 * j + 1] = _mm512_dpbf16_ps(acc[g][2 * j + 1], (__m512bh)hi[j], w);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 2 * NB; ++j) _mm512_storeu_ps(o + g * D + d0 + 16 * j, acc[g][j]);
}

// o[g * D + d] += sum_i p[g * P + i] * v_i[d] (o in pair order), n <= min(kChunk, nvalid), D % 32 == 0, G <= 8
template <int G>
void values_acc_pairs(const float* p, int64_t P, const at::BFloat16* pool, const int64_t* off, int64_t n,
                      int64_t nvalid, int64_t D, float* o) {
  uint32_t pp[G][kChunk / 2];
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
  for (int g = 0; g < G; ++g) {
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, p + g * P));  // round to nearest even
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp[g]), (__m256i)b);
  }
  const int64_t npair = (n + 1) / 2;
  int64_t d0 = 0;
  constexpr int NB = G <= 4 ? 2 : 1;  // 32-dimension blocks per strip: 2 * NB * G accumulators in registers
  for (; d0 + 32 * NB <= D; d0 += 32 * NB) values_pairs_strip<G, NB>(pp, npair, n, pool, off, nvalid, d0, D, o);
  for (; d0 + 32 <= D; d0 += 32) values_pairs_strip<G, 1>(pp, npair, n, pool, off, nvalid, d0, D, o);
}

// pair order -> natural order, rows of D (D % 32 == 0)
inline void unpermute_pairs(float* o, int64_t rows, int64_t D) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; d += 32) {
      float* x = o + r * D + d;
      const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
      _mm512_storeu_ps(x, _mm512_permutex2var_ps(lo, first, hi));
      _mm512_storeu_ps(x + 16, _mm512_permutex2var_ps(lo, second, hi));
    }
}
#endif

// Online softmax over one chunk: s <- exp(s - m) with m the running max per head; when the chunk raises
// the max, the running sum and the value accumulators are rescaled first.
inline void online_exp(float* s, int64_t P, int64_t n, int64_t G, int64_t D, float* m, float* l, float* o) {
  for (int64_t g = 0; g < G; ++g) {
    float* r = s + g * P;
    float cm = -INFINITY;
    for (int64_t i = 0; i < n; ++i) cm = r[i] > cm ? r[i] : cm;
    if (cm > m[g]) {
      if (m[g] != -INFINITY) {
        const float f = std::exp(m[g] - cm);
        l[g] *= f;
        for (int64_t d = 0; d < D; ++d) o[g * D + d] *= f;
      }
      m[g] = cm;
    }
    int64_t i = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(m[g]);
    __m512 sv = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(r + i), mv));
      _mm512_storeu_ps(r + i, e);
      sv = _mm512_add_ps(sv, e);
    }
    acc = _mm512_reduce_add_ps(sv);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 mv = _mm256_set1_ps(m[g]);
    __m256 sv = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(r + i), mv));
      _mm256_storeu_ps(r + i, e);
      sv = _mm256_add_ps(sv, e);
    }
    acc = hsum8(sv);
#endif
    for (; i < n; ++i) {
      r[i] = std::exp(r[i] - m[g]);
      acc += r[i];
    }
    l[g] += acc;
  }
}

struct Task {
  int64_t b, h, p0, p1, len;  // sequence b, KV head h, positions [p0, p1) of its len
};

// Where position p of KV head h in block b starts: (b / per_region) * region + (b % per_region) * block + h * head
// + (p % BS) * pos elements from the pool (the K and V pools share it). The cache keeps its blocks in regions of
// per_region blocks, head-major inside each (model/cache.py); a plain [num_blocks, ...] pool is one region.
struct Layout {
  int64_t BS, block, head, pos, per_region, region;
};

// G query heads from `qhead` on (of Hq) against KV head t.h over positions [t.p0, t.p1). The offsets run on
// past p1 (up to kSpreadAhead rows, within the sequence) so that the prefetches reach into the next partition,
// which the same thread usually takes next: the first rows of a task are then already on their way.
template <int G, typename KV>
void run_task(const Task& t, int64_t qhead, int64_t Hq, const float* qf, const uint16_t* qb, const KV* kp,
              const KV* vp, const int32_t* table, const Layout& lay, int64_t D, float scale, float* o,
              float* mx, float* sum, std::vector<float>& s, std::vector<int64_t>& off) {
  const int64_t n = t.p1 - t.p0;
  const int64_t ext = std::min<int64_t>(t.len, t.p1 + kSpreadAhead) - t.p0;  // rows with offsets (>= n)
  off.resize(ext);
  for (int64_t i = 0; i < ext; ++i) {
    const int64_t pos = t.p0 + i;
    const int64_t blk = table[pos / lay.BS];
    off[i] = blk / lay.per_region * lay.region + blk % lay.per_region * lay.block + t.h * lay.head +
             (pos % lay.BS) * lay.pos;
  }
  s.resize(G * kChunk);
  const int64_t q0 = (t.b * Hq + qhead) * D;
  for (int64_t g = 0; g < G; ++g) {
    mx[g] = -INFINITY;
    sum[g] = 0.f;
  }
  std::fill(o, o + G * D, 0.f);
#if defined(__AVX512BF16__)
  const bool dp = std::is_same_v<KV, at::BFloat16> && qb != nullptr;
  constexpr bool kPairsFit = std::is_same_v<KV, at::BFloat16> && G <= 8;  // values_acc_pairs' registers
  const bool pairs = kPairsFit && dp;  // P.V on vdpbf16ps, o in pair order until the end
#endif
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t cn = std::min<int64_t>(kChunk, n - c0);
    if (c0 == 0)
      for (int64_t i = 0; i < std::min<int64_t>(n, kSpreadAhead); ++i) {
        prefetch_row(kp + off[i], D);
        prefetch_row(vp + off[i], D);
      }
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<KV, at::BFloat16>) {
      if (dp) scores_dpbf16<G>(qb + q0, kp, vp, off.data() + c0, cn, ext - c0, D, scale, s.data(), kChunk, pairs);
      else scores_f32<G>(qf + q0, kp, vp, off.data() + c0, cn, ext - c0, D, scale, s.data(), kChunk);
    } else {
      scores_f32<G>(qf + q0, kp, vp, off.data() + c0, cn, ext - c0, D, scale, s.data(), kChunk);
    }
#else
    scores_f32<G>(qf + q0, kp, vp, off.data() + c0, cn, ext - c0, D, scale, s.data(), kChunk);
#endif
    online_exp(s.data(), kChunk, cn, G, D, mx, sum, o);
#if defined(__AVX512BF16__)
    if constexpr (kPairsFit) {
      if (pairs) {
        values_acc_pairs<G>(s.data(), kChunk, vp, off.data() + c0, cn, ext - c0, D, o);
        continue;
      }
    }
#endif
    values_acc<G>(s.data(), kChunk, vp, off.data() + c0, cn, D, o);
  }
#if defined(__AVX512BF16__)
  if (pairs) unpermute_pairs(o, G, D);
#endif
}

template <typename KV>
void run(const torch::Tensor& q, const KV* kp, const KV* vp, const int32_t* tables, int64_t table_stride,
         const int32_t* lens, float* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const Layout& lay,
         float scale) {
  const int64_t G = Hq / Hkv;
  // dpbf16 needs a bf16 query (exact: a bf16 model's query is bf16) and whole 32-element steps
  const bool use_bf16 = q.scalar_type() == at::kBFloat16 && std::is_same_v<KV, at::BFloat16> && D % 32 == 0;
  torch::Tensor qf = q.to(at::kFloat).contiguous();
  torch::Tensor qbt = use_bf16 ? q.contiguous() : torch::Tensor();
  const float* qfp = qf.data_ptr<float>();
  const uint16_t* qbp = use_bf16 ? reinterpret_cast<const uint16_t*>(qbt.data_ptr<at::BFloat16>()) : nullptr;

  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t p0 = 0, part = partition_len(lens[b]); p0 < lens[b]; p0 += part)
        tasks.push_back({b, h, p0, std::min<int64_t>(lens[b], p0 + part), lens[b]});
  const int64_t T = static_cast<int64_t>(tasks.size());
  std::vector<float> part_o(T * G * D), part_m(T * G), part_l(T * G);
  // little work is not worth a barrier between threads (see gemv.cpp)
  int64_t positions = 0;
  for (int64_t b = 0; b < B; ++b) positions += lens[b] * Hkv;
  const int64_t grain = positions * G < 8192 ? T : 1;
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> s;
    std::vector<int64_t> off;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Task& t = tasks[ti];
      float* o = part_o.data() + ti * G * D;
      float* m = part_m.data() + ti * G;
      float* l = part_l.data() + ti * G;
      const int32_t* table = tables + t.b * table_stride;
#define QWEN35_TASK(GG) \
  run_task<GG>(t, t.h * G, Hq, qfp, qbp, kp, vp, table, lay, D, scale, o, m, l, s, off)
      switch (G) {
        case 1: QWEN35_TASK(1); break;
        case 2: QWEN35_TASK(2); break;
        case 3: QWEN35_TASK(3); break;
        case 4: QWEN35_TASK(4); break;
        case 6: QWEN35_TASK(6); break;
        case 8: QWEN35_TASK(8); break;
        case 16: QWEN35_TASK(16); break;
        default:  // any other group size: one query head at a time (keys re-read per head)
          for (int64_t g = 0; g < G; ++g)
            run_task<1>(t, t.h * G + g, Hq, qfp, qbp, kp, vp, table, lay, D, scale, o + g * D, m + g, l + g,
                        s, off);
      }
#undef QWEN35_TASK
    }
  });
  // merge the partitions of each (sequence, KV head): exact log-sum-exp combination
  for (int64_t ti = 0; ti < T;) {
    int64_t tj = ti;
    while (tj < T && tasks[tj].b == tasks[ti].b && tasks[tj].h == tasks[ti].h) ++tj;
    const Task& t = tasks[ti];
    for (int64_t g = 0; g < G; ++g) {
      float M = -INFINITY;
      for (int64_t k = ti; k < tj; ++k) M = std::max(M, part_m[k * G + g]);
      double denom = 0.0;
      float* dst = out + (t.b * Hq + t.h * G + g) * D;
      std::fill(dst, dst + D, 0.f);
      for (int64_t k = ti; k < tj; ++k) {
        const float w = std::exp(part_m[k * G + g] - M);
        denom += static_cast<double>(w) * part_l[k * G + g];
        const float* src = part_o.data() + (k * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
      }
      const float inv = static_cast<float>(1.0 / denom);
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
    ti = tj;
  }
}

}  // namespace

// q: [B, Hq, D] (bf16 or fp32); k_pool, v_pool: [num_blocks, Hkv, block_size, D], or the cache's
// [num_regions, Hkv, blocks_per_region, block_size, D] (block b = region b / blocks_per_region), fp32 or bf16,
// with contiguous rows and the same strides; block_tables: int32 [B, max_blocks]; context_lens: int32 [B]
// (keys per sequence, the new one included) -> fp32 [B, Hq, D]
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  const bool regions = k_pool.dim() == 5;
  TORCH_CHECK(q.dim() == 3 && (k_pool.dim() == 4 || regions) && v_pool.sizes() == k_pool.sizes(),
              "paged_attention: shapes");
  TORCH_CHECK(k_pool.stride(-1) == 1 && k_pool.strides() == v_pool.strides(),
              "paged_attention: the k and v pools need contiguous rows and the same strides");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type(), "paged_attention: k and v dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_attention: block_tables and context_lens must be int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_pool.size(1), BS = k_pool.size(-2);
  TORCH_CHECK(k_pool.size(-1) == D && Hq % Hkv == 0, "paged_attention: head dims");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "paged_attention: one row per sequence");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] > 0 && (lp[b] + BS - 1) / BS <= tables.size(1), "paged_attention: context_lens[", b,
                "]=", lp[b], " does not fit its block table");
  const int64_t num_blocks = regions ? k_pool.size(0) * k_pool.size(2) : k_pool.size(0);
  const int32_t* tp = tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < (lp[b] + BS - 1) / BS; ++j)
      TORCH_CHECK(tp[b * tables.size(1) + j] >= 0 && tp[b * tables.size(1) + j] < num_blocks,
                  "paged_attention: block_tables[", b, "][", j, "]=", tp[b * tables.size(1) + j], " is not a block of "
                  "the pool (", num_blocks, " blocks)");
  const Layout lay = regions ? Layout{BS, k_pool.stride(2), k_pool.stride(1), k_pool.stride(3), k_pool.size(2),
                                      k_pool.stride(0)}
                             : Layout{BS, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), k_pool.size(0), 0};
  auto out = torch::empty({B, Hq, D}, q.options().dtype(at::kFloat));
  if (k_pool.scalar_type() == at::kBFloat16) {
    run(q, k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(), tables.data_ptr<int32_t>(),
        tables.size(1), lp, out.data_ptr<float>(), B, Hq, Hkv, D, lay, static_cast<float>(scale));
  } else {
    TORCH_CHECK(k_pool.scalar_type() == at::kFloat, "paged_attention: pools must be fp32 or bf16");
    run(q, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), tables.data_ptr<int32_t>(), tables.size(1), lp,
        out.data_ptr<float>(), B, Hq, Hkv, D, lay, static_cast<float>(scale));
  }
  return out;
}

// GGUF (llama.cpp) block-quantised weights on x86 CPUs: Q8_0, Q4_K, Q5_K and Q6_K kept as their blocks. The decode
// GEMV, the MoE decode kernel, the widening (an embedding lookup, or tiles that prefill multiplies through the
// GEMM).
//
// Layout (the contract with qwen35/ops/quant/): a weight [N, K] is uint8 [N, row_bytes], each row K / elems
// consecutive blocks along K (ggml's block_q8_0, block_q4_K, block_q5_K, block_q6_K; fp16 fields little-endian).
// The weights are the fp32 values gguf.quants.dequantize gives, bit for bit:
//   Q8_0  w = d * q                               (q int8)
//   Q4_K  w = (d * sc) * q - dmin * m             (q 4 bits, sc / m the 6-bit scale and min of the 32-block)
//   Q5_K  the same with 5-bit q
//   Q6_K  w = (d * sc) * (q - 32)                 (q 6 bits, sc int8 per 16 weights)
// Every product is exact in fp32 (at most 11 + 8 + 6 significant bits), so the only rounding is Q4_K / Q5_K's
// subtraction, and a fused multiply-subtract gives the same bits. Never a subnormal: FTZ+DAZ change nothing.
//
// Each block is widened in registers to these exact fp32 values, 16 at a time in natural order, and dotted with
// the activations in fp32 (bf16 inputs widened once per call): sum_k x[k] * w[k], the F.linear of the dequantised
// weight up to the summation order. No integer dot products: that would round the activations.
//   Q4_K: a 16-entry table per 32-block (d*sc*n - dmin*m for n = 0..15, one FMA) and vpermps by the nibble.
//   Q5_K: nibbles and qh bits merged into 5-bit bytes, 64 at a time; two such tables (n = 0..31) and vpermt2ps.
//   Q6_K: nibbles and qh bit pairs merged into (q - 32) bytes, 64 at a time (gf2p8affineqb moves the bit pairs
//         with GFNI); sign-extended, converted, scaled.
//   Q8_0: sign-extended, converted, scaled.
// More than 16 inputs (gemv_gguf) and prefill (linear_gguf_prefill) widen tiles of rows for the GEMM instead.
//
// The functions are bound by gemv.cpp's PYBIND11_MODULE (see the end).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#include "moe_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define QWEN35_GGUF_AVX512 1
#endif

// Software prefetch into L2 this many bytes ahead of the weight stream (a line per 64 bytes of blocks).
#ifndef QWEN35_GGUF_PF
#define QWEN35_GGUF_PF 4096
#endif

// Tile of widened weight rows for linear_gguf_prefill, in bytes of the widened type (and the most bytes of fp32
// products per tile). Measured at M = 512 on 2 threads against F.linear in fp32 on the ready weight ([3584, 1024]
// and [1024, 3584] Q4_K): 2 MB tiles 12-18% slower, 4 MB 9-12%, 8 MB 7-8%, 16 MB 5-8% (the whole matrix, here).
// 4 MB: the tiles are kept between calls, and a prompt's peak memory counts them (the 0.8B's whole 1K-token
// prefill ran within 2% of its speed with 16 MB).
#ifndef QWEN35_GGUF_TILE
#define QWEN35_GGUF_TILE (4 << 20)
#endif
// Input rows multiplied per fp32 GEMM of a tile: x is widened to fp32 (and the product held) for this many rows at
// a time, not for the whole prompt (a 1K-token prompt's MLP input alone is 14 MB in fp32 on the 0.8B).
#ifndef QWEN35_GGUF_BLOCK_M
#define QWEN35_GGUF_BLOCK_M 512
#endif
// Few rows (a MoE expert's share of a prompt, a batch of decode rows) take tiles that stay in L2 instead: measured on
// 2 threads, Q4_K [1024, 2048] at M = 8 / 16 / 32: 1 MB tiles 0.29 / 0.75 / 0.97 ms, 16 MB 0.69 / 0.80 / 1.00; at
// M = 512 1 MB tiles are 13% slower.
#ifndef QWEN35_GGUF_SMALL_TILE
#define QWEN35_GGUF_SMALL_TILE (1 << 20)
#endif
#ifndef QWEN35_GGUF_SMALL_M
#define QWEN35_GGUF_SMALL_M 64
#endif

#define QWEN35_GGUF_INLINE inline __attribute__((always_inline))

namespace {

using namespace qwen35_moe;

constexpr int64_t kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;  // ggml type ids
constexpr int kMaxM = 8;                                           // inputs computed together in registers
constexpr int kMaxRows = 32;                                       // inputs per gemv_gguf call

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// fp16 bits -> fp32, exactly (fp16 subnormals are normal in fp32).
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const int e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 0) v = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31) v = m != 0 ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(m | 1024), e - 25);
  return (h & 0x8000) ? -v : v;
#endif
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 6-bit scale and min of 32-block j of a Q4_K / Q5_K block (ggml's get_scale_min_k4).
inline void scale_min_k4(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---- The blocks in plain C++: the reference values, and the fallback without AVX-512 ----

inline void block_q8_0_scalar(const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b));
  for (int i = 0; i < 32; ++i) y[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
}

// Q4_K (qh null: 4-bit quants, nibbles at byte 16) and Q5_K (qh at byte 16, the fifth bits; nibbles at byte 48).
inline void block_k_scalar(const uint8_t* b, const uint8_t* qh, const uint8_t* qs, float* y) {
  const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
  const uint8_t* sc = b + 4;
  for (int c = 0; c < 4; ++c) {
    int s1, m1, s2, m2;
    scale_min_k4(sc, 2 * c, s1, m1);
    scale_min_k4(sc, 2 * c + 1, s2, m2);
    const float d1 = d * static_cast<float>(s1), n1 = dmin * static_cast<float>(m1);
    const float d2 = d * static_cast<float>(s2), n2 = dmin * static_cast<float>(m2);
    for (int l = 0; l < 32; ++l) {
      int lo = qs[32 * c + l] & 0xF, hi = qs[32 * c + l] >> 4;
      if (qh != nullptr) {
        lo |= ((qh[l] >> (2 * c)) & 1) << 4;
        hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
      }
      y[64 * c + l] = d1 * static_cast<float>(lo) - n1;
      y[64 * c + 32 + l] = d2 * static_cast<float>(hi) - n2;
    }
  }
}

inline void block_q4_k_scalar(const uint8_t* b, float* y) { block_k_scalar(b, nullptr, b + 16, y); }
inline void block_q5_k_scalar(const uint8_t* b, float* y) { block_k_scalar(b, b + 16, b + 48, y); }

inline void block_q6_k_scalar(const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b + 208));
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * h;
    float* out = y + 128 * h;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      out[l] = (d * static_cast<float>(sc[is])) * static_cast<float>(q1);
      out[l + 32] = (d * static_cast<float>(sc[is + 2])) * static_cast<float>(q2);
      out[l + 64] = (d * static_cast<float>(sc[is + 4])) * static_cast<float>(q3);
      out[l + 96] = (d * static_cast<float>(sc[is + 6])) * static_cast<float>(q4);
    }
  }
}

// ---- The blocks in AVX-512 registers ----
//
// Each decoder hands the weights of a group of blocks to sink(v, w): w the 16 exact fp32 weights from 16 * v on
// (natural order), v a compile-time constant (std::integral_constant), so that the caller's accumulators, indexed
// by v, stay in registers.

template <int... I, class F>
QWEN35_GGUF_INLINE void static_for_impl(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
QWEN35_GGUF_INLINE void static_for(F&& f) {
  static_for_impl(std::make_integer_sequence<int, N>{}, f);
}

#if defined(QWEN35_GGUF_AVX512)

inline __m512 iota16() {
  return _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
}

inline __m512i load16_u8(const uint8_t* p) {  // 16 bytes zero-extended to int32 lanes
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512 load16_s8(const uint8_t* p) {  // 16 int8 as fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Each block's scales are widened first, for kStep blocks at a time, into a small array (for_blocks), and the
// decoders read them from there: a float broadcast to 16 lanes from memory is a load (vbroadcastss m32, or an {1to16}
// operand), where broadcast from a register it is a shuffle on the port that the table lookups need. Computed
// next to their use, the compiler kept them in registers (measured: Q4_K 11 vs 18 Gweights/s on one core).
constexpr int64_t kStep = 16;

// The 8 scales d * sc (s[0..7]) and mins dmin * m (s[8..15]) of a Q4_K / Q5_K block (b: its start), exact.
QWEN35_GGUF_INLINE void scales_k4(const uint8_t* b, float* s) {
  const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(b))));  // d, dmin
  const uint32_t s0 = load_u32(b + 4), s1 = load_u32(b + 8), s2 = load_u32(b + 12);
  const uint64_t sc = static_cast<uint64_t>(s0 & 0x3F3F3F3Fu) |
                      (static_cast<uint64_t>((s2 & 0x0F0F0F0Fu) | ((s0 >> 2) & 0x30303030u)) << 32);
  const uint64_t mn = static_cast<uint64_t>(s1 & 0x3F3F3F3Fu) |
                      (static_cast<uint64_t>(((s2 >> 4) & 0x0F0F0F0Fu) | ((s1 >> 2) & 0x30303030u)) << 32);
  const __m128i both = _mm_unpacklo_epi64(_mm_cvtsi64_si128(static_cast<int64_t>(sc)),
                                          _mm_cvtsi64_si128(static_cast<int64_t>(mn)));
  const __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcastss_ps(dd)),
                                      _mm256_broadcastss_ps(_mm_movehdup_ps(dd)), 1);  // d x 8, dmin x 8
  _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(both)), f));
}

// p, with the compiler no longer knowing where it points: bytes stored 64 at a time and read back 16 at a time
// (widened by the load itself, vpmovzxbd m128) must come from memory; knowing the offsets, the compiler takes
// them out of the stored register with vextracti32x4, a second shuffle per 16 weights on the busiest port.
template <class T>
QWEN35_GGUF_INLINE const T* opaque(const T* p) {
  asm("" : "+r"(p));
  return p;
}

struct Q8_0 {
  static constexpr int64_t kElems = 32, kBytes = 34, kGroup = 4, kScales = 1;  // 4 blocks per group
  static QWEN35_GGUF_INLINE void scales(const uint8_t* b, float* s) { s[0] = half_to_float(load_u16(b)); }
  template <int V, class F>
  static QWEN35_GGUF_INLINE void block(const uint8_t* b, const float* s, F&& sink) {
    const __m512 d = _mm512_set1_ps(s[0]);
    sink(std::integral_constant<int, V>{}, _mm512_mul_ps(load16_s8(b + 2), d));
    sink(std::integral_constant<int, V + 1>{}, _mm512_mul_ps(load16_s8(b + 18), d));
  }
  template <class F>
  static QWEN35_GGUF_INLINE void group(const uint8_t* b, const float* s, F&& sink) {
    block<0>(b, s, sink);
    block<2>(b + 34, s + 1, sink);
    block<4>(b + 68, s + 2, sink);
    block<6>(b + 102, s + 3, sink);
  }
  template <class F>
  static QWEN35_GGUF_INLINE void single(const uint8_t* b, const float* s, F&& sink) {
    block<0>(b, s, sink);
  }
};

struct Q4_K {
  static constexpr int64_t kElems = 256, kBytes = 144, kGroup = 1, kScales = 16;
  static QWEN35_GGUF_INLINE void scales(const uint8_t* b, float* s) { scales_k4(b, s); }
  template <class F>
  static QWEN35_GGUF_INLINE void group(const uint8_t* b, const float* s, F&& sink) {
    const __m512 iota = iota16();
    const uint8_t* qs = b + 16;
    static_for<4>([&](auto c) {
      // the 16 values of 32-block j: d * sc * n - dmin * m for n = 0..15 (one rounding, as gguf's)
      const __m512 t0 = _mm512_fmsub_ps(iota, _mm512_set1_ps(s[2 * c]), _mm512_set1_ps(s[8 + 2 * c]));
      const __m512 t1 = _mm512_fmsub_ps(iota, _mm512_set1_ps(s[2 * c + 1]), _mm512_set1_ps(s[9 + 2 * c]));
      const __m512i q0 = load16_u8(qs + 32 * c), q1 = load16_u8(qs + 32 * c + 16);
      sink(std::integral_constant<int, 4 * c>{}, _mm512_permutexvar_ps(q0, t0));  // vpermps reads bits 0..3
      sink(std::integral_constant<int, 4 * c + 1>{}, _mm512_permutexvar_ps(q1, t0));
      sink(std::integral_constant<int, 4 * c + 2>{}, _mm512_permutexvar_ps(_mm512_srli_epi32(q0, 4), t1));
      sink(std::integral_constant<int, 4 * c + 3>{}, _mm512_permutexvar_ps(_mm512_srli_epi32(q1, 4), t1));
    });
  }
  template <class F>
  static QWEN35_GGUF_INLINE void single(const uint8_t* b, const float* s, F&& sink) {
    group(b, s, sink);
  }
};

struct Q5_K {
  static constexpr int64_t kElems = 256, kBytes = 176, kGroup = 1, kScales = 16;
  static QWEN35_GGUF_INLINE void scales(const uint8_t* b, float* s) { scales_k4(b, s); }
  template <class F>
  static QWEN35_GGUF_INLINE void group(const uint8_t* b, const float* s, F&& sink) {
    // First the 5-bit values as bytes, 64 at a time (the nibbles and the qh bits merged), then as Q4_K with 32-entry
    // tables (vpermt2ps: index bit 4 picks the second table). Pair p of chunks (2p, 2p + 1): lo holds the low
    // nibbles of both chunks' 32 bytes (weights 128p + l, 128p + 64 + l), hi the high ones (+32); qh byte l gives
    // bit 2c to the low nibble of byte l of chunk c and bit 2c + 1 to its high nibble.
    alignas(64) uint8_t v5[256];  // pair p: lo at 128p, hi at 128p + 64
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
    const __m512i w4_2 = _mm512_setr_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                           0x0004000400040004, 0x0002000200020002, 0x0002000200020002,
                                           0x0002000200020002, 0x0002000200020002);
    const __m512i one = _mm512_set1_epi16(1), w3_1 = _mm512_sub_epi16(w4_2, one);  // per word: 3 | 1
    const __m512i w0_2 = _mm512_sub_epi16(_mm512_set1_epi16(4), w4_2), w1_3 = _mm512_add_epi16(w0_2, one);
    // 16-bit shifts keep each byte's bit 4 its own (the bits that cross into the other byte are masked off)
    const __m512i q0 = _mm512_loadu_si512(b + 48), q1 = _mm512_loadu_si512(b + 112);
    _mm512_store_si512(v5, _mm512_ternarylogic_epi32(q0, _mm512_sllv_epi16(qh, w4_2), low4, 0xE4));  // C ? A : B
    _mm512_store_si512(v5 + 64, _mm512_ternarylogic_epi32(_mm512_srli_epi16(q0, 4), _mm512_sllv_epi16(qh, w3_1),
                                                          low4, 0xE4));
    _mm512_store_si512(v5 + 128, _mm512_ternarylogic_epi32(q1, _mm512_srlv_epi16(qh, w0_2), low4, 0xE4));
    _mm512_store_si512(v5 + 192, _mm512_ternarylogic_epi32(_mm512_srli_epi16(q1, 4), _mm512_srlv_epi16(qh, w1_3),
                                                           low4, 0xE4));
    const __m512 iota = iota16(), iota_hi = _mm512_add_ps(iota16(), _mm512_set1_ps(16.f));
    const uint8_t* v = opaque(v5);
    static_for<8>([&](auto j) {  // 32-block j = 2c + h: chunk c, high nibbles if h
      const __m512 sc = _mm512_set1_ps(s[j]), mn = _mm512_set1_ps(s[8 + j]);
      const __m512 ta = _mm512_fmsub_ps(iota, sc, mn), tb = _mm512_fmsub_ps(iota_hi, sc, mn);
      constexpr int J = decltype(j)::value, c = J / 2, at = 128 * (c / 2) + 64 * (J % 2) + 32 * (c % 2);
      sink(std::integral_constant<int, 2 * J>{}, _mm512_permutex2var_ps(ta, load16_u8(v + at), tb));
      sink(std::integral_constant<int, 2 * J + 1>{}, _mm512_permutex2var_ps(ta, load16_u8(v + at + 16), tb));
    });
  }
  template <class F>
  static QWEN35_GGUF_INLINE void single(const uint8_t* b, const float* s, F&& sink) {
    group(b, s, sink);
  }
};

struct Q6_K {
  static constexpr int64_t kElems = 256, kBytes = 210, kGroup = 1, kScales = 16;
  static QWEN35_GGUF_INLINE void scales(const uint8_t* b, float* s) {  // d * sc per 16 weights, exact
    _mm512_storeu_ps(s, _mm512_mul_ps(load16_s8(b + 192), _mm512_set1_ps(half_to_float(load_u16(b + 208)))));
  }
  template <class F>
  static QWEN35_GGUF_INLINE void group(const uint8_t* b, const float* s, F&& sink) {
    alignas(64) int8_t q[256];  // q - 32, natural order
    const __m512i low4 = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      // ql: bytes 0..31 give weights 0..31 (low nibbles) and 64..95 (high); bytes 32..63 give 32..63 and 96..127.
      // qh byte l: bits 0-1 for weight l, 2-3 for l + 32, 4-5 for l + 64, 6-7 for l + 96 (bits 4-5 of q).
      const __m512i ql = _mm512_loadu_si512(b + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
#if defined(__GFNI__)
      // gf2p8affineqb: output bit i of a byte is the parity of the input bits that byte 7 - i of its qword's matrix
      // selects: bit 4 <- bit k (byte 3 = 1 << k), bit 5 <- bit k + 1 (byte 2), the other bits 0.
      const __m512i h01 = _mm512_gf2p8affine_epi64_epi8(
          qh, _mm512_set_epi64(0x04080000, 0x04080000, 0x04080000, 0x04080000, 0x01020000, 0x01020000, 0x01020000,
                               0x01020000), 0);
      const __m512i h23 = _mm512_gf2p8affine_epi64_epi8(
          qh, _mm512_set_epi64(0x40800000, 0x40800000, 0x40800000, 0x40800000, 0x10200000, 0x10200000, 0x10200000,
                               0x10200000), 0);
#else
      const __m512i pair = _mm512_set1_epi8(0x30);
      const __m512i h01 = _mm512_and_si512(
          _mm512_sllv_epi16(qh, _mm512_setr_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                                   0x0004000400040004, 0x0002000200020002, 0x0002000200020002,
                                                   0x0002000200020002, 0x0002000200020002)), pair);
      const __m512i h23 = _mm512_and_si512(
          _mm512_srlv_epi16(qh, _mm512_setr_epi64(0, 0, 0, 0, 0x0002000200020002, 0x0002000200020002,
                                                   0x0002000200020002, 0x0002000200020002)), pair);
#endif
      const __m512i x01 = _mm512_ternarylogic_epi32(ql, h01, low4, 0xE4);                         // C ? A : B
      const __m512i x23 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), h23, low4, 0xE4);
      _mm512_store_si512(q + 128 * h, _mm512_sub_epi8(x01, bias));
      _mm512_store_si512(q + 128 * h + 64, _mm512_sub_epi8(x23, bias));
    }
    const uint8_t* v = opaque(reinterpret_cast<const uint8_t*>(q));
    static_for<16>([&](auto g) { sink(g, _mm512_mul_ps(load16_s8(v + 16 * g), _mm512_set1_ps(s[g]))); });
  }
  template <class F>
  static QWEN35_GGUF_INLINE void single(const uint8_t* b, const float* s, F&& sink) {
    group(b, s, sink);
  }
};

template <class D>
QWEN35_GGUF_INLINE void prefetch_group(const uint8_t* p) {
  constexpr int lines = static_cast<int>((D::kBytes * D::kGroup + 63) / 64);
#pragma GCC unroll 8
  for (int i = 0; i < lines; ++i) _mm_prefetch(reinterpret_cast<const char*>(p) + QWEN35_GGUF_PF + 64 * i, _MM_HINT_T1);
}

// The blocks of a row, kStep at a time: their scales widened into s, then group(p, s, ...) for each group of
// D::kGroup blocks and single(p, s, ...) for the blocks left at the end of the row.
template <class D, class G, class S>
QWEN35_GGUF_INLINE void for_blocks(const uint8_t* row, int64_t nb, G&& group, S&& single) {
  alignas(64) float s[kStep * D::kScales];
  for (int64_t b0 = 0; b0 < nb; b0 += kStep) {
    const int64_t be = std::min(nb, b0 + kStep);
    for (int64_t b = b0; b < be; ++b) D::scales(row + b * D::kBytes, s + (b - b0) * D::kScales);
    int64_t b = b0;
    for (; b + D::kGroup <= be; b += D::kGroup) group(b, row + b * D::kBytes, s + (b - b0) * D::kScales);
    for (; b < be; ++b) single(b, row + b * D::kBytes, s + (b - b0) * D::kScales);
  }
}

// One weight row (nb blocks) against MM inputs: out[m] = sum_k x[m, k] * w[k]. x is fp32 interleaved by 16
// (Inputs below): x[m, 16 j + i] at x[(j * MM + m) * 16 + i], so that every load is a constant offset from one
// pointer (with a row stride, the compiler kept a pointer per input and vector, and spilled them).
template <class D, int MM>
void row_dot(const uint8_t* row, int64_t nb, const float* x, float* out) {
  constexpr int NA = MM == 1 ? 4 : (MM <= 4 ? 2 : 1);  // independent chains per input
  __m512 acc[MM][NA];
  for (int m = 0; m < MM; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  auto fma = [&](const float* xb) __attribute__((always_inline)) {
    return [&acc, xb](auto v, __m512 w) __attribute__((always_inline)) {
      for (int m = 0; m < MM; ++m)
        acc[m][v % NA] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + (v * MM + m) * 16), acc[m][v % NA]);
    };
  };
  for_blocks<D>(
      row, nb,
      [&](int64_t b, const uint8_t* p, const float* s) __attribute__((always_inline)) {
        prefetch_group<D>(p);
        D::group(p, s, fma(x + b * D::kElems * MM));
      },
      [&](int64_t b, const uint8_t* p, const float* s) __attribute__((always_inline)) {
        D::single(p, s, fma(x + b * D::kElems * MM));
      });
  for (int m = 0; m < MM; ++m) {
    __m512 r = acc[m][0];
    for (int a = 1; a < NA; ++a) r = _mm512_add_ps(r, acc[m][a]);
    out[m] = _mm512_reduce_add_ps(r);
  }
}

// The blocks' fp32 values (to_bf16: rounded to nearest even) into out, natural order.
inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);  // finite values: add 0x7FFF plus the kept half's lowest bit
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}

template <class D>
void dequant_row(const uint8_t* row, int64_t nb, float* out) {
  auto store = [&](int64_t b) __attribute__((always_inline)) {
    float* o = out + b * D::kElems;
    return [o](auto v, __m512 w) __attribute__((always_inline)) { _mm512_storeu_ps(o + 16 * v, w); };
  };
  for_blocks<D>(
      row, nb,
      [&](int64_t b, const uint8_t* p, const float* s) __attribute__((always_inline)) { D::group(p, s, store(b)); },
      [&](int64_t b, const uint8_t* p, const float* s) __attribute__((always_inline)) { D::single(p, s, store(b)); });
}

template <class D>
void dequant_row_bf16(const uint8_t* row, int64_t nb, uint16_t* out) {
  auto store = [&](int64_t b) __attribute__((always_inline)) {
    uint16_t* o = out + b * D::kElems;
    return [o](auto v, __m512 w) __attribute__((always_inline)) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * v), to_bf16(w));
    };
  };
  for_blocks<D>(
      row, nb,
      [&](int64_t b, const uint8_t* p, const float* s) __attribute__((always_inline)) { D::group(p, s, store(b)); },
      [&](int64_t b, const uint8_t* p, const float* s) __attribute__((always_inline)) { D::single(p, s, store(b)); });
}

#else  // plain C++: each block widened into a buffer

struct Q8_0 {
  static constexpr int64_t kElems = 32, kBytes = 34;
  static void widen(const uint8_t* b, float* y) { block_q8_0_scalar(b, y); }
};
struct Q4_K {
  static constexpr int64_t kElems = 256, kBytes = 144;
  static void widen(const uint8_t* b, float* y) { block_q4_k_scalar(b, y); }
};
struct Q5_K {
  static constexpr int64_t kElems = 256, kBytes = 176;
  static void widen(const uint8_t* b, float* y) { block_q5_k_scalar(b, y); }
};
struct Q6_K {
  static constexpr int64_t kElems = 256, kBytes = 210;
  static void widen(const uint8_t* b, float* y) { block_q6_k_scalar(b, y); }
};

template <class D, int MM>
void row_dot(const uint8_t* row, int64_t nb, const float* x, float* out) {
  float w[256];
  float acc[MM] = {};
  for (int64_t b = 0; b < nb; ++b) {
    D::widen(row + b * D::kBytes, w);
    const float* xb = x + b * D::kElems * MM;
    for (int m = 0; m < MM; ++m) {
      float s = 0.f;
      for (int64_t i = 0; i < D::kElems; ++i) s += xb[(i / 16 * MM + m) * 16 + i % 16] * w[i];
      acc[m] += s;
    }
  }
  for (int m = 0; m < MM; ++m) out[m] = acc[m];
}

template <class D>
void dequant_row(const uint8_t* row, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b) D::widen(row + b * D::kBytes, out + b * D::kElems);
}

template <class D>
void dequant_row_bf16(const uint8_t* row, int64_t nb, uint16_t* out) {
  float w[256];
  for (int64_t b = 0; b < nb; ++b) {
    D::widen(row + b * D::kBytes, w);
    for (int64_t i = 0; i < D::kElems; ++i) out[b * D::kElems + i] = bits_bf16(w[i]);
  }
}

#endif

template <class D>
void rows_dot(const uint8_t* row, int64_t nb, const float* x, int64_t M, float* out) {
  switch (M) {
    case 1: return row_dot<D, 1>(row, nb, x, out);
    case 2: return row_dot<D, 2>(row, nb, x, out);
    case 3: return row_dot<D, 3>(row, nb, x, out);
    case 4: return row_dot<D, 4>(row, nb, x, out);
    case 5: return row_dot<D, 5>(row, nb, x, out);
    case 6: return row_dot<D, 6>(row, nb, x, out);
    case 7: return row_dot<D, 7>(row, nb, x, out);
    default: return row_dot<D, 8>(row, nb, x, out);
  }
}

// The per-type entry points, chosen once per call.
struct Kernels {
  int64_t elems, bytes;
  const char* name;
  void (*dot)(const uint8_t*, int64_t, const float*, int64_t, float*);
  float (*dot1)(const uint8_t*, int64_t, const float*);
  void (*widen)(const uint8_t*, int64_t, float*);
  void (*widen_bf16)(const uint8_t*, int64_t, uint16_t*);
};

template <class D>
float row_dot1(const uint8_t* row, int64_t nb, const float* x) {
  float out;
  row_dot<D, 1>(row, nb, x, &out);
  return out;
}

template <class D>
Kernels kernels_of(const char* name) {
  return {D::kElems, D::kBytes, name, &rows_dot<D>, &row_dot1<D>, &dequant_row<D>, &dequant_row_bf16<D>};
}

const Kernels& kernels_for(const char* fn, int64_t type) {
  static const Kernels q8_0 = kernels_of<Q8_0>("Q8_0"), q4_k = kernels_of<Q4_K>("Q4_K"),
                       q5_k = kernels_of<Q5_K>("Q5_K"), q6_k = kernels_of<Q6_K>("Q6_K");
  switch (type) {
    case kQ8_0: return q8_0;
    case kQ4_K: return q4_k;
    case kQ5_K: return q5_k;
    case kQ6_K: return q6_k;
    default:
      TORCH_CHECK(false, fn, ": unsupported GGUF type id ", type,
                  " (supported: 8 = Q8_0, 12 = Q4_K, 13 = Q5_K, 14 = Q6_K)");
  }
}

// A checked GGUF weight: q [N, row_bytes] (or the [E, N, row_bytes] of experts: dims = 3), K weights per row.
struct Matrix {
  const Kernels* k;
  const uint8_t* q;
  int64_t N, K, nb, row_bytes;
  const uint8_t* row(int64_t n) const { return q + n * row_bytes; }
};

Matrix check_matrix(const char* fn, const char* what, const torch::Tensor& q, int64_t type, int64_t K, int dims = 2) {
  const Kernels& k = kernels_for(fn, type);
  TORCH_CHECK(q.dim() == dims && q.scalar_type() == at::kByte, fn, ": ", what, " must be uint8 [",
              dims == 3 ? "E, " : "", "N, row_bytes] (the GGUF blocks)");
  TORCH_CHECK(q.is_contiguous(), fn, ": ", what, " must be contiguous");
  TORCH_CHECK(K >= 0 && K % k.elems == 0, fn, ": K=", K, " is not a multiple of the ", k.name, " block (",
              k.elems, " weights)");
  const int64_t nb = K / k.elems, rb = nb * k.bytes;
  TORCH_CHECK(q.size(dims - 1) == rb, fn, ": ", what, " has rows of ", q.size(dims - 1), " bytes but K=", K,
              " in ", k.name, " needs ", rb);
  return {&k, q.data_ptr<uint8_t>(), q.size(dims - 2), K, nb, rb};
}

// Rows per task: at least ~1 MB of blocks, so small matrices stay on one thread (see grain_rows in gemv.cpp).
inline int64_t grain_rows_gguf(int64_t row_bytes) {
  return std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(row_bytes, 1));
}

// Widen rows [r0, r1) of w into out (row stride K), in parallel.
void widen_rows(const Matrix& w, int64_t r0, int64_t r1, float* out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(w.K, 1));
  at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) w.k->widen(w.row(n), w.nb, out + (n - r0) * w.K);
  });
}
void widen_rows_bf16(const Matrix& w, int64_t r0, int64_t r1, uint16_t* out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(w.K, 1));
  at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) w.k->widen_bf16(w.row(n), w.nb, out + (n - r0) * w.K);
  });
}

// bf16 rows (stride ldx) in fp32, in groups of kMaxM rows (the last one shorter), each group interleaved by 16
// as row_dot reads it: group g (rows m0 = 8g.., mg of them) at m0 * K, x[m0 + m, 16 j + i] at (j * mg + m) * 16 + i.
// K is a multiple of 16. For one row, simply the row.
class Inputs {
 public:
  Inputs(const uint16_t* x, int64_t M, int64_t K, int64_t ldx) : K_(K), buf_(static_cast<size_t>(M * K)) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
      const int64_t mg = std::min<int64_t>(kMaxM, M - m0);
      float* g = buf_.data() + m0 * K;
      for (int64_t m = 0; m < mg; ++m)
        for (int64_t k = 0; k < K; ++k) g[(k / 16 * mg + m) * 16 + k % 16] = bf16_to_float(x[(m0 + m) * ldx + k]);
    }
  }
  const float* group(int64_t m0) const { return buf_.data() + m0 * K_; }  // m0 a multiple of kMaxM

 private:
  int64_t K_;
  std::vector<float> buf_;
};

// A flat buffer of at least n elements kept by the calling thread between calls (slot: which one): prefill's tiles
// are megabytes, and fresh memory costs a page fault per 4 KB on every call. Raw memory wrapped anew on each call
// (not a kept tensor: one made under inference mode could not be written outside it, and the reverse).
struct ScratchBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  ~ScratchBuffer() { std::free(p); }
};

torch::Tensor scratch(int slot, int64_t n, at::ScalarType dtype) {
  thread_local ScratchBuffer kept[3];
  ScratchBuffer& b = kept[slot];
  const size_t need = (static_cast<size_t>(std::max<int64_t>(n, 1)) * c10::elementSize(dtype) + 63) / 64 * 64;
  if (b.bytes < need) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, need);
    b.bytes = b.p != nullptr ? need : 0;
    TORCH_CHECK(b.p != nullptr, "gguf kernels: could not allocate ", need, " bytes of scratch");
  }
  return torch::from_blob(b.p, {n}, torch::TensorOptions().dtype(dtype));
}

// bf16 rows (stride ldx) as fp32 [M, K]: the inputs of single-row dot products.
std::vector<float> widen_rows_of(const uint16_t* x, int64_t M, int64_t K, int64_t ldx) {
  std::vector<float> out(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = bf16_to_float(x[m * ldx + k]);
  return out;
}

void check_x(const char* fn, const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, fn, ": x must be bf16 [M, K]");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, fn, ": x must be row-major");
}

}  // namespace

// Rows [r0, r1) of a GGUF weight widened: fp32 [r1 - r0, K], the values of gguf.quants.dequantize bit for bit; or
// with to_bf16 those rounded to nearest even.
torch::Tensor gguf_dequant(torch::Tensor q, int64_t type, int64_t K, int64_t r0, int64_t r1, bool to_bf16) {
  const Matrix w = check_matrix("gguf_dequant", "q", q, type, K);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= w.N, "gguf_dequant: rows [", r0, ", ", r1, ") not within [0, ", w.N, "]");
  auto out = torch::empty({r1 - r0, K}, q.options().dtype(to_bf16 ? at::kBFloat16 : at::kFloat));
  if (to_bf16) widen_rows_bf16(w, r0, r1, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  else widen_rows(w, r0, r1, out.data_ptr<float>());
  return out;
}

// The rows of a GGUF weight that ids names (an embedding lookup), widened as gguf_dequant: [T, K].
torch::Tensor gguf_dequant_rows(torch::Tensor q, int64_t type, int64_t K, torch::Tensor ids, bool to_bf16) {
  const Matrix w = check_matrix("gguf_dequant_rows", "q", q, type, K);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "gguf_dequant_rows: ids must be int64 [T]");
  auto id = ids.contiguous();
  const int64_t T = id.size(0);
  const int64_t* ip = id.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ip[t] >= 0 && ip[t] < w.N, "gguf_dequant_rows: ids[", t, "] = ", ip[t], " out of range [0, ", w.N,
                ")");
  auto out = torch::empty({T, K}, q.options().dtype(to_bf16 ? at::kBFloat16 : at::kFloat));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  if (to_bf16) {
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    at::parallel_for(0, T, grain, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) w.k->widen_bf16(w.row(ip[t]), w.nb, op + t * K);
    });
  } else {
    float* op = out.data_ptr<float>();
    at::parallel_for(0, T, grain, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) w.k->widen(w.row(ip[t]), w.nb, op + t * K);
    });
  }
  return out;
}

namespace {

// x [M, K] bf16 times w -> bf16 [M, N], tile after tile of weight rows widened into one buffer and multiplied by the
// GEMM into their output columns: widened to bf16 and multiplied in bf16 with bf16, else widened to fp32, x taken
// to fp32 once, each tile's fp32 product rounded into its bf16 columns while in cache.
torch::Tensor linear_tiles(const torch::Tensor& x, const Matrix& w, bool bf16) {
  const int64_t M = x.size(0), K = w.K, N = w.N;
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, x.options());
  const int64_t tile_bytes = M <= QWEN35_GGUF_SMALL_M ? QWEN35_GGUF_SMALL_TILE : QWEN35_GGUF_TILE;
  int64_t fit = std::max<int64_t>(1, tile_bytes / ((bf16 ? 2 : 4) * K));
  const int64_t mb = std::min<int64_t>(M, QWEN35_GGUF_BLOCK_M);
  if (!bf16) fit = std::min(fit, std::max<int64_t>(256, tile_bytes / (4 * mb)));
  const int64_t tile = fit >= N ? N : std::max<int64_t>(64, fit / 64 * 64);
  auto buf = scratch(0, std::min(tile, N) * K, bf16 ? at::kBFloat16 : at::kFloat);
  auto fill = [&](int64_t n0, int64_t n1) {
    if (bf16) widen_rows_bf16(w, n0, n1, reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>()));
    else widen_rows(w, n0, n1, buf.data_ptr<float>());
  };
  if (bf16) {
    auto xin = x.contiguous();
    if (tile >= N) {
      fill(0, N);
      return at::mm(xin, buf.view({N, K}).t());
    }
    auto out = torch::empty({M, N}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t nt = std::min(tile, N - n0);
      fill(n0, n0 + nt);
      auto cols = out.narrow(1, n0, nt);
      at::mm_out(cols, xin, buf.narrow(0, 0, nt * K).view({nt, K}).t());
    }
    return out;
  }
  auto out = torch::empty({M, N}, x.options());
  auto yt = scratch(1, mb * std::min(tile, N), at::kFloat);
  auto xs = scratch(2, mb * K, at::kFloat);
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t nt = std::min(tile, N - n0);
    fill(n0, n0 + nt);
    const auto wt = buf.narrow(0, 0, nt * K).view({nt, K}).t();
    for (int64_t r0 = 0; r0 < M; r0 += mb) {
      const int64_t mt = std::min(mb, M - r0);
      auto xf = xs.narrow(0, 0, mt * K).view({mt, K});
      // x widened again for each tile (M * K against the tile's M * K * nt FMAs), unless one block holds it all
      if (mt < M || n0 == 0) xf.copy_(x.narrow(0, r0, mt));
      auto y = yt.narrow(0, 0, mt * nt).view({mt, nt});
      at::mm_out(y, xf, wt);
      const float* yp = y.data_ptr<float>();
      at::parallel_for(0, mt, std::max<int64_t>(1, 16384 / nt), [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t n = 0; n < nt; ++n) op[(r0 + m) * N + n0 + n] = static_cast<at::BFloat16>(yp[m * nt + n]);
      });
    }
  }
  return out;
}

}  // namespace

// x: bf16 [M <= 32, K] times a GGUF weight [N, K] -> bf16 [M, N]: per row sum_k x[m, k] * w[n, k], exact products
// of the widened weights, fp32 sums, rounded to bf16 once.
torch::Tensor gemv_gguf(torch::Tensor x, torch::Tensor q, int64_t type) {
  check_x("gemv_gguf", x);
  const int64_t M = x.size(0), K = x.size(1);
  const Matrix w = check_matrix("gemv_gguf", "q", q, type, K);
  TORCH_CHECK(M <= kMaxRows, "gemv_gguf: at most ", kMaxRows, " rows (linear_gguf_prefill takes more)");
  const int64_t N = w.N;
  // More than 8 inputs: each weight row is dotted with kMaxM inputs at a time, all of them re-read from L2 for every
  // row, and the fp32 GEMM on L2-sized widened tiles is faster (the same sums in another order). Measured on 2
  // threads, Q4_K [1024, 2048], ms: M = 8 0.59 here vs 0.29 there, M = 16 0.98 vs 0.75 (M = 4: 0.16 here).
  if (M > 8) return linear_tiles(x, w, false);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Inputs xf(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, x.stride(0));
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const Kernels& k = *w.k;
  // one weight row after the other: a single sequential stream (see gemv_bf16)
  at::parallel_for(0, N, grain_rows_gguf(w.row_bytes), [&](int64_t n0, int64_t n1) {
    if (M == 1) {
      for (int64_t n = n0; n < n1; ++n) yp[n] = static_cast<at::BFloat16>(k.dot1(w.row(n), w.nb, xf.group(0)));
      return;
    }
    float out[kMaxM];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {  // the weight row stays in L1 across the groups
        const int64_t mg = std::min<int64_t>(kMaxM, M - m0);
        k.dot(w.row(n), w.nb, xf.group(m0), mg, out);
        for (int64_t m = 0; m < mg; ++m) yp[(m0 + m) * N + n] = static_cast<at::BFloat16>(out[m]);
      }
    }
  });
  return y;
}

// Whether linear_gguf_prefill widens to bf16 (and multiplies in bf16) rather than to fp32: a property of the build.
bool gguf_prefill_bf16() {
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
  return true;
#else
  return false;
#endif
}

// x: bf16 [M, K] (any M) times a GGUF weight [N, K] -> bf16 [M, N] (linear_tiles). Without AVX512-BF16 (or AMX) a
// bf16 GEMM runs at a fifth of the fp32 one (measured on 2 threads: 63 vs 290 GFLOP/s), so the tiles are fp32.
torch::Tensor linear_gguf_prefill(torch::Tensor x, torch::Tensor q, int64_t type) {
  check_x("linear_gguf_prefill", x);
  const Matrix w = check_matrix("linear_gguf_prefill", "q", q, type, x.size(1));
  return linear_tiles(x, w, gguf_prefill_bf16());
}

namespace {

// A MoE block's routed-expert inputs, checked (what both GGUF expert kernels take): x [M, H] bf16, gu_q [E, 2I,
// row_bytes(H)], dn_q [E, H, row_bytes(I)], ids and weights [M, k]. `id` and `wt` keep the contiguous copies alive.
struct MoeInputs {
  int64_t M, H, k, E, P;
  Matrix gu, dn;
  torch::Tensor id, wt;
  const int64_t* idp;
  const at::BFloat16* wp;
  int64_t gu_expert, dn_expert;  // bytes of one expert's gate|up rows, of its down rows
};

MoeInputs check_moe(const char* fn, const torch::Tensor& x, const torch::Tensor& gu_q, int64_t gu_type,
                    const torch::Tensor& dn_q, int64_t dn_type, int64_t I, const torch::Tensor& ids,
                    const torch::Tensor& weights) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes(), fn,
              ": x [M, H], ids and weights [M, k]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weights.scalar_type() == at::kBFloat16, fn,
              ": x and weights must be bf16");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, fn, ": x must be row-major");
  const int64_t M = x.size(0), H = x.size(1), k = ids.size(1);
  TORCH_CHECK(ids.size(0) == M, fn, ": ids has ", ids.size(0), " rows but x has ", M);
  const Matrix gu = check_matrix(fn, "gu_q", gu_q, gu_type, H, 3);
  const Matrix dn = check_matrix(fn, "dn_q", dn_q, dn_type, I, 3);
  const int64_t E = gu_q.size(0);
  TORCH_CHECK(gu.N == 2 * I && dn_q.size(0) == E && dn.N == H, fn, ": shapes disagree: gu_q [", E, ", ", gu.N,
              ", .] should be [E, 2I=", 2 * I, ", .], dn_q [", dn_q.size(0), ", ", dn.N, ", .] should be [E, H=", H,
              ", .]");
  auto id = ids.to(at::kLong).contiguous();
  auto wt = weights.contiguous();
  const int64_t* idp = id.data_ptr<int64_t>();
  for (int64_t i = 0; i < M * k; ++i)
    TORCH_CHECK(idp[i] >= 0 && idp[i] < E, fn, ": expert id ", idp[i], " out of range [0, ", E, ")");
  return {M, H, k, E, M * k, gu, dn, id, wt, idp, wt.data_ptr<at::BFloat16>(), 2 * I * gu.row_bytes,
          H * dn.row_bytes};
}

}  // namespace

// The GGUF twin of moe_experts_fp8 (fp8.cpp): the same passes, tasks and bf16 roundings, with gemv_gguf's dot
// products. x [M, H] bf16; gu_q [E, 2I, row_bytes(H)] (gate rows, then up rows) of gu_type; dn_q [E, H,
// row_bytes(I)] of dn_type (the two may differ: Q4_K_M files give ffn_down Q6_K); ids [M, k] int64, weights [M, k]
// bf16 -> [M, H] bf16.
torch::Tensor moe_experts_gguf(torch::Tensor x, torch::Tensor gu_q, int64_t gu_type, torch::Tensor dn_q,
                               int64_t dn_type, int64_t I, torch::Tensor ids, torch::Tensor weights) {
  const MoeInputs in = check_moe("moe_experts_gguf", x, gu_q, gu_type, dn_q, dn_type, I, ids, weights);
  const int64_t M = in.M, H = in.H, k = in.k, P = in.P, gu_expert = in.gu_expert, dn_expert = in.dn_expert;
  const Matrix &gu = in.gu, &dn = in.dn;
  const int64_t* idp = in.idp;
  const at::BFloat16* wp = in.wp;
  auto out = torch::empty({M, H}, x.options());
  if (P == 0 || H == 0) return out.zero_();
  const std::vector<int64_t> order = slots_by_expert(idp, M, k);
  const std::vector<float> xf =
      widen_rows_of(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, H, x.stride(0));
  std::vector<uint16_t> act(static_cast<size_t>(P * I));

  // pass 1: gate then up rows of every chosen expert, in blocks of kRows rows (two sequential streams per task)
  constexpr int64_t kRows = 64;
  const int64_t nrb = (I + kRows - 1) / kRows;
  const int64_t grain1 = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(2 * kRows * gu.row_bytes, 1));
  at::parallel_for(0, P * nrb, grain1, [&](int64_t a, int64_t b) {
    float gv[kRows];
    for (int64_t task = a; task < b; ++task) {
      const int64_t p = task / nrb, r0 = (task % nrb) * kRows, r1 = std::min(I, r0 + kRows);
      const float* xr = xf.data() + (p / k) * H;
      const uint8_t* w = gu.q + idp[p] * gu_expert;
      for (int64_t r = r0; r < r1; ++r) gv[r - r0] = round_bf16(gu.k->dot1(w + r * gu.row_bytes, gu.nb, xr));
      for (int64_t r = r0; r < r1; ++r) {
        const float g = gv[r - r0];
        const float u = round_bf16(gu.k->dot1(w + (I + r) * gu.row_bytes, gu.nb, xr));
        const float sg = round_bf16(g / (1.f + std::exp(-g)));
        act[p * I + r] = bits_bf16(sg * u);
      }
    }
  });

  // pass 2: each chosen expert's down rows in order (one sequential stream per task): y[p, n], rounded, weighted
  const std::vector<float> af = widen_rows_of(act.data(), P, I, I);
  std::vector<float> y(static_cast<size_t>(P * H));
  const int64_t nnb = (H + kRows - 1) / kRows;
  const int64_t grain2 = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(kRows * dn.row_bytes, 1));
  at::parallel_for(0, P * nnb, grain2, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t p = task / nnb, n0 = (task % nnb) * kRows, n1 = std::min(H, n0 + kRows);
      const float wgt = static_cast<float>(wp[p]);
      const uint8_t* w = dn.q + idp[p] * dn_expert;
      const float* ar = af.data() + p * I;
      for (int64_t n = n0; n < n1; ++n)
        y[p * H + n] = round_bf16(round_bf16(dn.k->dot1(w + n * dn.row_bytes, dn.nb, ar)) * wgt);
    }
  });

  // pass 3: each token's experts summed in ascending id order, rounded to bf16 after each step (index_add_)
  sum_in_expert_order(y, order, M, k, H, out.data_ptr<at::BFloat16>());
  return out;
}

namespace {

constexpr int kGroupRows = 4;  // weight rows widened together by micro_dots
// Inputs taken together: 6 x 4 accumulators + 4 rows + 1 input of the 32 registers. Measured on the MoE bench
// shape's Q4_K experts (512 tokens, 2 threads), ms per layer: 4 inputs 206-231, 5 175-185, 6 174-190; 8 rows x 3
// inputs 259-280.
constexpr int kGroupInputs = 6;

// acc[s][r][0..16) += the 16 lanes of sum_k xs[s][k] * w[r * KC + k], k < KC (a multiple of 16), for MS inputs and
// NR widened weight rows: every 16-wide load of a row or an input feeds several FMAs, the partial sums stay in 16
// lanes (reduced once the whole row is done).
template <int MS, int NR>
void micro_dots(const float* const* xs, int64_t k0, const float* w, int64_t KC, float* acc) {
#if defined(QWEN35_GGUF_AVX512)
  __m512 a[MS][NR];
  for (int s = 0; s < MS; ++s)
    for (int r = 0; r < NR; ++r) a[s][r] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (s * kGroupRows + r) * 16);
  for (int64_t k = 0; k < KC; k += 16) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_ps(w + r * KC + k);
    for (int s = 0; s < MS; ++s) {
      const __m512 xv = _mm512_loadu_ps(xs[s] + k0 + k);
      for (int r = 0; r < NR; ++r) a[s][r] = _mm512_fmadd_ps(xv, wv[r], a[s][r]);
    }
  }
  for (int s = 0; s < MS; ++s)
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(acc + (s * kGroupRows + r) * 16, a[s][r]);
#else
  for (int s = 0; s < MS; ++s)
    for (int r = 0; r < NR; ++r) {
      float* a = acc + (s * kGroupRows + r) * 16;
      if (k0 == 0) std::fill(a, a + 16, 0.f);
      for (int64_t k = 0; k < KC; ++k) a[k % 16] += xs[s][k0 + k] * w[r * KC + k];
    }
#endif
}

// out[j] = the 16 lanes of a[16 j, 16 j + 16) added up, j < n <= 16: sixteen partial sums reduced together (three
// shuffle-and-add levels), not one after the other.
inline void lanes_sums16(const float* a, int n, float* out) {
#if defined(QWEN35_GGUF_AVX512)
  __m512 t[8];
  for (int j = 0; j < 8; ++j) {
    const __m512 x = _mm512_loadu_ps(a + 32 * j), y = _mm512_loadu_ps(a + 32 * j + 16);
    t[j] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  __m512 u[4];
  for (int j = 0; j < 4; ++j) {
    const __m512d x = _mm512_castps_pd(t[2 * j]), y = _mm512_castps_pd(t[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), r);
#else
  for (int j = 0; j < n; ++j) {
    float v = 0.f;
    for (int l = 0; l < 16; ++l) v += a[16 * j + l];
    out[j] = v;
  }
#endif
}

// Weights widened kGroupRows rows x up to kChunk values at a time (8 KB, and the inputs' matching pieces stay in L1
// while the groups of inputs pass). Measured with 6 inputs a group (MoE bench shape, 2 threads, ms per layer):
// 256-value chunks 192-203, 512 166-186, 1024 (whole rows of the down projection) 190-230.
constexpr int64_t kChunk = 512;

// out[s * kGroupRows + i] = sum_k xs[s][k] * row_i[k] for inputs s < ns and the kGroupRows weight rows starting at
// `rows` (row stride m.row_bytes), widened kChunk values at a time. wbuf holds kGroupRows * kChunk floats, acc
// (ns + kGroupRows) * kGroupRows * 16. (Every weight here has a multiple of 32 rows: K of the other projection.)
void group_dots(const Matrix& m, const uint8_t* rows, int64_t ns, const float* const* xs, float* wbuf, float* acc,
                float* out) {
  // inputs in groups as even as possible of at most kGroupInputs (13 = 5 + 4 + 4, not 6 + 6 + 1)
  const int64_t ng = (ns + kGroupInputs - 1) / kGroupInputs;
  for (int64_t k0 = 0; k0 < m.K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, m.K - k0);  // a multiple of the block, so of 16
    const int64_t b0 = k0 / m.k->elems, nbc = kc / m.k->elems;
    for (int i = 0; i < kGroupRows; ++i) m.k->widen(rows + i * m.row_bytes + b0 * m.k->bytes, nbc, wbuf + i * kc);
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t s0 = g * ns / ng, ms = (g + 1) * ns / ng - s0;
      float* a = acc + s0 * kGroupRows * 16;
      switch (ms) {
        case 6: micro_dots<6, kGroupRows>(xs + s0, k0, wbuf, kc, a); break;
        case 5: micro_dots<5, kGroupRows>(xs + s0, k0, wbuf, kc, a); break;
        case 4: micro_dots<4, kGroupRows>(xs + s0, k0, wbuf, kc, a); break;
        case 3: micro_dots<3, kGroupRows>(xs + s0, k0, wbuf, kc, a); break;
        case 2: micro_dots<2, kGroupRows>(xs + s0, k0, wbuf, kc, a); break;
        default: micro_dots<1, kGroupRows>(xs + s0, k0, wbuf, kc, a); break;
      }
    }
  }
  // the partial sums (input s, row r) are vectors s * kGroupRows + r: reduced 16 at a time
  const int64_t nv = ns * kGroupRows;
  for (int64_t v0 = 0; v0 < nv; v0 += 16)
    lanes_sums16(acc + v0 * 16, static_cast<int>(std::min<int64_t>(16, nv - v0)), out + v0);
}

}  // namespace

// moe_experts_gguf for a prompt's tokens, grouped by expert: each chosen expert's weight rows are widened once, a
// few at a time into L1, and dotted with all of that expert's tokens (a prompt gives an expert ~T * k / E of them),
// instead of once per token. The same passes, bf16 roundings and summing order as moe_experts_gguf and its twin
// (ExpertDispatch); only the order of each dot product's fp32 sum differs.
torch::Tensor moe_experts_gguf_grouped(torch::Tensor x, torch::Tensor gu_q, int64_t gu_type, torch::Tensor dn_q,
                                       int64_t dn_type, int64_t I, torch::Tensor ids, torch::Tensor weights) {
  const char* fn = "moe_experts_gguf_grouped";
  const MoeInputs in = check_moe(fn, x, gu_q, gu_type, dn_q, dn_type, I, ids, weights);
  const int64_t M = in.M, H = in.H, k = in.k, E = in.E, P = in.P, gu_expert = in.gu_expert, dn_expert = in.dn_expert;
  const Matrix &gu = in.gu, &dn = in.dn;
  const int64_t* idp = in.idp;
  const at::BFloat16* wp = in.wp;
  // (always so: H and I are each a multiple of the other projection's block, 32 or 256 weights)
  TORCH_CHECK(H % kGroupRows == 0 && I % kGroupRows == 0, fn, ": H and I must be multiples of ", kGroupRows);
  auto out = torch::empty({M, H}, x.options());
  if (P == 0 || H == 0) return out.zero_();

  // the slots (m * k + j) of each expert, experts in id order
  std::vector<int64_t> first(E + 1, 0), slots(P);
  for (int64_t p = 0; p < P; ++p) ++first[idp[p] + 1];
  for (int64_t e = 0; e < E; ++e) first[e + 1] += first[e];
  {
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < P; ++p) slots[fill[idp[p]]++] = p;
  }
  const std::vector<float> xf =
      widen_rows_of(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, H, x.stride(0));

  // tasks: (expert, block of rows); an expert's block is one task whatever its token count
  auto tasks_of = [&](int64_t rows, int64_t block) {
    std::vector<std::pair<int64_t, int64_t>> t;
    for (int64_t e = 0; e < E; ++e)
      if (first[e + 1] > first[e])
        for (int64_t r0 = 0; r0 < rows; r0 += block) t.emplace_back(e, r0);
    return t;
  };

  // pass 1: gate and up rows, kGroupRows at a time, against all of the expert's tokens
  std::vector<uint16_t> act(static_cast<size_t>(P * I));
  constexpr int64_t kBlock1 = 32;
  const auto tasks1 = tasks_of(I, kBlock1);
  at::parallel_for(0, static_cast<int64_t>(tasks1.size()), 1, [&](int64_t a, int64_t b) {
    std::vector<float> wbuf(static_cast<size_t>(kGroupRows * kChunk)), acc;
    std::vector<const float*> xs;
    std::vector<float> g, u;
    for (int64_t t = a; t < b; ++t) {
      const int64_t e = tasks1[t].first, r0 = tasks1[t].second, r1 = std::min(I, r0 + kBlock1);
      const int64_t c = first[e + 1] - first[e];
      const int64_t* sl = slots.data() + first[e];
      xs.resize(c);
      for (int64_t s = 0; s < c; ++s) xs[s] = xf.data() + (sl[s] / k) * H;
      g.resize(c * kGroupRows);
      u.resize(c * kGroupRows);
      acc.resize((c + kGroupRows) * kGroupRows * 16);  // lanes_sums16 reads whole groups of vectors
      const uint8_t* w = gu.q + e * gu_expert;
      for (int64_t r = r0; r < r1; r += kGroupRows) {
        constexpr int nr = kGroupRows;
        group_dots(gu, w + r * gu.row_bytes, c, xs.data(), wbuf.data(), acc.data(), g.data());
        group_dots(gu, w + (I + r) * gu.row_bytes, c, xs.data(), wbuf.data(), acc.data(), u.data());
        for (int64_t s = 0; s < c; ++s)
          for (int i = 0; i < nr; ++i) {
            const float gv = round_bf16(g[s * nr + i]), uv = round_bf16(u[s * nr + i]);
            const float sg = round_bf16(gv / (1.f + std::exp(-gv)));
            act[sl[s] * I + r + i] = bits_bf16(sg * uv);
          }
      }
    }
  });

  // pass 2: down rows, kGroupRows at a time, against the expert's activations: y[p, n], rounded, weighted
  const std::vector<float> af = widen_rows_of(act.data(), P, I, I);
  std::vector<uint16_t> y(static_cast<size_t>(P * H));
  constexpr int64_t kBlock2 = 64;
  const auto tasks2 = tasks_of(H, kBlock2);
  at::parallel_for(0, static_cast<int64_t>(tasks2.size()), 1, [&](int64_t a, int64_t b) {
    std::vector<float> wbuf(static_cast<size_t>(kGroupRows * kChunk)), acc;
    std::vector<const float*> xs;
    std::vector<float> d;
    for (int64_t t = a; t < b; ++t) {
      const int64_t e = tasks2[t].first, n0 = tasks2[t].second, n1 = std::min(H, n0 + kBlock2);
      const int64_t c = first[e + 1] - first[e];
      const int64_t* sl = slots.data() + first[e];
      xs.resize(c);
      for (int64_t s = 0; s < c; ++s) xs[s] = af.data() + sl[s] * I;
      d.resize(c * kGroupRows);
      acc.resize((c + kGroupRows) * kGroupRows * 16);  // lanes_sums16 reads whole groups of vectors
      const uint8_t* w = dn.q + e * dn_expert;
      for (int64_t n = n0; n < n1; n += kGroupRows) {
        constexpr int nr = kGroupRows;
        group_dots(dn, w + n * dn.row_bytes, c, xs.data(), wbuf.data(), acc.data(), d.data());
        for (int64_t s = 0; s < c; ++s) {
          const float wgt = static_cast<float>(wp[sl[s]]);
          for (int i = 0; i < nr; ++i) y[sl[s] * H + n + i] = bits_bf16(round_bf16(d[s * nr + i]) * wgt);
        }
      }
    }
  });

  // pass 3: each token's experts summed in ascending id order, rounded to bf16 after each step (index_add_)
  const std::vector<int64_t> order = slots_by_expert(idp, M, k);
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < H; ++n) {
        float acc = 0.f;
        for (int64_t j = 0; j < k; ++j) acc = round_bf16(acc + bf16_to_float(y[order[m * k + j] * H + n]));
        op[m * H + n] = static_cast<at::BFloat16>(acc);
      }
  });
  return out;
}

// Registration: gemv.cpp's PYBIND11_MODULE binds these functions for the extension; a stand-alone build of this
// file alone (-DQWEN35_GGUF_STANDALONE, for working on it without rebuilding the rest) is a module of its own.
#if defined(QWEN35_GGUF_STANDALONE)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
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
#endif

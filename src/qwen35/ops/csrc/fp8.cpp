// Block-FP8 weights (float8_e4m3fn with one fp32 scale per 128x128 block, as in the Qwen3.5 "-FP8" checkpoints)
// on x86 CPUs: the decode GEMV, the MoE decode kernel, and the widening that prefill multiplies through oneDNN.
//
// Layout (the contract with qwen35/ops/quant/fp8.py): q uint8 [N, K] holds the e4m3fn bytes; scale fp32
// [S, ceil(K/128)] is a table of scale rows; srow int32 [N] names the scale row of each weight row:
//   W[n, k] = e4m3(q[n, k]) * scale[srow[n], k / 128].
// Matrices fused along rows (q|k|v) concatenate their tables, so a block of 128 rows need not start at a multiple
// of 128. N and K are any sizes.
//
// e4m3fn -> bf16 in registers. A byte s eeee mmm with e > 0 is 2^(e-7) * 1.mmm. Placed as the bf16 bits
// s 1 000 eeee mmm 0000 (exponent e + 128 where the true one is e + 120) it reads as 2^8 * value, and the 2^8 is
// taken out of the final sum (exact). With GFNI two gf2p8affineqb (a bit matrix applied to every byte) make the high and
// the low bytes of those bf16 and two byte unpacks pair them; without, word shifts and ternary logic do it. Bytes
// with e = 0 (zeros and subnormals m * 2^-9, normal numbers in bf16) come out wrong: a block holding any takes a
// fix-up through an 8-entry table. That is rare in real weights (|w| < amax / 28672 of the block), and never goes
// through a subnormal float, so it holds under FTZ+DAZ (the engine sets both, see gemv.cpp). Integer ops only:
// the same bits on Intel and AMD. The dot products then run on vdpbf16ps (exact products, fp32 sums), or on fp32
// FMAs of the widened values without AVX512-BF16; the activations are laid out once per call in the lane order of
// the decoded weights.
//
// Bytes 0x7F / 0xFF (NaN in e4m3fn; checkpoints hold none) read as +-480 here.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include "bf16_dot.h"
#include "moe_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QWEN35_FP8_AVX512 1
#endif

#ifndef QWEN35_FP8_PF
#define QWEN35_FP8_PF 4096
#endif

namespace {

using namespace qwen35_bf16;
using namespace qwen35_moe;

constexpr int64_t kBlock = 128;  // scale block along K
constexpr int64_t kChunk = 64;   // weights decoded per step
constexpr int kMaxM = 8;         // inputs computed together in registers
constexpr int kMaxRows = 32;     // inputs per call (larger batches go to linear_fp8_prefill)

// The exact value of every byte, built from integers (no subnormal intermediate), for the scalar code.
struct E4m3Table {
  float v[256];
  E4m3Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(static_cast<float>(8 + m), e - 10);
      v[b] = (b & 0x80) ? -mag : mag;
    }
  }
};
const E4m3Table kE4m3;


// Software prefetch into L2 this many bytes ahead of the weight stream (two lines per 128 weights). Streaming a
// batch-1 GEMV from DRAM on 2 threads (Xeon, 2-core VM): 1 KB ahead 17 GB/s, 2 KB 20, 4 KB 23, 8-16 KB no better.
constexpr int64_t kFp8PrefetchBytes = QWEN35_FP8_PF;
inline void prefetch_fp8(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kFp8PrefetchBytes, _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(p) + kFp8PrefetchBytes + 64, _MM_HINT_T1);
}

#if defined(QWEN35_FP8_AVX512)
// Lanes of w (bf16 bits of 2^8 * value, from decode64) whose byte had exponent 0 get their true value: m / 2 for
// the mantissa m (m * 2^-9 times 2^8), 0 for m = 0, with the sign kept.
inline __m512i fix_exponent0(__m512i w) {
  const __mmask32 z = _mm512_testn_epi16_mask(w, _mm512_set1_epi16(0x0780));
  // bf16 bits of 0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5 (lanes 8..31 unused)
  const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         0x4060, 0x4040, 0x4020, 0x4000, 0x3FC0, 0x3F80, 0x3F00, 0);
  // the mantissa m sits at bits 4..6 and the (zero) exponent above it: w >> 4 indexes the table
  const __m512i mag = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
  const __m512i fixed = _mm512_ternarylogic_epi32(mag, w, _mm512_set1_epi16(static_cast<int16_t>(0x8000)), 0xF8);
  return _mm512_mask_mov_epi16(w, z, fixed);  // 0xF8: A | (B & C)
}

// 64 e4m3 bytes -> bf16 bits of 2^8 * value in two vectors of 32 lanes; correct for exponents 1..15
// (fix_exponent0 mends the others). lane_weight(h, j): which of the 64 weights lane j of vector h holds.
#if defined(__GFNI__)
// Each output bit of gf2p8affineqb is the parity of the input bits its matrix row selects (row for bit i in byte
// 7 - i of the qword), xor a constant: high byte s 1 0 0 0 e3 e2 e1, low byte e0 m2 m1 m0 0 0 0 0.
inline void decode64_normal(__m512i v, __m512i& a, __m512i& b) {
  const __m512i hi = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020400000000080LL), 0x40);
  const __m512i lo = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x0000000001020408LL), 0);
  a = _mm512_unpacklo_epi8(lo, hi);  // per 128-bit lane: bytes 0..7 of that lane
  b = _mm512_unpackhi_epi8(lo, hi);  // bytes 8..15
}
constexpr int64_t lane_weight(int h, int64_t j) { return 16 * (j / 8) + 8 * h + j % 8; }
#else
// Each 16-bit lane holds [odd byte : even byte]; an arithmetic shift right by 4 puts the high byte's eeee mmm on
// bits 4..10 and copies its sign down to bit 11: keep bits 15 and 4..10 and set bit 14 (0xEA: (A & B) | C). The
// even bytes first move up one byte (within 128-bit lanes; what lands in the low byte is masked off).
inline void decode64_normal(__m512i v, __m512i& a, __m512i& b) {
  const __m512i keep = _mm512_set1_epi16(static_cast<int16_t>(0x87F0)), one = _mm512_set1_epi16(0x4000);
  a = _mm512_ternarylogic_epi32(_mm512_srai_epi16(_mm512_bslli_epi128(v, 1), 4), keep, one, 0xEA);  // even bytes
  b = _mm512_ternarylogic_epi32(_mm512_srai_epi16(v, 4), keep, one, 0xEA);                         // odd bytes
}
constexpr int64_t lane_weight(int h, int64_t j) { return 2 * j + h; }
#endif

inline __mmask64 exponent0(__m512i v) { return _mm512_testn_epi8_mask(v, _mm512_set1_epi8(0x78)); }

inline void decode64(__m512i v, __m512i& a, __m512i& b) {
  decode64_normal(v, a, b);
  if (__builtin_expect(exponent0(v) != 0, 0)) {
    a = fix_exponent0(a);
    b = fix_exponent0(b);
  }
}

inline __m512i load64(const uint8_t* p, int64_t left) {
  if (left >= kChunk) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi8((~__mmask64(0)) >> (kChunk - left), p);  // the tail reads as zero bytes
}

// Activations are bf16 in the lanes' order: per chunk of 64, those of vector a, then those of vector b.
using XT = uint16_t;
inline void prepare_chunk(const uint16_t* x, int64_t n, XT* out) {  // n <= 64 values, zero beyond
  for (int h = 0; h < 2; ++h)
    for (int64_t j = 0; j < 32; ++j) {
      const int64_t k = lane_weight(h, j);
      out[32 * h + j] = k < n ? x[k] : 0;
    }
}

#if defined(__AVX512BF16__)
struct Wide {
  __m512bh a, b;
};
inline Wide widen(__m512i a, __m512i b) { return {(__m512bh)a, (__m512bh)b}; }
inline __m512 dot_wide(__m512 acc, const Wide& w, const XT* x) {
  acc = _mm512_dpbf16_ps(acc, w.a, (__m512bh)_mm512_loadu_si512(x));
  return _mm512_dpbf16_ps(acc, w.b, (__m512bh)_mm512_loadu_si512(x + 32));
}
#else
// Without AVX512-BF16: each 32-bit lane i of a vector of bf16 holds lanes 2i and 2i + 1; a shift and a mask make
// fp32 of them, for the weights and the activations alike (kept in bf16: half the bytes to reread per row).
inline __m512 low_halves(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 high_halves(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
struct Wide {
  __m512 a0, a1, b0, b1;
};
inline Wide widen(__m512i a, __m512i b) { return {low_halves(a), high_halves(a), low_halves(b), high_halves(b)}; }
inline __m512 dot_wide(__m512 acc, const Wide& w, const XT* x) {
  const __m512i xa = _mm512_loadu_si512(x), xb = _mm512_loadu_si512(x + 32);
  acc = _mm512_fmadd_ps(w.a0, low_halves(xa), acc);
  acc = _mm512_fmadd_ps(w.a1, high_halves(xa), acc);
  acc = _mm512_fmadd_ps(w.b0, low_halves(xb), acc);
  return _mm512_fmadd_ps(w.b1, high_halves(xb), acc);
}
#endif

inline int64_t padded(int64_t K) { return (K + kChunk - 1) / kChunk * kChunk; }

inline Wide load_wide(const uint8_t* p, int64_t left) {
  __m512i a, b;
  decode64(load64(p, left), a, b);
  return widen(a, b);
}

// One weight row against one prepared input: per 128-block two independent chains, scaled and summed in fp32.
inline float row_fp8_m1(const uint8_t* w, const float* s, int64_t K, const XT* x) {
  __m512 tot = _mm512_setzero_ps();
  int64_t k = 0, b = 0;
  for (; k + kBlock <= K; k += kBlock, ++b) {
    prefetch_fp8(w + k);
    const __m512i v0 = _mm512_loadu_si512(w + k), v1 = _mm512_loadu_si512(w + k + kChunk);
    __m512i a0, b0, a1, b1;
    decode64_normal(v0, a0, b0);
    decode64_normal(v1, a1, b1);
    if (__builtin_expect(_kortestz_mask64_u8(exponent0(v0), exponent0(v1)) == 0, 0)) {  // one test per block
      a0 = fix_exponent0(a0), b0 = fix_exponent0(b0);
      a1 = fix_exponent0(a1), b1 = fix_exponent0(b1);
    }
    const Wide w0 = widen(a0, b0), w1 = widen(a1, b1);
    const __m512 p0 = dot_wide(_mm512_setzero_ps(), w0, x + k);
    const __m512 p1 = dot_wide(_mm512_setzero_ps(), w1, x + k + kChunk);
    tot = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), _mm512_set1_ps(s[b]), tot);
  }
  if (k < K) {
    __m512 a = dot_wide(_mm512_setzero_ps(), load_wide(w + k, K - k), x + k);
    if (k + kChunk < K) a = dot_wide(a, load_wide(w + k + kChunk, K - k - kChunk), x + k + kChunk);
    tot = _mm512_fmadd_ps(a, _mm512_set1_ps(s[b]), tot);
  }
  return _mm512_reduce_add_ps(tot) * (1.f / 256.f);
}

// One weight row against MM prepared inputs (row stride ldx), MM a compile-time count so that every accumulator
// stays in a register; each chunk is decoded once for all of them.
template <int MM>
inline void row_fp8_mm(const uint8_t* w, const float* s, int64_t K, const XT* x, int64_t ldx, float* out) {
  __m512 tot[MM];
  for (int m = 0; m < MM; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t k = 0, b = 0; k < K; k += kBlock, ++b) {
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t ke = std::min(K, k + kBlock);
    prefetch_fp8(w + k);
    for (int64_t c = k; c < ke; c += kChunk) {
      const Wide wv = load_wide(w + c, K - c);
      for (int m = 0; m < MM; ++m) acc[m] = dot_wide(acc[m], wv, x + m * ldx + c);
    }
    const __m512 sv = _mm512_set1_ps(s[b]);
    for (int m = 0; m < MM; ++m) tot[m] = _mm512_fmadd_ps(acc[m], sv, tot[m]);
  }
  for (int m = 0; m < MM; ++m) out[m] = _mm512_reduce_add_ps(tot[m]) * (1.f / 256.f);
}

inline void rows_fp8_mm(const uint8_t* w, const float* s, int64_t K, const XT* x, int64_t ldx, int64_t M,
                        float* out) {
  switch (M) {
    case 1: return row_fp8_mm<1>(w, s, K, x, ldx, out);
    case 2: return row_fp8_mm<2>(w, s, K, x, ldx, out);
    case 3: return row_fp8_mm<3>(w, s, K, x, ldx, out);
    case 4: return row_fp8_mm<4>(w, s, K, x, ldx, out);
    case 5: return row_fp8_mm<5>(w, s, K, x, ldx, out);
    case 6: return row_fp8_mm<6>(w, s, K, x, ldx, out);
    case 7: return row_fp8_mm<7>(w, s, K, x, ldx, out);
    default: return row_fp8_mm<8>(w, s, K, x, ldx, out);
  }
}

#else  // scalar path: fp32 activations in their own order, the byte table

using XT = float;
inline int64_t padded(int64_t K) { return K; }
inline void prepare_chunk(const uint16_t* x, int64_t n, XT* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = bf16_to_float(x[k]);
}

inline float row_fp8_m1(const uint8_t* w, const float* s, int64_t K, const XT* x) {
  float tot = 0.f;
  for (int64_t k = 0, b = 0; k < K; k += kBlock, ++b) {
    const int64_t ke = std::min(K, k + kBlock);
    float p = 0.f;
    for (int64_t kk = k; kk < ke; ++kk) p += x[kk] * kE4m3.v[w[kk]];
    tot += s[b] * p;
  }
  return tot;
}

inline void rows_fp8_mm(const uint8_t* w, const float* s, int64_t K, const XT* x, int64_t ldx, int64_t M,
                        float* out) {
  for (int64_t m = 0; m < M; ++m) out[m] = row_fp8_m1(w, s, K, x + m * ldx);
}

#endif

// Inputs (bf16 rows with stride ldx) in the layout the dot products read, zero-padded to whole chunks.
class Prepared {
 public:
  Prepared(const uint16_t* x, int64_t M, int64_t K, int64_t ldx) : ld_(padded(K)), buf_(M * padded(K)) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; k += kChunk)
        prepare_chunk(x + m * ldx + k, std::min<int64_t>(kChunk, K - k), buf_.data() + m * ld_ + k);
  }
  const XT* row(int64_t m) const { return buf_.data() + m * ld_; }
  int64_t ld() const { return ld_; }

 private:
  int64_t ld_;
  std::vector<XT> buf_;
};

// The rows' widened values, round_to_nearest_even_bf16(e4m3(q) * scale) with the product exact-then-rounded in
// fp32, as (q.float() * scale).to(torch.bfloat16) gives them (finite values: the products are never NaN).
inline void dequant_row(const uint8_t* w, const float* s, int64_t K, uint16_t* out) {
  int64_t k = 0;
#if defined(QWEN35_FP8_AVX512)
  // exact fp32 of each byte: a sign-extended byte shifted left by 20 has eeee mmm at the fp32 exponent's low 4
  // bits and the top 3 mantissa bits, the sign at bit 31; adding 120 to the exponent is the bias. Exponent-0 bytes
  // from a 16-entry table (m * 2^-9, normal in fp32).
  const __m512i keep = _mm512_set1_epi32(static_cast<int32_t>(0x87F00000u)), bias = _mm512_set1_epi32(120 << 23);
  const __m512i c78 = _mm512_set1_epi32(0x78), sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const float t = 1.f / 512.f;
  const __m512 table = _mm512_setr_ps(0.f, t, 2 * t, 3 * t, 4 * t, 5 * t, 6 * t, 7 * t, 0, 0, 0, 0, 0, 0, 0, 0);
  for (; k < K; k += 16) {
    const __mmask16 tail = k + 16 <= K ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512i sx = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail, w + k));
    __m512i bits = _mm512_add_epi32(_mm512_and_si512(_mm512_slli_epi32(sx, 20), keep), bias);
    const __mmask16 z = _mm512_testn_epi32_mask(sx, c78);
    if (__builtin_expect(z != 0, 0))
      bits = _mm512_mask_mov_epi32(
          bits, z, _mm512_or_si512(_mm512_castps_si512(_mm512_permutexvar_ps(sx, table)), _mm512_and_si512(sx, sign)));
    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(s[k / kBlock])));
    // round to nearest even: add 0x7FFF plus the kept half's lowest bit, keep the upper half
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, round),
                                                         _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
    _mm256_mask_storeu_epi16(out + k, tail, _mm512_cvtepi32_epi16(r));
  }
#endif
  for (; k < K; ++k) out[k] = bits_bf16(kE4m3.v[w[k]] * s[k / kBlock]);
}

// A checked FP8 weight: q [N, K] bytes, scale [S, KB] rows, srow [N].
struct Fp8Matrix {
  const uint8_t* q;
  const float* scale;
  const int32_t* srow;
  int64_t N, K, KB, S;
  const float* scale_row(int64_t n) const { return scale + static_cast<int64_t>(srow[n]) * KB; }
};

inline int64_t blocks(int64_t K) { return (K + kBlock - 1) / kBlock; }

bool is_fp8_bytes(const torch::Tensor& q) {
  return q.scalar_type() == at::kByte || q.scalar_type() == at::kFloat8_e4m3fn;
}

void check_srow(const char* fn, const char* name, const torch::Tensor& srow, int64_t rows, int64_t S) {
  TORCH_CHECK(srow.dim() == 1 && srow.scalar_type() == at::kInt && srow.is_contiguous() && srow.size(0) == rows,
              fn, ": ", name, " must be a contiguous int32 [", rows, "]");
  const int32_t* p = srow.data_ptr<int32_t>();
  int32_t lo = 0, hi = 0;  // a vectorised pass on every call (decode: ~0.1 us for 6K rows), the culprit only if bad
  for (int64_t n = 0; n < rows; ++n) lo = std::min(lo, p[n]), hi = std::max(hi, p[n]);
  if (lo < 0 || hi >= S)
    for (int64_t n = 0; n < rows; ++n)
      TORCH_CHECK(p[n] >= 0 && p[n] < S, fn, ": ", name, "[", n, "] = ", p[n], " is out of range of the ", S,
                  " scale rows");
}

Fp8Matrix check_fp8(const char* fn, const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& srow) {
  TORCH_CHECK(q.dim() == 2 && is_fp8_bytes(q), fn, ": q must be uint8 [N, K] (the bytes of float8_e4m3fn)");
  TORCH_CHECK(q.is_contiguous(), fn, ": q must be contiguous");
  const int64_t N = q.size(0), K = q.size(1), KB = blocks(K);
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && scale.is_contiguous(), fn,
              ": scale must be a contiguous fp32 [S, ceil(K/128)]");
  TORCH_CHECK(scale.size(1) == KB, fn, ": scale has ", scale.size(1), " columns but K=", K, " needs ", KB);
  check_srow(fn, "srow", srow, N, scale.size(0));
  return {static_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr<float>(), srow.data_ptr<int32_t>(), N, K, KB,
          scale.size(0)};
}

// Rows per task: at least 2 MB of fp8, so small matrices stay on one thread (see grain_rows in gemv.cpp: a
// barrier waits for every thread, and under load that wait is a scheduler time slice).
inline int64_t grain_rows_fp8(int64_t K) {
  return std::max<int64_t>(64, (int64_t{2} << 20) / std::max<int64_t>(K, 1));
}

// Widen rows [r0, r1) into out (row stride K), in parallel.
void dequant_rows(const Fp8Matrix& w, int64_t r0, int64_t r1, uint16_t* out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(w.K, 1));
  at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) dequant_row(w.q + n * w.K, w.scale_row(n), w.K, out + (n - r0) * w.K);
  });
}

}  // namespace

// x: bf16 [M <= 32, K] (row-major, any row stride); q, scale, srow: an FP8 weight [N, K] (see the top) ->
// fp32 [M, N], or bf16 (rounded to nearest even) with out_bf16. y[m, n] = sum over the 128-blocks b of
// scale[srow[n], b] * (sum_{k in b} x[m, k] * e4m3(q[n, k])): exact products, fp32 sums.
torch::Tensor gemv_fp8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor srow, bool out_bf16) {
  const Fp8Matrix w = check_fp8("gemv_fp8", q, scale, srow);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "gemv_fp8: x must be bf16 [M, K]");
  TORCH_CHECK(x.size(1) == w.K, "gemv_fp8: x has K=", x.size(1), " but q has K=", w.K);
  TORCH_CHECK(x.size(0) <= kMaxRows, "gemv_fp8: at most ", kMaxRows, " rows (linear_fp8_prefill takes more)");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "gemv_fp8: x must be row-major");
  const int64_t M = x.size(0), N = w.N, K = w.K;
  auto y = torch::empty({M, N}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  if (M == 0 || N == 0) return y;
  const Prepared xp(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, x.stride(0));
  float* yf = out_bf16 ? nullptr : y.data_ptr<float>();
  at::BFloat16* yb = out_bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
  auto store = [&](int64_t i, float v) {
    if (yb != nullptr) yb[i] = static_cast<at::BFloat16>(v);
    else yf[i] = v;
  };
  // one weight row after the other: a single sequential stream (see gemv_bf16)
  at::parallel_for(0, N, grain_rows_fp8(K), [&](int64_t n0, int64_t n1) {
    if (M == 1) {
      const XT* x0 = xp.row(0);
      for (int64_t n = n0; n < n1; ++n) store(n, row_fp8_m1(w.q + n * K, w.scale_row(n), K, x0));
      return;
    }
    float out[kMaxM];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {  // the weight row stays in L1 across the groups
        const int64_t mg = std::min<int64_t>(kMaxM, M - m0);
        rows_fp8_mm(w.q + n * K, w.scale_row(n), K, xp.row(m0), xp.ld(), mg, out);
        for (int64_t m = 0; m < mg; ++m) store((m0 + m) * N + n, out[m]);
      }
    }
  });
  return y;
}

// Rows [r0, r1) of an FP8 weight widened to bf16 [r1 - r0, K]: (e4m3(q) * scale in fp32).to(bf16).
torch::Tensor fp8_dequant_bf16(torch::Tensor q, torch::Tensor scale, torch::Tensor srow, int64_t r0, int64_t r1) {
  const Fp8Matrix w = check_fp8("fp8_dequant_bf16", q, scale, srow);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= w.N, "fp8_dequant_bf16: rows [", r0, ", ", r1, ") not within [0, ", w.N,
              "]");
  auto out = torch::empty({r1 - r0, w.K}, scale.options().dtype(at::kBFloat16));
  dequant_rows(w, r0, r1, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

// Tile of widened weight rows for linear_fp8_prefill, in bytes of bf16. Measured at M = 512 (2 threads, oneDNN
// without AMX): 1 MB tiles 1.7-3.7% over F.linear on the ready bf16 weight, 4 MB 0.8-1.3%, whole matrices 0.2-0.8%.
#ifndef QWEN35_FP8_TILE
#define QWEN35_FP8_TILE (4 << 20)
#endif

// x: bf16 [M, K] (any M) times an FP8 weight [N, K] -> bf16 [M, N]: tile after tile of weight rows widened to bf16
// (fp8_dequant_bf16's values) into one buffer and multiplied by oneDNN into their output columns; only a small
// matrix is widened whole.
torch::Tensor linear_fp8_prefill(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor srow) {
  const Fp8Matrix w = check_fp8("linear_fp8_prefill", q, scale, srow);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_fp8_prefill: x must be bf16 [M, K]");
  TORCH_CHECK(x.size(1) == w.K, "linear_fp8_prefill: x has K=", x.size(1), " but q has K=", w.K);
  const int64_t M = x.size(0), N = w.N, K = w.K;
  const int64_t fit = std::max<int64_t>(1, QWEN35_FP8_TILE / (2 * std::max<int64_t>(K, 1)));
  const int64_t tile = fit >= N ? N : std::max<int64_t>(64, fit / 64 * 64);
  auto buf = torch::empty({std::min(tile, N), K}, x.options());
  uint16_t* bp = reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>());
  if (tile >= N) {
    dequant_rows(w, 0, N, bp);
    return at::mm(x, buf.t());
  }
  auto out = torch::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t nt = std::min(tile, N - n0);
    dequant_rows(w, n0, n0 + nt, bp);
    auto cols = out.narrow(1, n0, nt);
    at::mm_out(cols, x, buf.narrow(0, 0, nt).t());
  }
  return out;
}

// The FP8 twin of moe_experts_bf16 (moe.cpp): the same passes, tasks and bf16 roundings, with gemv_fp8's
// block-scaled dot products. x [M, H] bf16; gu_q [E, 2I, H] uint8 (gate rows, then up rows), gu_scale
// [E, S1, ceil(H/128)] fp32, gu_srow [2I] int32 (the same for every expert); dn_q [E, H, I] uint8, dn_scale
// [E, S2, ceil(I/128)] fp32, dn_srow [H] int32; ids [M, k] int64, weights [M, k] bf16 -> [M, H] bf16.
torch::Tensor moe_experts_fp8(torch::Tensor x, torch::Tensor gu_q, torch::Tensor gu_scale, torch::Tensor gu_srow,
                              torch::Tensor dn_q, torch::Tensor dn_scale, torch::Tensor dn_srow, torch::Tensor ids,
                              torch::Tensor weights) {
  TORCH_CHECK(x.dim() == 2 && gu_q.dim() == 3 && dn_q.dim() == 3 && gu_scale.dim() == 3 && dn_scale.dim() == 3 &&
              ids.dim() == 2 && weights.sizes() == ids.sizes(),
              "moe_experts_fp8: x [M, H], gu_q [E, 2I, H], gu_scale [E, S1, ceil(H/128)], dn_q [E, H, I], "
              "dn_scale [E, S2, ceil(I/128)], ids and weights [M, k]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weights.scalar_type() == at::kBFloat16,
              "moe_experts_fp8: x and weights must be bf16");
  TORCH_CHECK(is_fp8_bytes(gu_q) && is_fp8_bytes(dn_q), "moe_experts_fp8: gu_q and dn_q must be uint8 (fp8 bytes)");
  TORCH_CHECK(gu_scale.scalar_type() == at::kFloat && dn_scale.scalar_type() == at::kFloat,
              "moe_experts_fp8: scales must be fp32");
  TORCH_CHECK(gu_q.is_contiguous() && dn_q.is_contiguous() && gu_scale.is_contiguous() && dn_scale.is_contiguous(),
              "moe_experts_fp8: expert weights and scales must be contiguous");
  const int64_t M = x.size(0), H = x.size(1), E = gu_q.size(0), I = gu_q.size(1) / 2, k = ids.size(1);
  const int64_t HB = blocks(H), IB = blocks(I);
  TORCH_CHECK(gu_q.size(1) == 2 * I && gu_q.size(2) == H && dn_q.size(0) == E && dn_q.size(1) == H &&
              dn_q.size(2) == I && ids.size(0) == M, "moe_experts_fp8: shapes disagree");
  TORCH_CHECK(gu_scale.size(0) == E && gu_scale.size(2) == HB && dn_scale.size(0) == E && dn_scale.size(2) == IB,
              "moe_experts_fp8: scale shapes disagree with the weights (want [E, S, ceil(K/128)])");
  const int64_t S1 = gu_scale.size(1), S2 = dn_scale.size(1);
  check_srow("moe_experts_fp8", "gu_srow", gu_srow, 2 * I, S1);
  check_srow("moe_experts_fp8", "dn_srow", dn_srow, H, S2);
  TORCH_CHECK(x.stride(1) == 1 || H <= 1, "moe_experts_fp8: x must be row-major");
  auto id = ids.to(at::kLong).contiguous();
  auto wt = weights.contiguous();
  const int64_t* idp = id.data_ptr<int64_t>();
  for (int64_t i = 0; i < M * k; ++i)
    TORCH_CHECK(idp[i] >= 0 && idp[i] < E, "moe_experts_fp8: expert id ", idp[i], " out of range [0, ", E, ")");
  const int64_t P = M * k;
  auto out = torch::empty({M, H}, x.options());
  if (P == 0 || H == 0) return out.zero_();
  const std::vector<int64_t> order = slots_by_expert(idp, M, k);
  const Prepared xp(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, H, x.stride(0));
  const uint8_t* gu = static_cast<const uint8_t*>(gu_q.data_ptr());
  const uint8_t* dn = static_cast<const uint8_t*>(dn_q.data_ptr());
  const float* gus = gu_scale.data_ptr<float>();
  const float* dns = dn_scale.data_ptr<float>();
  const int32_t* gsr = gu_srow.data_ptr<int32_t>();
  const int32_t* dsr = dn_srow.data_ptr<int32_t>();
  const at::BFloat16* wp = wt.data_ptr<at::BFloat16>();
  std::vector<uint16_t> act(static_cast<size_t>(P * I));

  // pass 1: gate then up rows of every chosen expert, in blocks of kRows rows (two sequential streams per task)
  constexpr int64_t kRows = 64;
  const int64_t nrb = (I + kRows - 1) / kRows;
  const int64_t grain1 = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(2 * kRows * H, 1));
  at::parallel_for(0, P * nrb, grain1, [&](int64_t a, int64_t b) {
    float gv[kRows];
    for (int64_t task = a; task < b; ++task) {
      const int64_t p = task / nrb, r0 = (task % nrb) * kRows, r1 = std::min(I, r0 + kRows);
      const XT* xr = xp.row(p / k);
      const uint8_t* w = gu + idp[p] * 2 * I * H;
      const float* s = gus + idp[p] * S1 * HB;
      for (int64_t r = r0; r < r1; ++r) gv[r - r0] = round_bf16(row_fp8_m1(w + r * H, s + gsr[r] * HB, H, xr));
      for (int64_t r = r0; r < r1; ++r) {
        const float g = gv[r - r0];
        const float u = round_bf16(row_fp8_m1(w + (I + r) * H, s + gsr[I + r] * HB, H, xr));
        const float sg = round_bf16(g / (1.f + std::exp(-g)));
        act[p * I + r] = bits_bf16(sg * u);
      }
    }
  });

  // pass 2: each chosen expert's down rows in order (one sequential stream per task): y[p, n], rounded, weighted
  const Prepared ap(act.data(), P, I, I);
  std::vector<float> y(static_cast<size_t>(P * H));
  const int64_t nnb = (H + kRows - 1) / kRows;
  const int64_t grain2 = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(kRows * I, 1));
  at::parallel_for(0, P * nnb, grain2, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t p = task / nnb, n0 = (task % nnb) * kRows, n1 = std::min(H, n0 + kRows);
      const float wgt = static_cast<float>(wp[p]);
      const uint8_t* w = dn + idp[p] * H * I;
      const float* s = dns + idp[p] * S2 * IB;
      for (int64_t n = n0; n < n1; ++n)
        y[p * H + n] = round_bf16(round_bf16(row_fp8_m1(w + n * I, s + dsr[n] * IB, I, ap.row(p))) * wgt);
    }
  });

  // pass 3: each token's experts summed in ascending id order, rounded to bf16 after each step (index_add_)
  sum_in_expert_order(y, order, M, k, H, out.data_ptr<at::BFloat16>());
  return out;
}

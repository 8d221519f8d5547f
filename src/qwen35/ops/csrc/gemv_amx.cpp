// The bf16 GEMV on Intel AMX tiles (Sapphire Rapids and later): y[m, n] = sum_k x[m, k] * W[n, k] for 1-32 rows.
//
// Why: with AVX512-BF16 the GEMV is compute-bound from 4 rows on (measured on 2 threads of an Intel Xeon with AMX,
// 0.8B shapes: ~160 GFLOP/s, [7168, 1024] at 16 rows 1.4 ms against 0.3 ms at one row), while one tdpbf16ps does
// 16 x 16 x 32 multiply-adds: here batch 16 runs at 0.45 ms, within 1.5x of one row, so throughput grows with the
// batch as the weights stream once for all rows.
//
// Layout: a block of 16 weight rows is the A tile (16 rows x 32 bf16, read in place with the row stride), x packed
// once per call as B tiles (pairs of k for each input row: AMX's VNNI layout), C[n][m] in fp32. Each output sums
// its products in one fixed order whatever the number of rows: chunks of 32 k, even chunks on one accumulator tile
// and odd chunks on another (two chains hide the tile unit's latency: one chain measured ~40 GB/s at one row
// against ~50 for the AVX512-BF16 kernel), the two added at the end. So a row's result does not depend on the
// batch (speculative decoding's verify rows equal decode rows), as long as every batch size takes this path: on
// an AMX host gemv_bf16 uses it for all of them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>
#include "gemv_amx.h"

namespace qwen35_amx {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)

namespace {

// The 64-byte operand of ldtilecfg (palette 1): bytes per row and rows of each of the 8 tile registers.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the tile data state only to processes that ask for it (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); a kernel too old to know it refuses, and gemv_bf16 then takes the AVX512-BF16 kernel.
bool permitted() {
  static bool ok = false;
  static std::once_flag once;
  std::call_once(once, [] {
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  });
  return ok;
}

// Tiles: 0/1 C of inputs 0-15 (even / odd chunks), 2/3 C of inputs 16-31, 4/5 A (even / odd chunk), 6/7 B. The
// tile intrinsics take the register number as a literal, hence macros.
#define QWEN35_AE 4
#define QWEN35_AO 5
#define QWEN35_B0 6
#define QWEN35_B1 7

// fp32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0: what static_cast<at::BFloat16> gives
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace

bool available() { return permitted(); }

bool gemv_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* yf,
               at::BFloat16* yb) {
  if (M < 1 || M > 32 || !permitted()) return false;
  const int64_t nch = (K + 31) / 32, kp = nch * 32;
  const int halves = M > 16 ? 2 : 1;
  const int mt[2] = {static_cast<int>(std::min<int64_t>(M, 16)), static_cast<int>(std::max<int64_t>(M - 16, 0))};
  // B tiles: for half h and chunk c, 16 rows (pairs of k) of mt[h] 32-bit pairs (one per input row), zero past K
  std::vector<uint32_t> xpack(static_cast<size_t>(halves) * nch * 256, 0);
  for (int h = 0; h < halves; ++h)
    for (int m = 0; m < mt[h]; ++m) {
      const uint16_t* xr = x + (h * 16 + m) * ldx;
      uint32_t* dst = xpack.data() + static_cast<size_t>(h) * nch * 256;
      for (int64_t k = 0; k < K; k += 2) {
        const uint32_t hi = k + 1 < K ? xr[k + 1] : 0;
        dst[(k / 32) * 16 * mt[h] + ((k % 32) / 2) * mt[h] + m] = xr[k] | (hi << 16);
      }
    }
  auto btile = [&](int h, int64_t c) { return xpack.data() + static_cast<size_t>(h) * nch * 256 + c * 16 * mt[h]; };
  const int64_t nblk = (N + 15) / 16;
  at::parallel_for(0, nblk, 8, [&](int64_t b0, int64_t b1) {
    TileConfig cfg;
    for (int h = 0; h < halves; ++h) {
      const uint16_t bytes = static_cast<uint16_t>(mt[h] * 4);
      cfg.rows[2 * h] = cfg.rows[2 * h + 1] = 16;
      cfg.colsb[2 * h] = cfg.colsb[2 * h + 1] = bytes;
    }
    cfg.rows[QWEN35_AE] = cfg.rows[QWEN35_AO] = 16;
    cfg.colsb[QWEN35_AE] = cfg.colsb[QWEN35_AO] = 64;
    // with one half the two B tiles serve the even and the odd chunk; with two, the two halves of one chunk
    cfg.rows[QWEN35_B0] = cfg.rows[QWEN35_B1] = 16;
    cfg.colsb[QWEN35_B0] = static_cast<uint16_t>(mt[0] * 4);
    cfg.colsb[QWEN35_B1] = static_cast<uint16_t>((halves == 2 ? mt[1] : mt[0]) * 4);
    _tile_loadconfig(&cfg);
    std::vector<uint16_t> stage;  // rows past N and values past K as zeros (a tile always reads 16 x 64 bytes)
    alignas(64) float ce[2][16][16], co[2][16][16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 16, nr = std::min<int64_t>(16, N - n0);
      const uint16_t* a = w + n0 * K;
      int64_t lda = K;
      if (nr < 16 || kp != K) {
        stage.assign(static_cast<size_t>(16) * kp, 0);
        for (int64_t r = 0; r < nr; ++r) std::memcpy(&stage[r * kp], a + r * K, K * 2);
        a = stage.data();
        lda = kp;
      }
      const int64_t stride = lda * 2;
      _tile_zero(0); _tile_zero(1);
      if (halves == 2) { _tile_zero(2); _tile_zero(3); }
      int64_t c = 0;
      if (halves == 1) {
        for (; c + 2 <= nch; c += 2) {
          _tile_loadd(QWEN35_AE, a + c * 32, stride);
          _tile_loadd(QWEN35_AO, a + (c + 1) * 32, stride);
          _tile_loadd(QWEN35_B0, btile(0, c), mt[0] * 4);
          _tile_loadd(QWEN35_B1, btile(0, c + 1), mt[0] * 4);
          _tile_dpbf16ps(0, QWEN35_AE, QWEN35_B0);
          _tile_dpbf16ps(1, QWEN35_AO, QWEN35_B1);
        }
      } else {
        for (; c + 2 <= nch; c += 2) {
          _tile_loadd(QWEN35_AE, a + c * 32, stride);
          _tile_loadd(QWEN35_AO, a + (c + 1) * 32, stride);
          _tile_loadd(QWEN35_B0, btile(0, c), mt[0] * 4);
          _tile_loadd(QWEN35_B1, btile(1, c), mt[1] * 4);
          _tile_dpbf16ps(0, QWEN35_AE, QWEN35_B0);
          _tile_dpbf16ps(2, QWEN35_AE, QWEN35_B1);
          _tile_loadd(QWEN35_B0, btile(0, c + 1), mt[0] * 4);
          _tile_loadd(QWEN35_B1, btile(1, c + 1), mt[1] * 4);
          _tile_dpbf16ps(1, QWEN35_AO, QWEN35_B0);
          _tile_dpbf16ps(3, QWEN35_AO, QWEN35_B1);
        }
      }
      if (c < nch) {  // an odd chunk count: the last chunk on the even chain
        _tile_loadd(QWEN35_AE, a + c * 32, stride);
        _tile_loadd(QWEN35_B0, btile(0, c), mt[0] * 4);
        _tile_dpbf16ps(0, QWEN35_AE, QWEN35_B0);
        if (halves == 2) {
          _tile_loadd(QWEN35_B1, btile(1, c), mt[1] * 4);
          _tile_dpbf16ps(2, QWEN35_AE, QWEN35_B1);
        }
      }
      _tile_stored(0, ce[0], 64); _tile_stored(1, co[0], 64);
      if (halves == 2) { _tile_stored(2, ce[1], 64); _tile_stored(3, co[1], 64); }
      // C is [weight row][input]: each input's 16 results are a column, gathered and written as one vector
      const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(16));
      const __mmask16 rows = nr == 16 ? __mmask16(0xffff) : __mmask16((1u << nr) - 1);
      for (int h = 0; h < halves; ++h)
        for (int m = 0; m < mt[h]; ++m) {
          const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(col, &ce[h][0][m], 4),
                                         _mm512_i32gather_ps(col, &co[h][0][m], 4));
          const int64_t o = (h * 16 + m) * N + n0;
          if (yb != nullptr) _mm256_mask_storeu_epi16(yb + o, rows, to_bf16(v));
          else _mm512_mask_storeu_ps(yf + o, rows, v);
        }
    }
    _tile_release();
  });
  return true;
}

#else  // no AMX: gemv_bf16 takes its other kernels

bool available() { return false; }

bool gemv_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, float*, at::BFloat16*) {
  return false;
}

#endif

}  // namespace qwen35_amx

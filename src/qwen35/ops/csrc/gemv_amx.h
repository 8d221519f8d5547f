// The bf16 GEMV on AMX tiles (csrc/gemv_amx.cpp), called by gemv.cpp's gemv_bf16.
#pragma once
#include <c10/util/BFloat16.h>
#include <cstdint>

namespace qwen35_amx {

// True where the CPU has AMX-BF16, the kernels were compiled for it and the OS lets this process use the tiles.
bool available();

// y[m, n] = sum_k x[m, k] * w[n, k] for M = 1..32 rows of x (bf16, row stride ldx) and w bf16 [N, K] contiguous,
// into yf (fp32 [M, N]) or, when yb is not null, yb (bf16, rounded to nearest even). False (nothing written)
// where AMX cannot be used.
bool gemv_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* yf,
               c10::BFloat16* yb);

}  // namespace qwen35_amx

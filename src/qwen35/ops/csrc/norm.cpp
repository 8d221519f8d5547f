// RMS norms in one pass per row (decode runs ~100 of them per token; as torch ops each is ~9 dispatches).
//   zero-centred:  y = x * rsqrt(mean(x^2) + eps) * (1 + w)                     (fp32 math, cast to x's dtype)
//   gated:         y = (w * rmsnorm(x).to(dtype)) * silu(gate)                   (the GDN output norm)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include "simd.h"

namespace {

template <typename T, typename W>
void rms_rows(const T* x, const W* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      T* yr = y + r * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) { float v = static_cast<float>(xr[d]); ss += v * v; }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (int64_t d = 0; d < D; ++d)
        yr[d] = static_cast<T>(static_cast<float>(xr[d]) * inv * (1.f + static_cast<float>(w[d])));
    }
  });
}

// v * v rounded to fp32 on its own, as the twin's x.pow(2) is, before it is summed. Written as `ss += v * v`, GCC
// (GNU C++ defaults to -ffp-contract=fast) fuses the scalar loop into an FMA (one rounding) but not its vectorised
// copy (vmulps, then in-order vaddss), and in gated_rows it picked between the two per row at run time, by alias
// checks of the scratch vectors against the gate row: a scratch vector that malloc placed within 64 bytes of the
// gate copy's first or last row sent that row down the FMA path, 1 ulp off in the whole row, so identical inputs
// gave different rows from one engine run to the next. The empty asm makes the product opaque: it cannot be fused.
inline float square_rounded(float v) {
  float s = v * v;
  asm("" : "+v"(s));
  return s;
}

template <typename T, typename W>
void gated_rows(const float* x, const T* gate, const W* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> xs(D), g(D);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      const T* gr = gate + r * D;
      T* yr = y + r * D;
      for (int64_t d = 0; d < D; ++d) {
        xs[d] = static_cast<float>(static_cast<T>(xr[d]));  // the twin takes x in the model dtype
        g[d] = static_cast<float>(gr[d]);
      }
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += square_rounded(xs[d]);
      int64_t d = 0;
#if defined(__AVX512F__)
      for (; d + 16 <= D; d += 16) _mm512_storeu_ps(g.data() + d, qwen35_simd::silu(_mm512_loadu_ps(g.data() + d)));
#elif defined(__AVX2__) && defined(__FMA__)
      for (; d + 8 <= D; d += 8) _mm256_storeu_ps(g.data() + d, qwen35_simd::silu8(_mm256_loadu_ps(g.data() + d)));
#endif
      for (; d < D; ++d) g[d] = g[d] / (1.f + std::exp(-g[d]));
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (d = 0; d < D; ++d) {
        const float normed = static_cast<float>(static_cast<T>(xs[d] * inv));  // the twin rounds here
        const float scaled = static_cast<float>(static_cast<T>(static_cast<float>(w[d]) * normed));
        yr[d] = static_cast<T>(scaled * g[d]);
      }
    }
  });
}

}  // namespace

// x [rows, D] (fp32 / bf16), w [D] -> same shape and dtype as x
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), "rms_norm: x [rows, D], w [D]");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t rows = xc.size(0), D = xc.size(1);
  if (xc.scalar_type() == at::kBFloat16 && wc.scalar_type() == at::kBFloat16) {
    rms_rows(xc.data_ptr<at::BFloat16>(), wc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, D, eps);
  } else {
    TORCH_CHECK(xc.scalar_type() == at::kFloat && wc.scalar_type() == at::kFloat, "rms_norm: fp32 or bf16");
    rms_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), rows, D, eps);
  }
  return y;
}

// x [rows, D] fp32 (the GDN output; rounded to the model dtype first, as the twin receives it), gate [rows, D]
// model dtype, w [D] model dtype -> model dtype
torch::Tensor rms_norm_gated(torch::Tensor x, torch::Tensor gate, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && gate.sizes() == x.sizes() && w.size(0) == x.size(1), "rms_norm_gated: shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "rms_norm_gated: x is fp32");
  auto xc = x.contiguous(), gc = gate.contiguous(), wc = w.contiguous();
  auto y = torch::empty_like(gc);
  const int64_t rows = xc.size(0), D = xc.size(1);
  if (gc.scalar_type() == at::kBFloat16 && wc.scalar_type() == at::kBFloat16) {
    gated_rows(xc.data_ptr<float>(), gc.data_ptr<at::BFloat16>(), wc.data_ptr<at::BFloat16>(),
               y.data_ptr<at::BFloat16>(), rows, D, eps);
  } else {
    TORCH_CHECK(gc.scalar_type() == at::kFloat && wc.scalar_type() == at::kFloat, "rms_norm_gated: fp32 or bf16");
    gated_rows(xc.data_ptr<float>(), gc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), rows, D, eps);
  }
  return y;
}

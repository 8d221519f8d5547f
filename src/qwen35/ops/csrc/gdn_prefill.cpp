// The chunked (UT/WY) gated delta rule over a prompt, one task per (sequence, value head), fp32 throughout.
//
// The same algebra as its twin `gated_delta_rule_chunked` (ops/gated_delta.py; see its docstring): per chunk of
// C tokens, with gamma the in-chunk cumulative log decay and S the state entering the chunk,
//     A[i, j] = beta_i (k_i . k_j) e^{gamma_i - gamma_j}  (j < i),   T = (I + A)^-1  (forward substitution)
//     u = T (beta v) - T (beta e^gamma k) S
//     o = (e^gamma q) S + ((q k^T) o decay) u
//     S = e^{gamma_C} S + (k e^{gamma_C - gamma})^T u
// The twin runs these as batched torch ops over every chunk and head (many passes over tens of MB at 4K tokens,
// plus a Python loop over chunks); here one head's whole sequence runs in one task whose working set (~250 KB,
// the state included) stays in L2, with the products on a register-blocked kernel (AVX-512, or AVX2 + FMA). A final partial
// chunk is padded with zero rows (g = 0: no decay, beta = 0: no write), as in the twin.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <immintrin.h>
#include "simd.h"

namespace {

using namespace qwen35_simd;

#if defined(__AVX512F__)
// c[MR x 16*NV] (+)= a[MR x K] @ b[K x 16*NV]; a(i, p) = a[i*ars + p*acs], b row p at b + p*ldb.
template <int MR, int NV>
inline void micro(int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
                  int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t p = 0; p < K; ++p) {
    __m512 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + p * ldb + 16 * j);
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * ars + p * acs]);
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
}

template <int NV>
inline void rows(int mr, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
                 int64_t ldc, bool accumulate) {
  switch (mr) {
    case 4: micro<4, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
    case 3: micro<3, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
    case 2: micro<2, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
    default: micro<1, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// The same with 8 lanes (AVX2 + FMA, no AVX-512): c[MR x 8*NV], MR * NV accumulators + NV b vectors + a broadcast
// within the 16 ymm registers.
template <int MR, int NV>
inline void micro8(int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
                   int64_t ldc, bool accumulate) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j)
      acc[r][j] = accumulate ? _mm256_loadu_ps(c + r * ldc + 8 * j) : _mm256_setzero_ps();
  for (int64_t p = 0; p < K; ++p) {
    __m256 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = _mm256_loadu_ps(b + p * ldb + 8 * j);
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_set1_ps(a[r * ars + p * acs]);
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(c + r * ldc + 8 * j, acc[r][j]);
}

template <int NV>
inline void rows8(int mr, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
                  int64_t ldc, bool accumulate) {
  switch (mr) {
    case 4: micro8<4, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
    case 3: micro8<3, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
    case 2: micro8<2, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
    default: micro8<1, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
  }
}
#endif

// c[M x N] (+)= a[M x K] @ b[K x N], N a multiple of 16 (checked by the caller).
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
#if defined(__AVX512F__)
  for (int64_t j0 = 0; j0 < N; j0 += 64) {
    const int64_t nv = std::min<int64_t>(4, (N - j0) / 16);
    for (int64_t i0 = 0; i0 < M; i0 += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, M - i0));
      const float* ai = a + i0 * ars;
      float* ci = c + i0 * ldc + j0;
      switch (nv) {
        case 4: rows<4>(mr, K, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate); break;
        case 3: rows<3>(mr, K, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate); break;
        case 2: rows<2>(mr, K, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate); break;
        default: rows<1>(mr, K, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate); break;
      }
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  for (int64_t j0 = 0; j0 < N; j0 += 24) {
    const int64_t nv = std::min<int64_t>(3, (N - j0) / 8);
    for (int64_t i0 = 0; i0 < M; i0 += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, M - i0));
      const float* ai = a + i0 * ars;
      float* ci = c + i0 * ldc + j0;
      switch (nv) {
        case 3: rows8<3>(mr, K, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate); break;
        case 2: rows8<2>(mr, K, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate); break;
        default: rows8<1>(mr, K, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate); break;
      }
    }
  }
#else
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float s = accumulate ? c[i * ldc + j] : 0.f;
      for (int64_t p = 0; p < K; ++p) s += a[i * ars + p * acs] * b[p * ldb + j];
      c[i * ldc + j] = s;
    }
#endif
}

template <typename V>
inline float f32(V v) { return static_cast<float>(v); }

struct Strides {
  int64_t q_t, q_h, k_t, k_h, v_t, v_h, g_t, g_h, b_t, b_h, o_t, o_h;  // per batch row: *_b below
  int64_t q_b, k_b, v_b, g_b, b_b, o_b;
};

// dst = src (widened to fp32), then, with `eps` >= 0, scaled to unit L2 norm times `scale` as the twin's
// l2_normalize does: x * rsqrt(|x|^2 + eps) * scale, the norm squared after its square root as torch rounds it.
template <typename QK>
inline void load_row(const QK* src, int64_t n, float eps, float scale, float* dst) {
  float ss = 0.f;
  for (int64_t d = 0; d < n; ++d) {
    dst[d] = f32(src[d]);
    ss += dst[d] * dst[d];
  }
  if (eps < 0.f) return;
  const float nrm = std::sqrt(ss);
  const float f = (1.f / std::sqrt(nrm * nrm + eps)) * scale;
  for (int64_t d = 0; d < n; ++d) dst[d] *= f;
}

// One (sequence, value head) over T tokens: reads its q/k head (`kh`) and value head (`h`), updates S in place.
template <typename QK, typename V>
void head(const QK* q, const QK* k, const V* v, const float* g, const float* beta, float* S, float* out,
          const Strides& st, int64_t T, int64_t C, int64_t dk, int64_t dv, float eps, float q_scale) {
  std::vector<float> buf(static_cast<size_t>(C * (5 * dk + 3 * dv + 3 * C + 2)));
  float* Q = buf.data();        // [C, dk]  q, then e^gamma q
  float* Kr = Q + C * dk;       // [C, dk]  k
  float* KT = Kr + C * dk;      // [dk, C]  k^T, then (k e^{gamma_C - gamma})^T
  float* KB = KT + dk * C;      // [C, dk]  -beta e^gamma k
  float* Vb = KB + C * dk;      // [C, dv]  beta v
  float* U = Vb + C * dv;       // [C, dv]  T beta v, then u
  float* O = U + C * dv;        // [C, dv]
  float* Wn = O + C * dv;       // [C, dk]  -T beta e^gamma k
  float* A = Wn + C * dk;       // [C, C]   k k^T, then the strictly lower A
  float* P = A + C * C;         // [C, C]   q k^T, then masked by the decay
  float* Ti = P + C * C;        // [C, C]   (I + A)^-1
  float* gam = Ti + C * C;      // [C]
  float* bet = gam + C;         // [C]

  for (int64_t t0 = 0; t0 < T; t0 += C) {
    const int64_t L = std::min(C, T - t0);
    // load the chunk (zero rows past the end)
    float run = 0.f;
    for (int64_t i = 0; i < C; ++i) {
      float* qi = Q + i * dk;
      float* ki = Kr + i * dk;
      float* vi = Vb + i * dv;
      if (i < L) {
        const int64_t t = t0 + i;
        const V* vs = v + t * st.v_t;
        load_row(q + t * st.q_t, dk, eps, q_scale, qi);
        load_row(k + t * st.k_t, dk, eps, 1.f, ki);
        const float b = beta[t * st.b_t];
        for (int64_t d = 0; d < dv; ++d) vi[d] = b * f32(vs[d]);
        run += g[t * st.g_t];
        bet[i] = b;
      } else {
        std::fill(qi, qi + dk, 0.f);
        std::fill(ki, ki + dk, 0.f);
        std::fill(vi, vi + dv, 0.f);
        bet[i] = 0.f;
      }
      gam[i] = run;
    }
    for (int64_t i = 0; i < C; ++i)
      for (int64_t d = 0; d < dk; ++d) KT[d * C + i] = Kr[i * dk + d];
    gemm(C, C, dk, Kr, dk, 1, KT, C, A, C, false);  // k k^T
    gemm(C, C, dk, Q, dk, 1, KT, C, P, C, false);   // q k^T
    for (int64_t i = 0; i < C; ++i) {  // decay[i, j] = e^{gamma_i - gamma_j} <= 1 for j <= i, else 0
      float* pi = P + i * C;
      float* ai = A + i * C;
      int64_t j = 0;
#if defined(__AVX512F__)
      const __m512 gi = _mm512_set1_ps(gam[i]), bi = _mm512_set1_ps(bet[i]);
      for (; j + 16 <= C; j += 16) {
        const __mmask16 incl = static_cast<__mmask16>(
            _mm512_cmp_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)),
                                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
                                  _mm512_set1_epi32(static_cast<int>(i)), _MM_CMPINT_LE));
        const __mmask16 strict = incl & ~static_cast<__mmask16>(j <= i && i < j + 16 ? 1u << (i - j) : 0u);
        const __m512 decay = _mm512_maskz_mov_ps(incl, exp_neg(_mm512_min_ps(
            _mm512_sub_ps(gi, _mm512_loadu_ps(gam + j)), _mm512_setzero_ps())));
        _mm512_storeu_ps(pi + j, _mm512_mul_ps(_mm512_loadu_ps(pi + j), decay));
        _mm512_storeu_ps(ai + j, _mm512_maskz_mul_ps(strict, _mm512_mul_ps(bi, _mm512_loadu_ps(ai + j)), decay));
      }
#endif
      for (; j < C; ++j) {
        const float decay = j <= i ? std::exp(gam[i] - gam[j]) : 0.f;
        pi[j] *= decay;
        ai[j] = j < i ? bet[i] * ai[j] * decay : 0.f;
      }
    }
    // Ti = (I + A)^-1, row by row: Ti[i, :i] = -(A[i, :i] + sum_{m<i} A[i, m] Ti[m, :i])
    std::fill(Ti, Ti + C * C, 0.f);
    for (int64_t i = 0; i < C; ++i) {
      float* ti = Ti + i * C;
      for (int64_t m = 0; m < i; ++m) {
        const float aim = A[i * C + m];
        const float* tm = Ti + m * C;
        for (int64_t j = 0; j < m; ++j) ti[j] -= aim * tm[j];
        ti[m] -= aim;
      }
      ti[i] = 1.f;
    }
    for (int64_t i = 0; i < C; ++i) {
      const float s = -bet[i] * std::exp(gam[i]);
      const float e = std::exp(gam[i]);
      for (int64_t d = 0; d < dk; ++d) {
        KB[i * dk + d] = s * Kr[i * dk + d];
        Q[i * dk + d] *= e;
      }
    }
    gemm(C, dv, C, Ti, C, 1, Vb, dv, U, dv, false);   // T beta v
    gemm(C, dk, C, Ti, C, 1, KB, dk, Wn, dk, false);  // -T beta e^gamma k
    const float last = gam[C - 1];
    for (int64_t i = 0; i < C; ++i) bet[i] = std::exp(last - gam[i]);  // beta is used up: e^{gamma_C - gamma}
    for (int64_t d = 0; d < dk; ++d)
      for (int64_t i = 0; i < C; ++i) KT[d * C + i] *= bet[i];
    // the sequential part
    gemm(C, dv, dk, Wn, dk, 1, S, dv, U, dv, true);   // u = T beta v - W S
    gemm(C, dv, dk, Q, dk, 1, S, dv, O, dv, false);   // o = e^gamma q S
    gemm(C, dv, C, P, C, 1, U, dv, O, dv, true);      //   + (q k^T o decay) u
    const float chunk_decay = std::exp(last);
    for (int64_t i = 0; i < dk * dv; ++i) S[i] *= chunk_decay;
    gemm(dk, dv, C, KT, C, 1, U, dv, S, dv, true);    // S += (k e^{gamma_C - gamma})^T u
    for (int64_t i = 0; i < L; ++i) std::copy(O + i * dv, O + (i + 1) * dv, out + (t0 + i) * st.o_t);
  }
}

template <typename QK, typename V>
void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& g,
         const torch::Tensor& beta, torch::Tensor& state, torch::Tensor& out, int64_t C, float eps, float q_scale) {
  const int64_t B = q.size(0), T = q.size(1), Hk = q.size(2), dk = q.size(3);
  const int64_t H = v.size(2), dv = v.size(3), rep = H / Hk;
  Strides st{q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), g.stride(1),
             g.stride(2), beta.stride(1), beta.stride(2), out.stride(1), out.stride(2),
             q.stride(0), k.stride(0), v.stride(0), g.stride(0), beta.stride(0), out.stride(0)};
  const QK* qp = q.data_ptr<QK>();
  const QK* kp = k.data_ptr<QK>();
  const V* vp = v.data_ptr<V>();
  const float* gp = g.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H, kh = h / rep;
      head<QK, V>(qp + b * st.q_b + kh * st.q_h, kp + b * st.k_b + kh * st.k_h, vp + b * st.v_b + h * st.v_h,
              gp + b * st.g_b + h * st.g_h, bp + b * st.b_b + h * st.b_h, sp + (b * H + h) * dk * dv,
              op + b * st.o_b + h * st.o_h, st, T, C, dk, dv, eps, q_scale);
    }
  });
}

}  // namespace

// q, k [B, T, Hk, dk] fp32 or bf16 (value head h reads q/k head h / (H/Hk)): with l2norm_eps >= 0 they are
// normalised here (q also times q_scale), else taken as they are (normalised and scaled by the caller);
// v [B, T, H, dv] fp32 or bf16; g, beta [B, T, H] fp32; state [B, H, dk, dv] fp32, contiguous, updated in place
// (zeros for a fresh sequence); out [B, T, H, dv] fp32, written. Innermost dims must be contiguous; dv, dk and
// chunk_size multiples of 16.
void gdn_chunked_prefill(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g, torch::Tensor beta,
                         torch::Tensor state, torch::Tensor out, int64_t chunk_size, double l2norm_eps,
                         double q_scale) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && g.dim() == 3 && beta.sizes() == g.sizes(),
              "gdn_chunked_prefill: shapes");
  const int64_t B = q.size(0), T = q.size(1), Hk = q.size(2), dk = q.size(3), H = v.size(2), dv = v.size(3);
  TORCH_CHECK(v.size(0) == B && v.size(1) == T && g.size(0) == B && g.size(1) == T && g.size(2) == H &&
              H % Hk == 0, "gdn_chunked_prefill: batch, length or head counts differ");
  TORCH_CHECK(state.is_contiguous() && state.dim() == 4 && state.size(0) == B && state.size(1) == H &&
              state.size(2) == dk && state.size(3) == dv && state.scalar_type() == at::kFloat,
              "gdn_chunked_prefill: state must be contiguous fp32 [B, H, dk, dv]");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == B && out.size(1) == T && out.size(2) == H && out.size(3) == dv &&
              out.scalar_type() == at::kFloat, "gdn_chunked_prefill: out must be fp32 [B, T, H, dv]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && g.scalar_type() == at::kFloat && beta.scalar_type() == at::kFloat,
              "gdn_chunked_prefill: q and k share a dtype; g and beta must be fp32");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && out.stride(3) == 1,
              "gdn_chunked_prefill: the head dims must be contiguous");
  TORCH_CHECK(dk % 16 == 0 && dv % 16 == 0 && chunk_size % 16 == 0 && chunk_size > 0,
              "gdn_chunked_prefill: dk, dv and chunk_size must be multiples of 16");
  const bool qk_bf16 = q.scalar_type() == at::kBFloat16, v_bf16 = v.scalar_type() == at::kBFloat16;
  TORCH_CHECK((qk_bf16 || q.scalar_type() == at::kFloat) && (v_bf16 || v.scalar_type() == at::kFloat),
              "gdn_chunked_prefill: q, k and v must be fp32 or bf16");
  const float eps = static_cast<float>(l2norm_eps), qs = static_cast<float>(q_scale);
  if (qk_bf16 && v_bf16) run<at::BFloat16, at::BFloat16>(q, k, v, g, beta, state, out, chunk_size, eps, qs);
  else if (qk_bf16) run<at::BFloat16, float>(q, k, v, g, beta, state, out, chunk_size, eps, qs);
  else if (v_bf16) run<float, at::BFloat16>(q, k, v, g, beta, state, out, chunk_size, eps, qs);
  else run<float, float>(q, k, v, g, beta, state, out, chunk_size, eps, qs);
}

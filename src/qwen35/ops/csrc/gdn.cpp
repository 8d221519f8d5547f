// One Gated DeltaNet decode step for B sequences, fused and in place on the state pools.
//
// Per sequence: causal conv over (window, new input) + SiLU, split into q | k | v, L2-normalise q and k
// (q also scaled by dk^-0.5), beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias), then per value
// head (its q/k head = h / (Hv / Hk)):
//     S = exp(g) S;  u = beta (v - S^T k);  S = S + k u^T;  o = S^T q
// The conv window and the fp32 state are read and written where they live in the pools (no gather or
// scatter), and the ~40 small torch ops of the twin (model/deltanet.py) become one call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include "simd.h"
#include <vector>

namespace {

using namespace qwen35_simd;

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

// Conv over (window, new input) for channels [c0, c0 + n) of one sequence, then SiLU, with the twin's
// roundings (conv output and SiLU output rounded to the model dtype). Reads the window, does not move it.
template <typename T>
void conv_silu(const T* x, const T* win, bool fresh, const T* conv_w, int64_t K, int64_t c0, int64_t n, float* y) {
  const int64_t W = K - 1;
  for (int64_t c = c0; c < c0 + n; ++c) {
    const T* kc = conv_w + c * K;
    float acc = f32(x[c]) * f32(kc[W]);
    if (!fresh)
      for (int64_t j = 0; j < W; ++j) acc += f32(win[c * W + j]) * f32(kc[j]);
    y[c - c0] = f32(static_cast<T>(acc));
  }
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, silu(_mm512_loadu_ps(y + i)));
#elif defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, silu8(_mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] = y[i] / (1.f + std::exp(-y[i]));
  for (i = 0; i < n; ++i) y[i] = f32(static_cast<T>(y[i]));
}

// One value head: S = decay S; u = beta (v - S^T k); S += k u^T; o = S^T q. S is [dk, dv] row-major.
void delta_step(float* S, const float* q, const float* k, const float* v, float beta, float decay, bool fresh,
                int64_t dk, int64_t dv, float* o) {
#if defined(__AVX512F__)
  if (dv == 128) {  // every row of S in 8 registers' width: pred, u and o stay in registers
    __m512 acc[8], dec = _mm512_set1_ps(decay);
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    if (fresh) {
      std::fill(S, S + dk * dv, 0.f);
    } else {
      for (int64_t r = 0; r < dk; ++r) {
        float* row = S + r * dv;
        const __m512 kr = _mm512_set1_ps(k[r]);
        for (int j = 0; j < 8; ++j) {
          const __m512 sv = _mm512_mul_ps(_mm512_loadu_ps(row + 16 * j), dec);
          _mm512_storeu_ps(row + 16 * j, sv);
          acc[j] = _mm512_fmadd_ps(kr, sv, acc[j]);
        }
      }
    }
    __m512 u[8];
    const __m512 bv = _mm512_set1_ps(beta);
    for (int j = 0; j < 8; ++j) {
      u[j] = _mm512_mul_ps(bv, _mm512_sub_ps(_mm512_loadu_ps(v + 16 * j), acc[j]));
      acc[j] = _mm512_setzero_ps();
    }
    for (int64_t r = 0; r < dk; ++r) {
      float* row = S + r * dv;
      const __m512 kr = _mm512_set1_ps(k[r]), qr = _mm512_set1_ps(q[r]);
      for (int j = 0; j < 8; ++j) {
        const __m512 sv = _mm512_fmadd_ps(kr, u[j], _mm512_loadu_ps(row + 16 * j));
        _mm512_storeu_ps(row + 16 * j, sv);
        acc[j] = _mm512_fmadd_ps(qr, sv, acc[j]);
      }
    }
    for (int j = 0; j < 8; ++j) _mm512_storeu_ps(o + 16 * j, acc[j]);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (dv % 32 == 0) {
    // A strip of 32 columns at a time (4 registers of pred / u / o): the strip's part of S (16 KB at dk = 128) stays
    // in L1 between the two passes. Per column the operations of the AVX-512 path, in the same order.
    if (fresh) std::fill(S, S + dk * dv, 0.f);
    const __m256 dec = _mm256_set1_ps(decay), bv = _mm256_set1_ps(beta);
    for (int64_t c0 = 0; c0 < dv; c0 += 32) {
      __m256 acc[4], u[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
      if (!fresh)
        for (int64_t r = 0; r < dk; ++r) {
          float* row = S + r * dv + c0;
          const __m256 kr = _mm256_set1_ps(k[r]);
          for (int j = 0; j < 4; ++j) {
            const __m256 sv = _mm256_mul_ps(_mm256_loadu_ps(row + 8 * j), dec);
            _mm256_storeu_ps(row + 8 * j, sv);
            acc[j] = _mm256_fmadd_ps(kr, sv, acc[j]);
          }
        }
      for (int j = 0; j < 4; ++j) {
        u[j] = _mm256_mul_ps(bv, _mm256_sub_ps(_mm256_loadu_ps(v + c0 + 8 * j), acc[j]));
        acc[j] = _mm256_setzero_ps();
      }
      for (int64_t r = 0; r < dk; ++r) {
        float* row = S + r * dv + c0;
        const __m256 kr = _mm256_set1_ps(k[r]), qr = _mm256_set1_ps(q[r]);
        for (int j = 0; j < 4; ++j) {
          const __m256 sv = _mm256_fmadd_ps(kr, u[j], _mm256_loadu_ps(row + 8 * j));
          _mm256_storeu_ps(row + 8 * j, sv);
          acc[j] = _mm256_fmadd_ps(qr, sv, acc[j]);
        }
      }
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + c0 + 8 * j, acc[j]);
    }
    return;
  }
#endif
  std::vector<float> pred(dv, 0.f), u(dv);
  for (int64_t r = 0; r < dk; ++r) {
    float* row = S + r * dv;
    if (fresh) {
      for (int64_t c = 0; c < dv; ++c) row[c] = 0.f;
    } else {
      for (int64_t c = 0; c < dv; ++c) { row[c] *= decay; pred[c] += k[r] * row[c]; }
    }
  }
  for (int64_t c = 0; c < dv; ++c) u[c] = beta * (v[c] - pred[c]);
  for (int64_t c = 0; c < dv; ++c) o[c] = 0.f;
  for (int64_t r = 0; r < dk; ++r) {
    float* row = S + r * dv;
    for (int64_t c = 0; c < dv; ++c) { row[c] += k[r] * u[c]; o[c] += q[r] * row[c]; }
  }
}

template <typename T>
void run(const T* mixed, const T* conv_w, T* conv_pool, float* state_pool, const int64_t* slots, const int64_t* src,
         const bool* fresh, const T* a, const T* b, const float* A_log, const float* dt_bias, float* out,
         int64_t B, int64_t C, int64_t K, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, int64_t conv_slot,
         int64_t state_slot) {
  const int64_t key_dim = Hk * dk, W = K - 1, rep = Hv / Hk;
  // One parallel region, one task per (sequence, value head): its conv channels (its q/k head's too:
  // recomputed by the rep value heads sharing it, which is cheaper than a second barrier), the norms and the
  // delta rule on its state. The windows are read here and moved afterwards, so no task sees another's write.
  const int64_t tasks = B * Hv;
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, tasks, std::max<int64_t>(1, (tasks + threads - 1) / threads), [&](int64_t i0, int64_t i1) {
    std::vector<float> q(dk), k(dk), v(dv);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = i / Hv, h = i % Hv, kh = h / rep;
      const T* x = mixed + bi * C;
      const T* win = conv_pool + src[bi] * conv_slot;
      conv_silu(x, win, fresh[bi], conv_w, K, kh * dk, dk, q.data());
      conv_silu(x, win, fresh[bi], conv_w, K, key_dim + kh * dk, dk, k.data());
      conv_silu(x, win, fresh[bi], conv_w, K, 2 * key_dim + h * dv, dv, v.data());
      float sq = 0.f, sk = 0.f;
      for (int64_t d = 0; d < dk; ++d) { sq += q[d] * q[d]; sk += k[d] * k[d]; }
      const float iq = 1.f / std::sqrt(sq + 1e-6f) / std::sqrt(static_cast<float>(dk));
      const float ik = 1.f / std::sqrt(sk + 1e-6f);
      for (int64_t d = 0; d < dk; ++d) { q[d] *= iq; k[d] *= ik; }
      const float beta = 1.f / (1.f + std::exp(-f32(b[bi * Hv + h])));
      const float sp_in = f32(a[bi * Hv + h]) + dt_bias[h];
      const float softplus = sp_in > 20.f ? sp_in : std::log1p(std::exp(sp_in));
      const float decay = std::exp(-std::exp(A_log[h]) * softplus);
      float* S = state_pool + slots[bi] * state_slot + h * dk * dv;
      if (src[bi] != slots[bi] && !fresh[bi])  // a chained row: continue from the state the row before left
        std::copy_n(state_pool + src[bi] * state_slot + h * dk * dv, dk * dv, S);
      delta_step(S, q.data(), k.data(), v.data(), beta, decay, fresh[bi], dk, dv, out + (bi * Hv + h) * dv);
    }
  });
  // move every window on by one token (the oldest input drops out, the new one enters)
  for (int64_t bi = 0; bi < B; ++bi) {
    T* win = conv_pool + slots[bi] * conv_slot;
    const T* from = conv_pool + src[bi] * conv_slot;  // the same window, or the one the row before left
    const T* x = mixed + bi * C;
    for (int64_t c = 0; c < C && W > 0; ++c) {
      T* wc = win + c * W;
      const T* fc = from + c * W;
      for (int64_t j = 0; j + 1 < W; ++j) wc[j] = fresh[bi] ? static_cast<T>(0) : fc[j + 1];
      wc[W - 1] = x[c];
    }
  }
}

}  // namespace

// mixed [B, C] and conv_w [C, K] and conv_pool [slots, C, K-1] in the model dtype (fp32 or bf16);
// state_pool [slots, Hv, dk, dv] fp32 (each slot contiguous; the slots may lie apart: the cache's regions); slots int64 [B]; fresh bool [B]; a, b [B, Hv] model dtype;
// A_log, dt_bias [Hv] fp32. Returns o [B, Hv, dv] fp32; updates the window and the state in place.
torch::Tensor gdn_decode_step(torch::Tensor mixed, torch::Tensor conv_w, torch::Tensor conv_pool,
                              torch::Tensor state_pool, torch::Tensor slots, torch::Tensor fresh, torch::Tensor a,
                              torch::Tensor b, torch::Tensor A_log, torch::Tensor dt_bias, int64_t num_k_heads,
                              int64_t head_k_dim, c10::optional<torch::Tensor> src_slots) {
  TORCH_CHECK(mixed.dim() == 2 && conv_w.dim() == 2 && conv_pool.dim() == 3 && state_pool.dim() == 4,
              "gdn_decode_step: shapes");
  TORCH_CHECK(mixed.is_contiguous() && conv_w.is_contiguous() && conv_pool[0].is_contiguous() &&
              state_pool[0].is_contiguous() && a.is_contiguous() && b.is_contiguous(), "gdn_decode_step: contiguous");
  TORCH_CHECK(state_pool.scalar_type() == at::kFloat, "gdn_decode_step: the state is fp32");
  TORCH_CHECK(mixed.scalar_type() == conv_w.scalar_type() && mixed.scalar_type() == conv_pool.scalar_type() &&
              a.scalar_type() == mixed.scalar_type() && b.scalar_type() == mixed.scalar_type(),
              "gdn_decode_step: mixed, conv weight, window, a, b share the model dtype");
  const int64_t B = mixed.size(0), C = mixed.size(1), K = conv_w.size(1);
  const int64_t Hv = state_pool.size(1), dk = state_pool.size(2), dv = state_pool.size(3);
  TORCH_CHECK(dk == head_k_dim && C == 2 * num_k_heads * dk + Hv * dv && Hv % num_k_heads == 0,
              "gdn_decode_step: head layout");
  auto s64 = slots.to(at::kLong).contiguous();
  TORCH_CHECK(s64.numel() == B && conv_pool.size(0) == state_pool.size(0), "gdn_decode_step: one slot per row");
  for (int64_t i = 0; i < B; ++i)
    TORCH_CHECK(s64.data_ptr<int64_t>()[i] >= 0 && s64.data_ptr<int64_t>()[i] < state_pool.size(0),
                "gdn_decode_step: slot ", s64.data_ptr<int64_t>()[i], " is not in the pool");
  // src_slots: where each row's window and state are read (a chained decode's row continues from the slot the row
  // before wrote; its own slot gets the result); by default its own slot, in place
  auto src64 = src_slots.has_value() ? src_slots->to(at::kLong).contiguous() : s64;
  TORCH_CHECK(src64.numel() == B, "gdn_decode_step: one source slot per row");
  for (int64_t i = 0; i < B; ++i)
    TORCH_CHECK(src64.data_ptr<int64_t>()[i] >= 0 && src64.data_ptr<int64_t>()[i] < state_pool.size(0),
                "gdn_decode_step: source slot ", src64.data_ptr<int64_t>()[i], " is not in the pool");
  auto fr = fresh.to(at::kBool).contiguous();
  auto al = A_log.to(at::kFloat).contiguous(), dt = dt_bias.to(at::kFloat).contiguous();
  auto out = torch::empty({B, Hv, dv}, mixed.options().dtype(at::kFloat));
  if (mixed.scalar_type() == at::kBFloat16) {
    run(mixed.data_ptr<at::BFloat16>(), conv_w.data_ptr<at::BFloat16>(), conv_pool.data_ptr<at::BFloat16>(),
        state_pool.data_ptr<float>(), s64.data_ptr<int64_t>(), src64.data_ptr<int64_t>(), fr.data_ptr<bool>(),
        a.data_ptr<at::BFloat16>(),
        b.data_ptr<at::BFloat16>(), al.data_ptr<float>(), dt.data_ptr<float>(), out.data_ptr<float>(), B, C, K,
        num_k_heads, Hv, dk, dv, conv_pool.stride(0), state_pool.stride(0));
  } else {
    TORCH_CHECK(mixed.scalar_type() == at::kFloat, "gdn_decode_step: fp32 or bf16");
    run(mixed.data_ptr<float>(), conv_w.data_ptr<float>(), conv_pool.data_ptr<float>(), state_pool.data_ptr<float>(),
        s64.data_ptr<int64_t>(), src64.data_ptr<int64_t>(), fr.data_ptr<bool>(), a.data_ptr<float>(), b.data_ptr<float>(), al.data_ptr<float>(),
        dt.data_ptr<float>(), out.data_ptr<float>(), B, C, K, num_k_heads, Hv, dk, dv, conv_pool.stride(0),
        state_pool.stride(0));
  }
  return out;
}

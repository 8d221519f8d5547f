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
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

template <typename T>
void run(const T* mixed, const T* conv_w, T* conv_pool, float* state_pool, const int64_t* slots,
         const bool* fresh, const T* a, const T* b, const float* A_log, const float* dt_bias, float* out,
         int64_t B, int64_t C, int64_t K, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv) {
  const int64_t key_dim = Hk * dk, W = K - 1, rep = Hv / Hk;
  std::vector<float> conv(B * C);
  // 1. conv + SiLU, window updated in place (one task per sequence)
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      T* win = conv_pool + slots[bi] * C * W;
      const T* x = mixed + bi * C;
      float* y = conv.data() + bi * C;
      for (int64_t c = 0; c < C; ++c) {
        T* wc = win + c * W;
        const T* kc = conv_w + c * K;
        float acc = f32(x[c]) * f32(kc[W]);
        for (int64_t j = 0; j < W; ++j) acc += (fresh[bi] ? 0.f : f32(wc[j])) * f32(kc[j]);
        // the twin rounds the conv output to the model dtype before the SiLU
        float r = f32(static_cast<T>(acc));
        y[c] = f32(static_cast<T>(r / (1.f + std::exp(-r))));
        for (int64_t j = 0; j + 1 < W; ++j) wc[j] = fresh[bi] ? static_cast<T>(0) : wc[j + 1];
        if (W > 0) wc[W - 1] = x[c];
      }
    }
  });
  // 2. normalise q and k heads in place in the conv buffer
  at::parallel_for(0, B * Hk, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* q = conv.data() + (i / Hk) * C + (i % Hk) * dk;
      float* k = q + key_dim;
      float sq = 0.f, sk = 0.f;
      for (int64_t d = 0; d < dk; ++d) { sq += q[d] * q[d]; sk += k[d] * k[d]; }
      const float iq = 1.f / std::sqrt(sq + 1e-6f) / std::sqrt(static_cast<float>(dk));
      const float ik = 1.f / std::sqrt(sk + 1e-6f);
      for (int64_t d = 0; d < dk; ++d) { q[d] *= iq; k[d] *= ik; }
    }
  });
  // 3. the delta rule, one task per (sequence, value head)
  at::parallel_for(0, B * Hv, 8, [&](int64_t i0, int64_t i1) {  // tasks of 8 heads (512 KB of state)
    std::vector<float> pred(dv), u(dv);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = i / Hv, h = i % Hv, kh = h / rep;
      const float* q = conv.data() + bi * C + kh * dk;
      const float* k = q + key_dim;
      const float* v = conv.data() + bi * C + 2 * key_dim + h * dv;
      const float beta = 1.f / (1.f + std::exp(-f32(b[bi * Hv + h])));
      const float sp_in = f32(a[bi * Hv + h]) + dt_bias[h];
      const float softplus = sp_in > 20.f ? sp_in : std::log1p(std::exp(sp_in));
      const float decay = std::exp(-std::exp(A_log[h]) * softplus);
      float* S = state_pool + (slots[bi] * Hv + h) * dk * dv;
      std::fill(pred.begin(), pred.end(), 0.f);
      for (int64_t r = 0; r < dk; ++r) {
        float* row = S + r * dv;
        const float kr = k[r];
        if (fresh[bi]) {
          for (int64_t c = 0; c < dv; ++c) row[c] = 0.f;
        } else {
          for (int64_t c = 0; c < dv; ++c) { row[c] *= decay; pred[c] += kr * row[c]; }
        }
      }
      for (int64_t c = 0; c < dv; ++c) u[c] = beta * (v[c] - pred[c]);
      float* o = out + (bi * Hv + h) * dv;
      for (int64_t c = 0; c < dv; ++c) o[c] = 0.f;
      for (int64_t r = 0; r < dk; ++r) {
        float* row = S + r * dv;
        const float kr = k[r], qr = q[r];
        for (int64_t c = 0; c < dv; ++c) { row[c] += kr * u[c]; o[c] += qr * row[c]; }
      }
    }
  });
}

}  // namespace

// mixed [B, C] and conv_w [C, K] and conv_pool [slots, C, K-1] in the model dtype (fp32 or bf16);
// state_pool [slots, Hv, dk, dv] fp32; slots int64 [B]; fresh bool [B]; a, b [B, Hv] model dtype;
// A_log, dt_bias [Hv] fp32. Returns o [B, Hv, dv] fp32; updates the window and the state in place.
torch::Tensor gdn_decode_step(torch::Tensor mixed, torch::Tensor conv_w, torch::Tensor conv_pool,
                              torch::Tensor state_pool, torch::Tensor slots, torch::Tensor fresh, torch::Tensor a,
                              torch::Tensor b, torch::Tensor A_log, torch::Tensor dt_bias, int64_t num_k_heads,
                              int64_t head_k_dim) {
  TORCH_CHECK(mixed.dim() == 2 && conv_w.dim() == 2 && conv_pool.dim() == 3 && state_pool.dim() == 4,
              "gdn_decode_step: shapes");
  TORCH_CHECK(mixed.is_contiguous() && conv_w.is_contiguous() && conv_pool.is_contiguous() &&
              state_pool.is_contiguous() && a.is_contiguous() && b.is_contiguous(), "gdn_decode_step: contiguous");
  TORCH_CHECK(state_pool.scalar_type() == at::kFloat, "gdn_decode_step: the state is fp32");
  TORCH_CHECK(mixed.scalar_type() == conv_w.scalar_type() && mixed.scalar_type() == conv_pool.scalar_type() &&
              a.scalar_type() == mixed.scalar_type() && b.scalar_type() == mixed.scalar_type(),
              "gdn_decode_step: mixed, conv weight, window, a, b share the model dtype");
  const int64_t B = mixed.size(0), C = mixed.size(1), K = conv_w.size(1);
  const int64_t Hv = state_pool.size(1), dk = state_pool.size(2), dv = state_pool.size(3);
  TORCH_CHECK(dk == head_k_dim && C == 2 * num_k_heads * dk + Hv * dv && Hv % num_k_heads == 0,
              "gdn_decode_step: head layout");
  auto s64 = slots.to(at::kLong).contiguous();
  auto fr = fresh.to(at::kBool).contiguous();
  auto al = A_log.to(at::kFloat).contiguous(), dt = dt_bias.to(at::kFloat).contiguous();
  auto out = torch::empty({B, Hv, dv}, mixed.options().dtype(at::kFloat));
  if (mixed.scalar_type() == at::kBFloat16) {
    run(mixed.data_ptr<at::BFloat16>(), conv_w.data_ptr<at::BFloat16>(), conv_pool.data_ptr<at::BFloat16>(),
        state_pool.data_ptr<float>(), s64.data_ptr<int64_t>(), fr.data_ptr<bool>(), a.data_ptr<at::BFloat16>(),
        b.data_ptr<at::BFloat16>(), al.data_ptr<float>(), dt.data_ptr<float>(), out.data_ptr<float>(), B, C, K,
        num_k_heads, Hv, dk, dv);
  } else {
    TORCH_CHECK(mixed.scalar_type() == at::kFloat, "gdn_decode_step: fp32 or bf16");
    run(mixed.data_ptr<float>(), conv_w.data_ptr<float>(), conv_pool.data_ptr<float>(), state_pool.data_ptr<float>(),
        s64.data_ptr<int64_t>(), fr.data_ptr<bool>(), a.data_ptr<float>(), b.data_ptr<float>(), al.data_ptr<float>(),
        dt.data_ptr<float>(), out.data_ptr<float>(), B, C, K, num_k_heads, Hv, dk, dv);
  }
  return out;
}

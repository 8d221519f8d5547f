// Decode attention straight from the paged KV pool: one new query per sequence attends over its cached
// keys by walking its block table, so no key or value is ever copied. Each (sequence, KV head) work item
// streams its keys once for all the query heads that share them (GQA), then its values once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// e^x for x <= 0 (softmax after max subtraction), ~1 ulp: 2^n * p(r), r in [-ln2/2, ln2/2].
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

template <typename KV>
inline float dot(const float* q, const KV* k, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; d < D; ++d) s += q[d] * to_float(k[d]);
  return s;
}

template <typename KV>
inline void axpy(float a, const KV* v, float* out, int64_t D) {
  int64_t d = 0;
#if defined(__AVX512F__)
  __m512 av = _mm512_set1_ps(a);
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(out + d, _mm512_fmadd_ps(av, load16(v + d), _mm512_loadu_ps(out + d)));
#endif
  for (; d < D; ++d) out[d] += a * to_float(v[d]);
}

// Each key row is widened to fp32 once and used for all G query heads that share it. G is a template
// parameter so that the G accumulators live in registers (a runtime-sized array went through the stack).
template <int G, typename KV>
inline void scores_g(const float* qs, const KV* k, int64_t D, float* out, int64_t stride) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  for (; d0 + 16 <= D; d0 += 16) {
    const __m512 kv = load16(k + d0);
    for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qs + g * D + d0), kv, acc[g]);
  }
  for (int g = 0; g < G; ++g) {
    float s = _mm512_reduce_add_ps(acc[g]);
    for (int64_t d = d0; d < D; ++d) s += qs[g * D + d] * to_float(k[d]);
    out[g * stride] = s;
  }
#else
  for (int g = 0; g < G; ++g) out[g * stride] = dot(qs + g * D, k, D);
#endif
}

template <typename KV>
inline void scores_all_heads(const float* qs, const KV* k, int64_t D, int64_t G, float* out, int64_t stride) {
  switch (G) {
    case 1: return scores_g<1>(qs, k, D, out, stride);
    case 2: return scores_g<2>(qs, k, D, out, stride);
    case 4: return scores_g<4>(qs, k, D, out, stride);
    case 8: return scores_g<8>(qs, k, D, out, stride);
    case 16: return scores_g<16>(qs, k, D, out, stride);
    default:
      for (int64_t g = 0; g < G; ++g) out[g * stride] = dot(qs + g * D, k, D);
  }
}

template <typename KV>
inline void accumulate_all_heads(const float* p, int64_t stride, const KV* v, int64_t D, int64_t G, float* o) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 16 <= D; d0 += 16) {
    const __m512 vv = load16(v + d0);
    for (int64_t g = 0; g < G; ++g) {
      float* og = o + g * D + d0;
      _mm512_storeu_ps(og, _mm512_fmadd_ps(_mm512_set1_ps(p[g * stride]), vv, _mm512_loadu_ps(og)));
    }
  }
#endif
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = d0; d < D; ++d) o[g * D + d] += p[g * stride] * to_float(v[d]);
}

inline void exp_sub_max(float* s, int64_t n, float mx) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(mx);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(s + i, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + i), m)));
#endif
  for (; i < n; ++i) s[i] = std::exp(s[i] - mx);
}

// The keys (values) of one head are D elements every Hkv*D: a strided walk that the hardware prefetcher
// does not follow (measured ~100 ns, a DRAM latency, per position). Prefetch the row kAhead positions on.
constexpr int64_t kAhead = 8;

template <typename KV>
inline void prefetch_row(const KV* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(KV)); off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

template <typename KV>
void run(const float* q, const KV* kp, const KV* vp, const int32_t* tables, int64_t table_stride,
         const int32_t* lens, float* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t BS, float scale) {
  const int64_t G = Hq / Hkv;
  // short contexts are too little work to be worth a barrier between threads (see gemv.cpp)
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, lens[b]);
  const int64_t grain = max_len * D * (G + 1) < (int64_t{1} << 22) ? B * Hkv : 1;
  at::parallel_for(0, B * Hkv, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    std::vector<float> qs(G * D);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t L = lens[b];
      const int32_t* table = tables + b * table_stride;
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qs[g * D + d] = q[(b * Hq + h * G + g) * D + d] * scale;
      // walk block by block: no division per position; prefetch the row kAhead positions on (the next
      // block's rows when near the end of this one)
      const int64_t step = Hkv * D;
      auto walk = [&](const KV* pool, auto&& body) {
        for (int64_t start = 0; start < L; start += BS) {
          const KV* base = pool + (static_cast<int64_t>(table[start / BS]) * BS * Hkv + h) * D;
          const KV* next = start + BS < L ? pool + (static_cast<int64_t>(table[start / BS + 1]) * BS * Hkv + h) * D
                                          : nullptr;
          const int64_t n = std::min<int64_t>(BS, L - start);
          for (int64_t i = 0; i < n; ++i) {
            if (i + kAhead < n) prefetch_row(base + (i + kAhead) * step, D);
            else if (next != nullptr) prefetch_row(next + (i + kAhead - BS) * step, D);
            body(start + i, base + i * step);
          }
        }
      };
      walk(kp, [&](int64_t pos, const KV* k) { scores_all_heads(qs.data(), k, D, G, scores.data() + pos, L); });
      std::vector<float> inv_sum(G);
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * L;
        float mx = -INFINITY;
        for (int64_t pos = 0; pos < L; ++pos) mx = s[pos] > mx ? s[pos] : mx;
        exp_sub_max(s, L, mx);
        double sum = 0.0;
        for (int64_t pos = 0; pos < L; ++pos) sum += s[pos];
        inv_sum[g] = static_cast<float>(1.0 / sum);
      }
      float* o = out + (b * Hq + h * G) * D;
      std::memset(o, 0, sizeof(float) * G * D);
      walk(vp, [&](int64_t pos, const KV* v) { accumulate_all_heads(scores.data() + pos, L, v, D, G, o); });
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) o[g * D + d] *= inv_sum[g];
    }
  });
}

}  // namespace

// q: [B, Hq, D]; k_pool, v_pool: [num_blocks, block_size, Hkv, D] (fp32 or bf16); block_tables: int32
// [B, max_blocks]; context_lens: int32 [B] (keys per sequence, the new one included) -> fp32 [B, Hq, D]
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(), "paged_attention: shapes");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_attention: pools must be contiguous");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type(), "paged_attention: k and v dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_attention: block_tables and context_lens must be int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_pool.size(1), Hkv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D && Hq % Hkv == 0, "paged_attention: head dims");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "paged_attention: one row per sequence");
  auto qf = q.to(at::kFloat).contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] > 0 && (lp[b] + BS - 1) / BS <= tables.size(1), "paged_attention: context_lens[", b,
                "]=", lp[b], " does not fit its block table");
  auto out = torch::empty({B, Hq, D}, qf.options());
  if (k_pool.scalar_type() == at::kBFloat16) {
    run(qf.data_ptr<float>(), k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(),
        tables.data_ptr<int32_t>(), tables.size(1), lp, out.data_ptr<float>(), B, Hq, Hkv, D, BS,
        static_cast<float>(scale));
  } else {
    TORCH_CHECK(k_pool.scalar_type() == at::kFloat, "paged_attention: pools must be fp32 or bf16");
    run(qf.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), tables.data_ptr<int32_t>(),
        tables.size(1), lp, out.data_ptr<float>(), B, Hq, Hkv, D, BS, static_cast<float>(scale));
  }
  return out;
}

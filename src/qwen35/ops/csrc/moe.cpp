// The routed experts of a sparse MoE block for a few tokens (decode), in two parallel passes.
//
// The twin (`ExpertDispatch.forward` in model/mlp.py, as transformers does it) loops over the chosen experts in
// Python: per expert a gather, two products, SiLU, a multiply, a scale and an index_add, ~10 dispatches per expert,
// 80 per layer at top-8, which cost more than the 50 MB of expert weights take to stream. Here:
//   pass 1, over (token, chosen expert, row r < I): act[p, r] = silu(x . gate_r) * (x . up_r), each product
//           rounded to the model dtype as the twin's bf16 tensors are;
//   pass 2, over (token, chosen expert, row n < H): y[p, n] = w_e * (act_p . down_e[n]), rounded as the twin's;
//   pass 3: per token, out[n] = the y of its experts summed in ascending id order (the twin's order), rounded to
//           bf16 after each step, as index_add_ into a bf16 tensor does.
// Tasks are blocks of consecutive rows of one expert: each reads one or two sequential streams.
// Only the chosen experts' rows are read, each once per token that chose it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "bf16_dot.h"
#include "moe_common.h"

namespace {

using namespace qwen35_bf16;
using namespace qwen35_moe;


}  // namespace

// x [M, H] bf16; gate_up [E, 2I, H] bf16 (gate rows first); down [E, H, I] bf16; ids [M, k] int64 expert ids;
// weights [M, k] bf16 routing weights -> [M, H] bf16, the weighted sum of each token's experts.
torch::Tensor moe_experts_bf16(torch::Tensor x, torch::Tensor gate_up, torch::Tensor down, torch::Tensor ids,
                               torch::Tensor weights) {
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && ids.dim() == 2 && weights.sizes() == ids.sizes(),
              "moe_experts_bf16: x [M, H], gate_up [E, 2I, H], down [E, H, I], ids and weights [M, k]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && gate_up.scalar_type() == at::kBFloat16 &&
              down.scalar_type() == at::kBFloat16 && weights.scalar_type() == at::kBFloat16,
              "moe_experts_bf16: x, weights and expert weights must be bf16");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "moe_experts_bf16: expert weights must be contiguous");
  const int64_t M = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, k = ids.size(1);
  TORCH_CHECK(gate_up.size(1) == 2 * I && gate_up.size(2) == H && down.size(0) == E && down.size(1) == H &&
              down.size(2) == I && ids.size(0) == M, "moe_experts_bf16: shapes disagree");
  auto xc = x.contiguous();
  auto id = ids.to(at::kLong).contiguous();
  auto wt = weights.contiguous();
  const int64_t* idp = id.data_ptr<int64_t>();
  for (int64_t i = 0; i < M * k; ++i)
    TORCH_CHECK(idp[i] >= 0 && idp[i] < E, "moe_experts_bf16: expert id ", idp[i], " out of range [0, ", E, ")");
  const int64_t P = M * k;
  const std::vector<int64_t> order = slots_by_expert(idp, M, k);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* gu = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>());
  const uint16_t* dn = reinterpret_cast<const uint16_t*>(down.data_ptr<at::BFloat16>());
  const at::BFloat16* wp = wt.data_ptr<at::BFloat16>();
  std::vector<uint16_t> act(static_cast<size_t>(P * I));

  // pass 1: gate then up rows of every chosen expert, in blocks of kRows rows (two sequential streams per task)
  constexpr int64_t kRows = 64;
  const int64_t nrb = (I + kRows - 1) / kRows;
  const int64_t grain1 = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(2 * kRows * H * 2, 1));
  at::parallel_for(0, P * nrb, grain1, [&](int64_t a, int64_t b) {
    float gv[kRows];
    for (int64_t task = a; task < b; ++task) {
      const int64_t p = task / nrb, r0 = (task % nrb) * kRows, r1 = std::min(I, r0 + kRows);
      const uint16_t* xr = xp + (p / k) * H;
      const uint16_t* w = gu + idp[p] * 2 * I * H;
      for (int64_t r = r0; r < r1; ++r) gv[r - r0] = round_bf16(dot_bf16(w + r * H, H, xr));
      for (int64_t r = r0; r < r1; ++r) {
        const float g = gv[r - r0];
        const float u = round_bf16(dot_bf16(w + (I + r) * H, H, xr));
        const float s = round_bf16(g / (1.f + std::exp(-g)));
        act[p * I + r] = bits_bf16(s * u);
      }
    }
  });

  // pass 2: each chosen expert's down rows in order (one sequential stream per task): y[p, n], rounded, weighted
  std::vector<float> y(static_cast<size_t>(P * H));
  const int64_t nnb = (H + kRows - 1) / kRows;
  const int64_t grain2 = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(kRows * I * 2, 1));
  at::parallel_for(0, P * nnb, grain2, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t p = task / nnb, n0 = (task % nnb) * kRows, n1 = std::min(H, n0 + kRows);
      const float wgt = static_cast<float>(wp[p]);
      for (int64_t n = n0; n < n1; ++n)
        y[p * H + n] = round_bf16(round_bf16(dot_bf16(dn + (idp[p] * H + n) * I, I, act.data() + p * I)) * wgt);
    }
  });

  // pass 3: each token's experts summed in ascending id order, rounded to bf16 after each step (index_add_)
  auto out = torch::empty({M, H}, x.options());
  sum_in_expert_order(y, order, M, k, H, out.data_ptr<at::BFloat16>());
  return out;
}

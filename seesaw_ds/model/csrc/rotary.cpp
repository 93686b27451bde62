// transformers' rotary embedding, `apply_rotary_pos_emb` of Llama and the families that copy it, in one call
// for the query and the key of a layer (CPU):
//     q_embed = (q * cos) + (rotate_half(q) * sin),  rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
// and the same for k. In eager mode that is twelve ATen operators a layer (two unsqueezes, four slices, two
// negations, two concatenations, four multiplications, two additions), each a trip through the dispatcher
// over a few hundred numbers at decode: ~40 us a layer here against ~3 us for this loop.
//
// The values are ATen's to the bit: each of the three operations is computed in float32 and rounded to the
// tensors' dtype in the same order as the eager operators round (for float32, the products and the sum are
// each rounded to float32: the file is compiled without contracting a multiply and an add into one FMA).
#pragma GCC optimize("fp-contract=off")
#pragma STDC FP_CONTRACT OFF

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>

namespace {

template <typename T>
inline T round_as(float x) {
  return static_cast<T>(x);  // c10's BFloat16 and Half round to nearest even
}

template <>
inline float round_as<float>(float x) {
  return x;
}

// one tensor's rows [B, H, S, D] (strides in elements, the last dimension contiguous), cos/sin [B, S, D]
template <typename T>
void rotate(const T* x, const int64_t* xs, T* out, const int64_t* os, const T* cos, const T* sin,
            const int64_t* cs, int64_t B, int64_t H, int64_t S, int64_t D) {
  const int64_t half = D / 2;
  const int64_t rows = B * H * S;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * S), h = (r / S) % H, s = r % S;
      const T* row = x + b * xs[0] + h * xs[1] + s * xs[2];
      T* dst = out + b * os[0] + h * os[1] + s * os[2];
      const T* c = cos + b * cs[0] + s * cs[1];
      const T* n = sin + b * cs[0] + s * cs[1];
      for (int64_t j = 0; j < D; ++j) {
        const float rotated = j < half ? -static_cast<float>(row[j + half]) : static_cast<float>(row[j - half]);
        const T straight = round_as<T>(static_cast<float>(row[j]) * static_cast<float>(c[j]));
        const T turned = round_as<T>(rotated * static_cast<float>(n[j]));
        dst[j] = round_as<T>(static_cast<float>(straight) + static_cast<float>(turned));
      }
    }
  });
}

template <typename T>
void rotate_tensor(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const int64_t cs[2] = {cos.size(0) == 1 ? 0 : cos.stride(0), cos.size(1) == 1 ? 0 : cos.stride(1)};
  rotate(x.data_ptr<T>(), xs, out.data_ptr<T>(), os, cos.data_ptr<T>(), sin.data_ptr<T>(), cs, x.size(0), x.size(1),
         x.size(2), x.size(3));
}

void check(const torch::Tensor& x, const torch::Tensor& cos, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1, "rotary: ", name,
              " must be a CPU tensor [B, H, S, D] with its last dimension contiguous");
  TORCH_CHECK(x.size(3) % 2 == 0 && x.size(3) == cos.size(2), "rotary: ", name, "'s head size must be even and ",
              "cos/sin's last dimension");
  TORCH_CHECK((cos.size(0) == x.size(0) || cos.size(0) == 1) && (cos.size(1) == x.size(2) || cos.size(1) == 1),
              "rotary: cos/sin [B, S, D] must broadcast over ", name, " [B, H, S, D]");
}

}  // namespace

// rotary(q [B, Hq, S, D], k [B, Hk, S, D], cos [B, S, D], sin [B, S, D]) -> (q_embed, k_embed), each laid out as
// its input (torch.empty_like); every tensor of one dtype (float32, bfloat16 or float16)
std::tuple<torch::Tensor, torch::Tensor> rotary(torch::Tensor q, torch::Tensor k, torch::Tensor cos,
                                                torch::Tensor sin) {
  RECORD_FUNCTION("seesaw::rotary", std::vector<c10::IValue>({q, k}));  // one kernel in torch.profiler's counts
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes(), "rotary: cos and sin [B, S, D] of one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(),
              "rotary: q, k, cos and sin of one dtype");
  check(q, cos, "q");
  check(k, cos, "k");
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto q_out = torch::empty_like(q);
  auto k_out = torch::empty_like(k);
  if (q_out.stride(3) != 1) q_out = torch::empty(q.sizes(), q.options());
  if (k_out.stride(3) != 1) k_out = torch::empty(k.sizes(), k.options());
  switch (q.scalar_type()) {
    case torch::kBFloat16:
      rotate_tensor<c10::BFloat16>(q, q_out, cos, sin);
      rotate_tensor<c10::BFloat16>(k, k_out, cos, sin);
      break;
    case torch::kHalf:
      rotate_tensor<c10::Half>(q, q_out, cos, sin);
      rotate_tensor<c10::Half>(k, k_out, cos, sin);
      break;
    case torch::kFloat:
      rotate_tensor<float>(q, q_out, cos, sin);
      rotate_tensor<float>(k, k_out, cos, sin);
      break;
    default:
      TORCH_CHECK(false, "rotary: float32, bfloat16 or float16 only");
  }
  return {q_out, k_out};
}

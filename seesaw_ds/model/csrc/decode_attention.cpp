// Decode attention over the device-tier KV cache of one layer, every sequence of a batch in one call
// (CPU, float32).
//
// The cache is token-major ([slots, kv_heads, head_dim]) and each sequence's KV is one run of consecutive
// slots, so a sequence's keys (then values) are read once, front to back, with all of a token's heads
// adjacent: memory speed, where one scaled_dot_product_attention call per sequence read the same bytes
// head by head at under half of it. Per sequence: scores for every query head, a max-subtracted softmax,
// then the weighted sum of values.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// query [N, Hq, D]; keys/values [slots, Hkv, D]; starts/lengths [N] (int64): sequence n attends to slots
// starts[n] .. starts[n] + lengths[n] - 1. Query head h uses KV head h / (Hq / Hkv). Returns [N, Hq, D].
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                               torch::Tensor starts, torch::Tensor lengths, double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat && keys.scalar_type() == torch::kFloat &&
              values.scalar_type() == torch::kFloat, "decode_attention: float32 only");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous(),
              "decode_attention: contiguous tensors only");
  TORCH_CHECK(starts.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong,
              "decode_attention: int64 starts and lengths");
  const int64_t n_seqs = query.size(0), n_q = query.size(1), dim = query.size(2), n_kv = keys.size(1);
  TORCH_CHECK(n_q % n_kv == 0 && keys.size(2) == dim && values.sizes() == keys.sizes(),
              "decode_attention: head shapes do not match");
  const int64_t group = n_q / n_kv, slots = keys.size(0);
  auto out = torch::zeros_like(query);
  const float* q = query.data_ptr<float>();
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t* first = starts.data_ptr<int64_t>();
  const int64_t* count = lengths.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  std::vector<float> scores;
  for (int64_t seq = 0; seq < n_seqs; ++seq) {
    const int64_t length = count[seq], start = first[seq];
    TORCH_CHECK(length > 0 && start >= 0 && start + length <= slots, "decode_attention: span outside the cache");
    scores.assign(n_q * length, 0.f);
    const float* q_seq = q + seq * n_q * dim;
    for (int64_t t = 0; t < length; ++t) {
      const float* key_row = k + (start + t) * n_kv * dim;
      for (int64_t h = 0; h < n_q; ++h)
        scores[h * length + t] = dot(q_seq + h * dim, key_row + (h / group) * dim, dim) * fscale;
    }
    for (int64_t h = 0; h < n_q; ++h) {
      float* row = scores.data() + h * length;
      float peak = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < length; ++i) peak = std::max(peak, row[i]);
      float total = 0.f;
      for (int64_t i = 0; i < length; ++i) {
        row[i] = std::exp(row[i] - peak);
        total += row[i];
      }
      const float inverse = 1.f / total;
      for (int64_t i = 0; i < length; ++i) row[i] *= inverse;
    }
    float* o_seq = o + seq * n_q * dim;
    for (int64_t t = 0; t < length; ++t) {
      const float* value_row = v + (start + t) * n_kv * dim;
      for (int64_t h = 0; h < n_q; ++h) axpy(scores[h * length + t], value_row + (h / group) * dim, o_seq + h * dim, dim);
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "seesaw_ds decode attention over one layer's cache (CPU, float32)");
}

// Attention for the engine's two step kinds, every sequence of a batch in one call per layer (CPU).
//
// decode_attention: one new query token per sequence over the device-tier KV cache of one layer (float32,
// bfloat16 or float16 cache; query and arithmetic in float32). The cache is token-major
// ([slots, kv_heads, head_dim]) and a sequence's KV is a list of runs of consecutive slots (its block
// table, merged where blocks are adjacent), so each run's keys (then values) are read once, front to back,
// a few rows at a time with every head of those rows while they are in L1. Per sequence: scores for every
// query head over all of its runs, an optional sliding window (only the last `window` tokens) and logit
// soft-cap (cap * tanh(s / cap), Gemma 2), a max-subtracted softmax, then the weighted sum of values divided
// by the softmax total. Sequences are spread over the intra-op threads (at::parallel_for) and the GIL is
// released for the call.
//
// With AVX2 + FMA + F16C (and head_dim a multiple of 8) the three loops are vectorized by hand: eight key
// rows are dotted with one query head at a time as eight independent FMA chains and reduced together (one
// dot per head and row would be one chain of dependent FMAs), the exponentials are a polynomial over eight
// lanes, and the value sum keeps a head's accumulators in registers. Otherwise a plain loop computes the
// same. A bfloat16 cache is widened to float32 as it is read (a bfloat16 is the top half of a float32), a
// float16 one through F16C: half the bytes from memory, the same float32 arithmetic.
//
// prefill_attention: a packed row of ragged prompts ([heads, T, head_dim], boundaries in cu_seqlens), causal
// within each prompt, in the tensors' own dtype through ATen (torch's fused SDPA kernels; the eager formula
// for a soft-cap). The loop over prompts runs here rather than in Python: one call per layer and step.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SEESAW_AVX2 1
#endif

namespace {

struct Shape {
  int64_t n_q, n_kv, dim, group;
};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// ------------------------------------------------------------------------------------------- portable
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

template <typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * to_float(x[i]);
}

// scores[h * ld + t] for t < length, one run of a sequence: q_seq [n_q, dim], key rows from `keys`, each
// n_kv * dim apart; `scores` points at the run's first column of a [n_q, ld] row-major block
template <typename T>
void scores_plain(const Shape& s, const float* q_seq, const T* keys, int64_t length, float scale,
                  float* scores, int64_t ld) {
  for (int64_t t = 0; t < length; ++t) {
    const T* row = keys + t * s.n_kv * s.dim;
    for (int64_t h = 0; h < s.n_q; ++h)
      scores[h * ld + t] = dot(q_seq + h * s.dim, row + (h / s.group) * s.dim, s.dim) * scale;
  }
}

// exp(row - max(row)) in place; returns the sum
float softmax_numerators_plain(float* row, int64_t length) {
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < length; ++i) peak = std::max(peak, row[i]);
  float total = 0.f;
  for (int64_t i = 0; i < length; ++i) {
    row[i] = std::exp(row[i] - peak);
    total += row[i];
  }
  return total;
}

// o_seq [n_q, dim] += sum over t < length of weights[h * ld + t] * value row t (head h / group): one run
template <typename T>
void weighted_values_plain(const Shape& s, const float* weights, const T* values, int64_t length,
                           float* o_seq, int64_t ld) {
  for (int64_t t = 0; t < length; ++t) {
    const T* row = values + t * s.n_kv * s.dim;
    for (int64_t h = 0; h < s.n_q; ++h)
      axpy(weights[h * ld + t], row + (h / s.group) * s.dim, o_seq + h * s.dim, s.dim);
  }
}

#ifdef SEESAW_AVX2
// ---------------------------------------------------------------------------------------------- AVX2
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// eight cache values as float32 lanes
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// lane i = the sum of the lanes of a[i]
inline __m256 sum_each(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  // s0123 = [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], likewise s4567
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// e^x for x <= 0 (softmax numerators): x = n ln2 + r, |r| <= ln2 / 2; e^r by a degree-7 polynomial
// (Cephes' expf coefficients), 2^n through the exponent bits. Below -87 the result is 0 or denormal.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

constexpr int64_t kRows = 8;     // key rows dotted together (one FMA chain each)
constexpr int64_t kChunk = 64;   // value floats a head keeps in registers at once (8 vectors)
constexpr int64_t kPrefetchBlocks = 2;  // how far ahead of the rows being dotted to prefetch (measured: 1-4 alike)

template <typename T>
void scores_avx2(const Shape& s, const float* q_seq, const T* keys, int64_t length, float scale,
                 float* scores, int64_t ld) {
  const int64_t stride = s.n_kv * s.dim;
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t t = 0;
  for (; t + kRows <= length; t += kRows) {
    const T* rows = keys + t * stride;
    // the hardware prefetcher lags eight rows read side by side: ask for the rows two blocks ahead
    const char* ahead = reinterpret_cast<const char*>(rows + kPrefetchBlocks * kRows * stride);
    const char* end = reinterpret_cast<const char*>(keys + length * stride);
    for (int64_t b = 0; b < kRows * stride * static_cast<int64_t>(sizeof(T)) && ahead + b < end; b += 64)
      _mm_prefetch(ahead + b, _MM_HINT_T0);
    for (int64_t h = 0; h < s.n_q; ++h) {
      const float* q = q_seq + h * s.dim;
      const T* k = rows + (h / s.group) * s.dim;
      __m256 acc[kRows];
      for (int j = 0; j < kRows; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < s.dim; c += 8) {
        const __m256 qv = _mm256_loadu_ps(q + c);
        for (int j = 0; j < kRows; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(k + j * stride + c), acc[j]);
      }
      _mm256_storeu_ps(scores + h * ld + t, _mm256_mul_ps(sum_each(acc), vscale));
    }
  }
  for (; t < length; ++t) {
    const T* row = keys + t * stride;
    for (int64_t h = 0; h < s.n_q; ++h) {
      const float* q = q_seq + h * s.dim;
      const T* k = row + (h / s.group) * s.dim;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < s.dim; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k + c), acc);
      scores[h * ld + t] = hsum(acc) * scale;
    }
  }
}

float softmax_numerators_avx2(float* row, int64_t length) {
  __m256 vpeak = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) vpeak = _mm256_max_ps(vpeak, _mm256_loadu_ps(row + i));
  float peak = hmax(vpeak);
  for (; i < length; ++i) peak = std::max(peak, row[i]);
  const __m256 shift = _mm256_set1_ps(peak);
  __m256 vtotal = _mm256_setzero_ps();
  for (i = 0; i + 8 <= length; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + i), shift));
    _mm256_storeu_ps(row + i, e);
    vtotal = _mm256_add_ps(vtotal, e);
  }
  float total = hsum(vtotal);
  for (; i < length; ++i) {
    row[i] = std::exp(row[i] - peak);
    total += row[i];
  }
  return total;
}

template <typename T>
void weighted_values_avx2(const Shape& s, const float* weights, const T* values, int64_t length,
                          float* o_seq, int64_t ld) {
  const int64_t stride = s.n_kv * s.dim;
  for (int64_t h = 0; h < s.n_q; ++h) {
    const float* w = weights + h * ld;
    for (int64_t c0 = 0; c0 < s.dim; c0 += kChunk) {
      const int64_t width = std::min(kChunk, s.dim - c0) / 8;
      const T* v = values + (h / s.group) * s.dim + c0;
      __m256 acc[kChunk / 8];
      float* o = o_seq + h * s.dim + c0;
      for (int64_t c = 0; c < width; ++c) acc[c] = _mm256_loadu_ps(o + c * 8);
      for (int64_t t = 0; t < length; ++t) {
        const __m256 wt = _mm256_broadcast_ss(w + t);
        const T* row = v + t * stride;
        for (int64_t c = 0; c < width; ++c) acc[c] = _mm256_fmadd_ps(wt, load8(row + c * 8), acc[c]);
      }
      for (int64_t c = 0; c < width; ++c) _mm256_storeu_ps(o + c * 8, acc[c]);
    }
  }
}
#endif

// One sequence: its runs (first slot, count) after the window is applied, `length` tokens in all.
template <typename T>
void attend_one(const Shape& shape, const float* q_seq, const T* k, const T* v, float* o_seq,
                const int64_t* run_first, const int64_t* run_count, int64_t n_runs, int64_t skip, int64_t length,
                float scale, float softcap, bool wide, std::vector<float>& scores,
                std::vector<float>& totals) {
  const int64_t n_q = shape.n_q, stride = shape.n_kv * shape.dim, dim = shape.dim;
  scores.resize(n_q * length);
  totals.resize(n_q);
  std::fill(o_seq, o_seq + n_q * dim, 0.f);
  // pass 0: scores over every run (the first `skip` tokens are outside the window), then the softmax
  // numerators; pass 1: the numerator-weighted sum of values, run by run
  for (int pass = 0; pass < 2; ++pass) {
    int64_t column = 0, skipped = 0;
    for (int64_t r = 0; r < n_runs; ++r) {
      int64_t first = run_first[r], count = run_count[r];
      const int64_t drop = std::min(count, skip - skipped);
      skipped += drop;
      first += drop;
      count -= drop;
      if (count == 0) continue;
      float* column_base = scores.data() + column;
      if (pass == 0) {
#ifdef SEESAW_AVX2
        if (wide) scores_avx2(shape, q_seq, k + first * stride, count, scale, column_base, length);
#endif
        if (!wide) scores_plain(shape, q_seq, k + first * stride, count, scale, column_base, length);
      } else {
#ifdef SEESAW_AVX2
        if (wide) weighted_values_avx2(shape, column_base, v + first * stride, count, o_seq, length);
#endif
        if (!wide) weighted_values_plain(shape, column_base, v + first * stride, count, o_seq, length);
      }
      column += count;
    }
    if (pass == 1) break;
    if (softcap > 0.f) {
      const float inverse_cap = 1.f / softcap;
      for (int64_t i = 0; i < n_q * length; ++i) scores[i] = softcap * std::tanh(scores[i] * inverse_cap);
    }
    for (int64_t h = 0; h < n_q; ++h) {
      float* row = scores.data() + h * length;
#ifdef SEESAW_AVX2
      if (wide) totals[h] = softmax_numerators_avx2(row, length);
#endif
      if (!wide) totals[h] = softmax_numerators_plain(row, length);
    }
  }
  for (int64_t h = 0; h < n_q; ++h) {  // divided once at the end, as SDPA does
    const float inverse = 1.f / totals[h];
    for (int64_t i = 0; i < dim; ++i) o_seq[h * dim + i] *= inverse;
  }
}

template <typename T>
void attend(const Shape& shape, const float* q, const T* k, const T* v, float* o, const int64_t* offsets,
            const int64_t* run_first, const int64_t* run_count, const int64_t* skips, const int64_t* lengths,
            int64_t n_seqs, float scale, float softcap) {
#ifdef SEESAW_AVX2
  const bool wide = shape.dim % 8 == 0;
#else
  const bool wide = false;
#endif
  const int64_t per_seq = shape.n_q * shape.dim;
  at::parallel_for(0, n_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, totals;
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t lo = offsets[seq], hi = offsets[seq + 1];
      attend_one(shape, q + seq * per_seq, k, v, o + seq * per_seq, run_first + lo, run_count + lo, hi - lo,
                 skips[seq], lengths[seq], scale, softcap, wide, scores, totals);
    }
  });
}

}  // namespace

// query [N, Hq, D] float32; keys/values [slots, Hkv, D] float32, bfloat16 or float16; sequence n's KV is the
// runs offsets[n] .. offsets[n+1] of (run_first, run_count) (int64 slots), in token order. window > 0 keeps
// only each sequence's last `window` tokens; softcap > 0 caps the scores. Query head h uses KV head
// h / (Hq / Hkv). Returns [N, Hq, D] float32.
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                               torch::Tensor offsets, torch::Tensor run_first, torch::Tensor run_count,
                               double scale, int64_t window, double softcap) {
  const auto cache_type = keys.scalar_type();
  TORCH_CHECK(query.scalar_type() == torch::kFloat && values.scalar_type() == cache_type &&
              (cache_type == torch::kFloat || cache_type == torch::kBFloat16 || cache_type == torch::kHalf),
              "decode_attention: a float32 query over a float32, bfloat16 or float16 cache only");
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous(),
              "decode_attention: contiguous tensors only");
  for (const auto& t : {offsets, run_first, run_count})
    TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1,
                "decode_attention: int64 offsets and runs");
  const int64_t n_seqs = query.size(0), n_q = query.size(1), dim = query.size(2), n_kv = keys.size(1);
  TORCH_CHECK(n_q % n_kv == 0 && keys.size(2) == dim && values.sizes() == keys.sizes(),
              "decode_attention: head shapes do not match");
  TORCH_CHECK(offsets.size(0) == n_seqs + 1 && run_first.size(0) == run_count.size(0),
              "decode_attention: offsets must have one entry per sequence plus one");
  // every run inside the cache, every sequence non-empty: checked here, before the threads start
  const int64_t slots = keys.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* first = run_first.data_ptr<int64_t>();
  const int64_t* count = run_count.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[n_seqs] == run_first.size(0), "decode_attention: offsets do not cover the runs");
  std::vector<int64_t> skips(n_seqs), lengths(n_seqs);
  for (int64_t seq = 0; seq < n_seqs; ++seq) {
    TORCH_CHECK(off[seq] <= off[seq + 1], "decode_attention: offsets must not decrease");
    int64_t total = 0;
    for (int64_t r = off[seq]; r < off[seq + 1]; ++r) {
      TORCH_CHECK(count[r] > 0 && first[r] >= 0 && first[r] + count[r] <= slots,
                  "decode_attention: run outside the cache");
      total += count[r];
    }
    TORCH_CHECK(total > 0, "decode_attention: a sequence without KV");
    lengths[seq] = window > 0 ? std::min(total, window) : total;
    skips[seq] = total - lengths[seq];
  }
  const Shape shape{n_q, n_kv, dim, n_q / n_kv};
  auto out = torch::empty_like(query);
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  pybind11::gil_scoped_release no_gil;
  if (cache_type == torch::kFloat) {
    attend(shape, query.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), out.data_ptr<float>(),
           off, first, count, skips.data(), lengths.data(), n_seqs, fscale, fcap);
  } else if (cache_type == torch::kBFloat16) {
    attend(shape, query.data_ptr<float>(), keys.data_ptr<c10::BFloat16>(), values.data_ptr<c10::BFloat16>(),
           out.data_ptr<float>(), off, first, count, skips.data(), lengths.data(), n_seqs, fscale, fcap);
  } else {
    attend(shape, query.data_ptr<float>(), keys.data_ptr<c10::Half>(), values.data_ptr<c10::Half>(),
           out.data_ptr<float>(), off, first, count, skips.data(), lengths.data(), n_seqs, fscale, fcap);
  }
  return out;
}

namespace {

// transformers' eager attention with a soft-cap, for one prompt: q [Hq, L, D], k/v [Hkv, L, D]
torch::Tensor eager_softcap(const torch::Tensor& q, torch::Tensor k, torch::Tensor v, double scale,
                            int64_t window, double softcap) {
  const int64_t groups = q.size(0) / k.size(0), length = q.size(1);
  if (groups > 1) {
    k = k.repeat_interleave(groups, 0);
    v = v.repeat_interleave(groups, 0);
  }
  auto scores = at::matmul(q, k.transpose(1, 2)) * scale;
  scores = at::tanh(scores / softcap) * softcap;
  auto positions = at::arange(length, q.options().dtype(at::kLong));
  auto mask = positions.unsqueeze(0) <= positions.unsqueeze(1);
  if (window > 0) mask = mask & (positions.unsqueeze(0) > positions.unsqueeze(1) - window);
  scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  auto weights = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  return at::matmul(weights, v);
}

}  // namespace

// query [Hq, T, D], keys/values [Hkv, T, D] (any device and floating dtype): prompt i is positions
// cu_seqlens[i] .. cu_seqlens[i+1] - 1 (int64, on the CPU). Causal attention within each prompt, the last
// `window` positions only when window > 0, soft-capped when softcap > 0. Returns [Hq, T, D].
torch::Tensor prefill_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                                torch::Tensor cu_seqlens, double scale, int64_t window, double softcap) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes() &&
              query.size(1) == keys.size(1) && query.size(2) == keys.size(2) && query.size(0) % keys.size(0) == 0,
              "prefill_attention: query [Hq, T, D] and keys/values [Hkv, T, D] expected");
  TORCH_CHECK(cu_seqlens.scalar_type() == torch::kLong && cu_seqlens.device().is_cpu() && cu_seqlens.dim() == 1,
              "prefill_attention: cu_seqlens must be an int64 CPU vector");
  const int64_t n = cu_seqlens.size(0) - 1;
  const int64_t* bounds = cu_seqlens.data_ptr<int64_t>();
  TORCH_CHECK(n >= 1 && bounds[0] == 0 && bounds[n] == query.size(1), "prefill_attention: cu_seqlens must span T");
  const bool gqa = query.size(0) != keys.size(0);
  auto out = at::empty_like(query);
  pybind11::gil_scoped_release no_gil;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = bounds[i], hi = bounds[i + 1];
    TORCH_CHECK(hi > lo, "prefill_attention: an empty prompt");
    auto q = query.slice(1, lo, hi), k = keys.slice(1, lo, hi), v = values.slice(1, lo, hi);
    torch::Tensor result;
    if (softcap > 0) {
      result = eager_softcap(q, k, v, scale, window, softcap);
    } else if (window > 0 && hi - lo > window) {
      auto positions = at::arange(hi - lo, q.options().dtype(at::kLong));
      auto mask = (positions.unsqueeze(0) <= positions.unsqueeze(1)) &
                  (positions.unsqueeze(0) > positions.unsqueeze(1) - window);
      result = at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask, 0.0, false,
                                                scale, gqa).squeeze(0);
    } else {
      result = at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), c10::nullopt, 0.0,
                                                true, scale, gqa).squeeze(0);
    }
    out.slice(1, lo, hi).copy_(result);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "seesaw_ds decode attention over one layer's paged cache (CPU; float32, bfloat16 or float16 cache)");
  m.def("prefill_attention", &prefill_attention,
        "seesaw_ds packed ragged prefill attention, one call per layer (ATen SDPA per prompt)");
}

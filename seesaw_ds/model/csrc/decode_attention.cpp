// Decode attention over the device-tier KV cache of one layer, every sequence of a batch in one call
// (CPU; the cache in float32 or bfloat16, query and arithmetic in float32).
//
// The cache is token-major ([slots, kv_heads, head_dim]) and each sequence's KV is one run of consecutive
// slots, so a sequence's keys (then values) are read once, front to back, a few rows at a time with every
// head of those rows while they are in L1. Per sequence: scores for every query head, a max-subtracted
// softmax, then the weighted sum of values divided by the softmax total.
//
// With AVX2 + FMA (and head_dim a multiple of 8) the three loops are vectorized by hand: eight key rows are
// dotted with one query head at a time as eight independent FMA chains and reduced together (one dot per
// head and row would be one chain of dependent FMAs), the exponentials are a polynomial over eight lanes,
// and the value sum keeps a head's accumulators in registers. Otherwise a plain loop computes the same.
// A bfloat16 cache is widened to float32 as it is read (a bfloat16 is the top half of a float32): half the
// bytes from memory, the same float32 arithmetic.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SEESAW_AVX2 1
#endif

namespace {

struct Shape {
  int64_t n_q, n_kv, dim, group;
};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

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

// scores [n_q, length] for one sequence: q_seq [n_q, dim], key rows from `keys`, each n_kv * dim apart
template <typename T>
void scores_plain(const Shape& s, const float* q_seq, const T* keys, int64_t length, float scale,
                  float* scores) {
  for (int64_t t = 0; t < length; ++t) {
    const T* row = keys + t * s.n_kv * s.dim;
    for (int64_t h = 0; h < s.n_q; ++h)
      scores[h * length + t] = dot(q_seq + h * s.dim, row + (h / s.group) * s.dim, s.dim) * scale;
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

// o_seq [n_q, dim] = sum over t of weights[h, t] * value row t (head h / group)
template <typename T>
void weighted_values_plain(const Shape& s, const float* weights, const T* values, int64_t length,
                           float* o_seq) {
  std::fill(o_seq, o_seq + s.n_q * s.dim, 0.f);
  for (int64_t t = 0; t < length; ++t) {
    const T* row = values + t * s.n_kv * s.dim;
    for (int64_t h = 0; h < s.n_q; ++h)
      axpy(weights[h * length + t], row + (h / s.group) * s.dim, o_seq + h * s.dim, s.dim);
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
                 float* scores) {
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
      _mm256_storeu_ps(scores + h * length + t, _mm256_mul_ps(sum_each(acc), vscale));
    }
  }
  for (; t < length; ++t) {
    const T* row = keys + t * stride;
    for (int64_t h = 0; h < s.n_q; ++h) {
      const float* q = q_seq + h * s.dim;
      const T* k = row + (h / s.group) * s.dim;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < s.dim; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k + c), acc);
      scores[h * length + t] = hsum(acc) * scale;
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
                          float* o_seq) {
  const int64_t stride = s.n_kv * s.dim;
  for (int64_t h = 0; h < s.n_q; ++h) {
    const float* w = weights + h * length;
    for (int64_t c0 = 0; c0 < s.dim; c0 += kChunk) {
      const int64_t width = std::min(kChunk, s.dim - c0) / 8;
      const T* v = values + (h / s.group) * s.dim + c0;
      __m256 acc[kChunk / 8];
      for (int64_t c = 0; c < width; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t t = 0; t < length; ++t) {
        const __m256 wt = _mm256_broadcast_ss(w + t);
        const T* row = v + t * stride;
        for (int64_t c = 0; c < width; ++c) acc[c] = _mm256_fmadd_ps(wt, load8(row + c * 8), acc[c]);
      }
      for (int64_t c = 0; c < width; ++c) _mm256_storeu_ps(o_seq + h * s.dim + c0 + c * 8, acc[c]);
    }
  }
}
#endif

template <typename T>
void attend(const Shape& shape, const float* q, const T* k, const T* v, float* o, const int64_t* first,
            const int64_t* count, int64_t n_seqs, int64_t slots, float fscale) {
  const int64_t n_q = shape.n_q, n_kv = shape.n_kv, dim = shape.dim;
#ifdef SEESAW_AVX2
  const bool wide = dim % 8 == 0;
#else
  const bool wide = false;
#endif
  std::vector<float> scores, totals(n_q);
  for (int64_t seq = 0; seq < n_seqs; ++seq) {
    const int64_t length = count[seq], start = first[seq];
    TORCH_CHECK(length > 0 && start >= 0 && start + length <= slots, "decode_attention: span outside the cache");
    scores.resize(n_q * length);
    const float* q_seq = q + seq * n_q * dim;
    const T* k_seq = k + start * n_kv * dim;
    const T* v_seq = v + start * n_kv * dim;
    float* o_seq = o + seq * n_q * dim;
#ifdef SEESAW_AVX2
    if (wide) {
      scores_avx2(shape, q_seq, k_seq, length, fscale, scores.data());
      for (int64_t h = 0; h < n_q; ++h) totals[h] = softmax_numerators_avx2(scores.data() + h * length, length);
      weighted_values_avx2(shape, scores.data(), v_seq, length, o_seq);
    }
#endif
    if (!wide) {
      scores_plain(shape, q_seq, k_seq, length, fscale, scores.data());
      for (int64_t h = 0; h < n_q; ++h) totals[h] = softmax_numerators_plain(scores.data() + h * length, length);
      weighted_values_plain(shape, scores.data(), v_seq, length, o_seq);
    }
    for (int64_t h = 0; h < n_q; ++h) {
      const float inverse = 1.f / totals[h];
      for (int64_t i = 0; i < dim; ++i) o_seq[h * dim + i] *= inverse;
    }
  }
}

}  // namespace

// query [N, Hq, D] float32; keys/values [slots, Hkv, D] float32 or bfloat16; starts/lengths [N] (int64):
// sequence n attends to slots starts[n] .. starts[n] + lengths[n] - 1. Query head h uses KV head
// h / (Hq / Hkv). Returns [N, Hq, D] float32.
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                               torch::Tensor starts, torch::Tensor lengths, double scale) {
  const auto cache_type = keys.scalar_type();
  TORCH_CHECK(query.scalar_type() == torch::kFloat && values.scalar_type() == cache_type &&
              (cache_type == torch::kFloat || cache_type == torch::kBFloat16),
              "decode_attention: a float32 query over a float32 or bfloat16 cache only");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous(),
              "decode_attention: contiguous tensors only");
  TORCH_CHECK(starts.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong,
              "decode_attention: int64 starts and lengths");
  const int64_t n_seqs = query.size(0), n_q = query.size(1), dim = query.size(2), n_kv = keys.size(1);
  TORCH_CHECK(n_q % n_kv == 0 && keys.size(2) == dim && values.sizes() == keys.sizes(),
              "decode_attention: head shapes do not match");
  const Shape shape{n_q, n_kv, dim, n_q / n_kv};
  auto out = torch::empty_like(query);
  const float fscale = static_cast<float>(scale);
  if (cache_type == torch::kFloat) {
    attend(shape, query.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), out.data_ptr<float>(),
           starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), n_seqs, keys.size(0), fscale);
  } else {
    attend(shape, query.data_ptr<float>(), keys.data_ptr<c10::BFloat16>(), values.data_ptr<c10::BFloat16>(),
           out.data_ptr<float>(), starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), n_seqs, keys.size(0),
           fscale);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "seesaw_ds decode attention over one layer's cache (CPU, float32 or bfloat16 cache)");
}

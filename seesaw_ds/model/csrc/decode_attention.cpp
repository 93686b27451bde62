// Attention for the engine's two step kinds, every sequence of a batch in one call per layer (CPU).
//
// decode_attention: one new query token per sequence over the device-tier KV cache of one layer (float32,
// bfloat16 or float16 cache; query and arithmetic in float32). The cache is token-major
// ([slots, kv_heads, head_dim]) and a sequence's KV is a list of runs of consecutive slots (its block
// table, merged where blocks are adjacent), so each run's keys (then values) are read once, front to back,
// a block of rows at a time with every head of those rows while they are in L1. Per sequence: scores for
// every query head over all of its runs, an optional sliding window (only the last `window` tokens) and logit
// soft-cap (cap * tanh(s / cap), Gemma 2), a max-subtracted softmax, then the weighted sum of values divided
// by the softmax total. Sequences are spread over the intra-op threads (at::parallel_for; the extension is
// built with OpenMP, without which that header-only loop runs serially), longest first, each thread taking
// the next when done; the GIL is released for the call. paged_decode_attention is the engine's entry: it
// takes the step's block table and lengths (views of the executor's persistent step buffers), writes the new
// token's K/V into the cache, merges each sequence's adjacent blocks into runs and attends, all in one call per
// layer (no Python per sequence, no tensor operations around it).
//
// Three implementations of the three loops, one chosen per call by the build and the head size:
// - AVX-512 (built with -mavx512f/bw/vl/dq; head_dim a multiple of 16): sixteen float lanes.
// - AVX2 + FMA + F16C (head_dim a multiple of 8; in the AVX-512 build, the head sizes that are not multiples
//   of 16): eight lanes. The two share their loops (scores_vec, weighted_values_vec), written over the
//   vector type (struct Avx2 / Avx512).
// - plain loops (anything else, or a build without AVX2): the same results up to float rounding.
// In the vector loops the query heads that share a KV head (GQA) are computed together, up to four at a time:
// each key row is read and widened once for all of them and dotted with each as independent FMA chains
// (S heads x R rows of accumulators, reduced together at the end: one dot per head and row would be one
// chain of dependent FMAs), and each value row is widened once and added into every head's accumulators in
// registers. The exponentials are a polynomial over the lanes. A bfloat16 cache is widened to float32 as it
// is read (a bfloat16 is the top half of a float32), a float16 one through F16C: half the bytes from memory,
// the same float32 arithmetic. A sequence's keys and values are prefetched into L2 as its keys are read, run
// after run (Prefetcher): decode attention streams the whole cache from memory once per layer, and the
// hardware prefetchers start cold at every run of a fragmented block table.
//
// Measured (launch/bench_attention.py: SmolLM2-135M, 9 query / 3 KV heads of 64, 64 sequences of 100-700
// tokens, bf16 cache streamed from memory, one thread, EPYC Zen 4 guest): the AVX-512 build in 0.44x the time
// of the AVX2 loops before (one query head at a time, prefetch into L1 within a run), this AVX2 build in about
// 0.5x (the AVX-512 loops 0.87x of it; 0.8x with the cache in L2). Most of the gain is GQA reuse and the
// prefetch into L2, the values' during the scores pass. With runs of 16 slots scattered over the cache: 0.27x
// (prefetching across runs: 0.6x of prefetching within each). _mm512_dpbf16_ps for the scores (the query
// split into two bfloat16 halves to keep float32 accuracy) measured 1.11x slower than the FMAs, so unused.
//
// prefill_attention: a packed row of ragged prompts ([heads, T, head_dim], boundaries in cu_seqlens), causal
// within each prompt (and over the prompt's cached prefix, when it has one), through ATen: float32 GEMMs over
// blocks of query rows (causal_blocked), torch's fused SDPA where a window binds, the eager formula for a
// soft-cap. The loop over prompts runs here rather than in Python: one call per layer and step. Measured on
// the EPYC guest (launch/profile_prefill.py, SmolLM2 bf16, one rank's prefill steps of the bench's prompts,
// one thread): ATen's bf16 SDPA per prompt was ~26% of a prefill step; causal_blocked with 32-row blocks cut
// the step's time by 13-17% (blocks of 16/48/64 rows: less). In the AVX512_BF16 build a bfloat16 prompt's
// scores skip the float32 copies and GEMM: VDPBF16PS over K packed in pairs, tiles of 32 keys by 8 query rows,
// and the softmax of each row over its own keys in one pass (causal_blocked_bf16; the weighted sum stays a
// float32 GEMM): attention 1.51 -> 0.96 s of a 7.6 s one-thread profile of the bench's prompts.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SEESAW_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define SEESAW_AVX512 1
#if defined(__AVX512BF16__)
#define SEESAW_DPBF16 1
#endif
#endif
#endif

namespace {

// which loops a call runs: the build's widest that the head size allows
enum class Path { plain, avx2, avx512 };

struct Shape {
  int64_t n_q, n_kv, dim, group;
};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// a run of a sequence's KV: `count` consecutive cache slots from `first`
struct Span {
  int64_t first, count;
};

// Software prefetch of one sequence's keys or values, run after run (a run's rows are consecutive in the
// cache: one range of bytes), each cache line once and in order, kept kPrefetchBytes ahead of the rows being
// read (columns: the sequence's tokens in order, across its runs, so that the next run of a fragmented block
// table is on its way before the last one ends), into L2 (prefetcht1). Measured on the EPYC (Zen 4) guest,
// bf16 SmolLM2 shapes, KV streamed from memory: into L1 (prefetcht0) the prefetches stall on the L1's miss
// buffers and the kernel ran 1.6x slower; 4, 8 and 16 KiB ahead alike; prefetching only every other line
// (leaving the rest to the adjacent-line prefetcher) 1.7x slower.
constexpr int64_t kPrefetchBytes = 8192;

template <typename T>
class Prefetcher {
 public:
  Prefetcher(const T* cache, const Span* spans, int64_t n_spans, int64_t stride)
      : cache_(cache),
        spans_(spans),
        n_spans_(n_spans),
        stride_(stride),
        ahead_((kPrefetchBytes + stride * static_cast<int64_t>(sizeof(T)) - 1) /
               (stride * static_cast<int64_t>(sizeof(T)))) {
    start();
  }
  // every line of the rows of columns < column + the distance
  void upto(int64_t column) {
    const int64_t target = column + ahead_;
    while (span_ < n_spans_) {
      const Span& run = spans_[span_];
      const int64_t rows = std::min(target - span_column_, run.count);
      const char* stop = reinterpret_cast<const char*>(cache_ + (run.first + rows) * stride_);
      for (; next_ < stop; next_ += 64) __builtin_prefetch(next_, 0, 2);
      if (rows < run.count) return;
      span_column_ += run.count;
      ++span_;
      start();
    }
  }

 private:
  void start() {
    if (span_ < n_spans_)
      next_ = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(cache_ + spans_[span_].first * stride_) &
                                            ~uintptr_t{63});
  }
  const T* cache_;
  const Span* spans_;
  int64_t n_spans_, stride_, ahead_;
  int64_t span_ = 0, span_column_ = 0;
  const char* next_ = nullptr;
};

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
// ------------------------------------------------------------------------------------ both vector paths
// how many of the `left` query heads of a KV head to compute together: up to four (3 + 2 for five, ...)
inline int64_t sub_group(int64_t left) { return left > 4 ? 3 : left; }

// ---------------------------------------------------------------------------------------------- AVX2
#define SEESAW_INLINE __attribute__((always_inline)) inline

SEESAW_INLINE float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

SEESAW_INLINE float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// lane i = the sum of the lanes of a[i], i < 8
SEESAW_INLINE __m256 sum_each(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  // s0123 = [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], likewise s4567
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// lane i = the sum of the lanes of a[i], i < 4
SEESAW_INLINE __m128 sum_each4(const __m256* a) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// The two vector paths share their loops (below), written over one of these: the vector, its lanes, how many
// key rows a sub-group of S query heads dots at once (S * rows(S) accumulators: 8 or 12 of AVX2's 16
// registers, 16 or 24 of AVX-512's 32), how many accumulators the value sum keeps, the loads that widen a
// cache's dtype to float32 lanes, the arithmetic of exp_nonpositive, and the horizontal sums.
struct Avx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static constexpr int64_t kBlock = 8;   // key rows per block
  static constexpr int kValueAccumulators = 12;
  static constexpr int rows(int s) { return s == 1 ? 8 : s == 4 ? 2 : 4; }
  // eight cache values as float32 lanes
  static SEESAW_INLINE Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static SEESAW_INLINE Vec load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static SEESAW_INLINE Vec load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static SEESAW_INLINE Vec loadf(const float* p) { return _mm256_loadu_ps(p); }
  static SEESAW_INLINE void storef(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static SEESAW_INLINE Vec set1(float x) { return _mm256_set1_ps(x); }
  static SEESAW_INLINE Vec zero() { return _mm256_setzero_ps(); }
  static SEESAW_INLINE Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static SEESAW_INLINE Vec fnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
  static SEESAW_INLINE Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static SEESAW_INLINE Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static SEESAW_INLINE Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static SEESAW_INLINE Vec round(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for whole n in [-126, 0], through the exponent bits
  static SEESAW_INLINE Vec times_pow2(Vec p, Vec n) {
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(
                                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
  }

  // scale * the sums of dots[s * R + j] to out[s * ld + j], j < n
  template <int S, int R>
  static SEESAW_INLINE void store_scores(const Vec* dots, int64_t n, float scale, float* out, int64_t ld) {
    static_assert(S * R == 8 || S * R == 12, "8 or 12 accumulators");
    alignas(32) float sums[S * R];
    _mm256_store_ps(sums, _mm256_mul_ps(sum_each(dots), _mm256_set1_ps(scale)));
    if constexpr (S * R == 12) _mm_store_ps(sums + 8, _mm_mul_ps(sum_each4(dots + 8), _mm_set1_ps(scale)));
    for (int s = 0; s < S; ++s)
      for (int64_t j = 0; j < n; ++j) out[s * ld + j] = sums[s * R + j];
  }
};
#endif

#ifdef SEESAW_AVX512
// ------------------------------------------------------------------------------------------- AVX-512
// The horizontal sums of many accumulators at once, as a tree of pairwise folds (each fold halves the lanes
// per accumulator and packs two accumulators' partial sums into one register):
// [a.lo256 + a.hi256 | b.lo256 + b.hi256]
SEESAW_INLINE __m512 fold256(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_mask_blend_ps(0xFF00, a, b), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 3, 2)));
}
// a = [A | B], b = [C | D] (8 partials each) -> 128-bit lanes [A, B, C, D] (4 partials each)
SEESAW_INLINE __m512 fold128(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}
// per 128-bit lane: a's 4 partials, b's 4 partials -> [a, a, b, b] (2 partials each)
SEESAW_INLINE __m512 fold64(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
// per 128-bit lane: [a, a, c, c], [b, b, d, d] (2 partials each) -> [a, c, b, d]
SEESAW_INLINE __m512 fold32(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

// lane i = the sum of the lanes of dots[i], i < 16. The tree leaves input slot 4k + m in lane 4m + k, so slot
// p is fed dots[4 (p % 4) + p / 4] (a transpose, its own inverse) and the lanes come out in order.
SEESAW_INLINE __m512 sum16(const __m512* dots) {
  auto in = [dots](int p) { return dots[4 * (p % 4) + p / 4]; };
  const __m512 s0 = fold256(in(0), in(1)), s1 = fold256(in(2), in(3)), s2 = fold256(in(4), in(5)),
               s3 = fold256(in(6), in(7)), s4 = fold256(in(8), in(9)), s5 = fold256(in(10), in(11)),
               s6 = fold256(in(12), in(13)), s7 = fold256(in(14), in(15));
  const __m512 u0 = fold128(s0, s1), u1 = fold128(s2, s3), u2 = fold128(s4, s5), u3 = fold128(s6, s7);
  return fold32(fold64(u0, u1), fold64(u2, u3));
}

// lane i = the sum of the lanes of dots[i], i < 8
SEESAW_INLINE __m256 sum8(const __m512* dots) {
  const __m512 v = fold64(fold128(fold256(dots[0], dots[1]), fold256(dots[2], dots[3])),
                          fold128(fold256(dots[4], dots[5]), fold256(dots[6], dots[7])));
  const __m512 w = fold32(v, v);  // lane 4m + k (k < 2): dots[4k + m]
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, w));
}

// Measured (bf16 SmolLM2 shapes, KV from memory): 8 or 16 key rows per block alike, 32 slower (1.35x: the
// prefetches of a block come in one burst); value blocks of 8-32 rows alike, 64 slower.
struct Avx512 {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int64_t kBlock = 16;  // key rows per block
  static constexpr int kValueAccumulators = 24;
  static constexpr int rows(int s) { return s == 1 ? 16 : s == 4 ? 4 : 8; }
  // sixteen cache values as float32 lanes
  static SEESAW_INLINE Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static SEESAW_INLINE Vec load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static SEESAW_INLINE Vec load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static SEESAW_INLINE Vec loadf(const float* p) { return _mm512_loadu_ps(p); }
  static SEESAW_INLINE void storef(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static SEESAW_INLINE Vec set1(float x) { return _mm512_set1_ps(x); }
  static SEESAW_INLINE Vec zero() { return _mm512_setzero_ps(); }
  static SEESAW_INLINE Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static SEESAW_INLINE Vec fnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  static SEESAW_INLINE Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static SEESAW_INLINE Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static SEESAW_INLINE Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static SEESAW_INLINE Vec round(Vec x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // p * 2^n (scalef: the same product as AVX2's exponent bits for whole n in [-126, 0])
  static SEESAW_INLINE Vec times_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }

  // scale * the sums of dots[s * R + j] to out[s * ld + j], j < n (masked stores)
  template <int S, int R>
  static SEESAW_INLINE void store_scores(const Vec* dots, int64_t n, float scale, float* out, int64_t ld) {
    static_assert(S * R == 16 || S * R == 24, "16 or 24 accumulators");
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512 sums = _mm512_mul_ps(sum16(dots), vscale);  // dots s * R + j < 16
    if constexpr (R == 16) {
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), sums);
    } else if constexpr (R == 8) {
      const __mmask8 mask = static_cast<__mmask8>((1u << n) - 1);
      _mm256_mask_storeu_ps(out, mask, _mm512_castps512_ps256(sums));
      _mm256_mask_storeu_ps(out + ld, mask, _mm512_extractf32x8_ps(sums, 1));
      if constexpr (S == 3)
        _mm256_mask_storeu_ps(out + 2 * ld, mask, _mm256_mul_ps(sum8(dots + 16), _mm512_castps512_ps256(vscale)));
    } else {
      static_assert(R == 4, "4, 8 or 16 rows");
      const __mmask8 mask = static_cast<__mmask8>((1u << n) - 1);
      _mm_mask_storeu_ps(out, mask, _mm512_castps512_ps128(sums));
      _mm_mask_storeu_ps(out + ld, mask, _mm512_extractf32x4_ps(sums, 1));
      _mm_mask_storeu_ps(out + 2 * ld, mask, _mm512_extractf32x4_ps(sums, 2));
      _mm_mask_storeu_ps(out + 3 * ld, mask, _mm512_extractf32x4_ps(sums, 3));
    }
  }
};
#endif

#ifdef SEESAW_AVX2
// --------------------------------------------------------------------- the vector loops (AVX2, AVX-512)
// e^x for x <= 0 (softmax numerators), over an ISA's lanes: x = n ln2 + r, |r| <= ln2 / 2; e^r by a degree-7
// polynomial (Cephes' expf coefficients), times 2^n. Below -87 the result is 0 or denormal.
template <typename Isa>
inline typename Isa::Vec exp_nonpositive(typename Isa::Vec x) {
  using Vec = typename Isa::Vec;
  x = Isa::max(x, Isa::set1(-87.0f));
  const Vec n = Isa::round(Isa::mul(x, Isa::set1(1.44269504088896341f)));
  Vec r = Isa::fnma(n, Isa::set1(0.693359375f), x);
  r = Isa::fnma(n, Isa::set1(-2.12194440e-4f), r);
  Vec p = Isa::set1(1.9875691500e-4f);
  p = Isa::fma(p, r, Isa::set1(1.3981999507e-3f));
  p = Isa::fma(p, r, Isa::set1(8.3334519073e-3f));
  p = Isa::fma(p, r, Isa::set1(4.1665795894e-2f));
  p = Isa::fma(p, r, Isa::set1(1.6666665459e-1f));
  p = Isa::fma(p, r, Isa::set1(5.0000001201e-1f));
  p = Isa::fma(p, Isa::mul(r, r), r);
  p = Isa::add(p, Isa::set1(1.0f));
  return Isa::times_pow2(p, n);
}

// exp(row - max(row)) in place, returns the sum (as softmax_numerators_plain): AVX2 with a scalar tail
float softmax_numerators_avx2(float* row, int64_t length) {
  __m256 vpeak = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) vpeak = _mm256_max_ps(vpeak, _mm256_loadu_ps(row + i));
  float peak = hmax(vpeak);
  for (; i < length; ++i) peak = std::max(peak, row[i]);
  const __m256 shift = _mm256_set1_ps(peak);
  __m256 vtotal = _mm256_setzero_ps();
  for (i = 0; i + 8 <= length; i += 8) {
    const __m256 e = exp_nonpositive<Avx2>(_mm256_sub_ps(_mm256_loadu_ps(row + i), shift));
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

#ifdef SEESAW_AVX512
// AVX-512, the tail under a mask
float softmax_numerators_avx512(float* row, int64_t length) {
  const int64_t whole = length - length % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (length - whole)) - 1);
  __m512 vpeak = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < whole; i += 16) vpeak = _mm512_max_ps(vpeak, _mm512_loadu_ps(row + i));
  vpeak = _mm512_max_ps(vpeak, _mm512_mask_loadu_ps(vpeak, tail, row + whole));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(vpeak));
  __m512 vtotal = _mm512_setzero_ps();
  for (int64_t i = 0; i < whole; i += 16) {
    const __m512 e = exp_nonpositive<Avx512>(_mm512_sub_ps(_mm512_loadu_ps(row + i), shift));
    _mm512_storeu_ps(row + i, e);
    vtotal = _mm512_add_ps(vtotal, e);
  }
  const __m512 e = exp_nonpositive<Avx512>(_mm512_sub_ps(_mm512_mask_loadu_ps(shift, tail, row + whole), shift));
  _mm512_mask_storeu_ps(row + whole, tail, e);
  vtotal = _mm512_mask_add_ps(vtotal, tail, vtotal, e);
  return _mm512_reduce_add_ps(vtotal);
}
#endif

// Under GQA the query heads that share a KV head are computed together, a sub-group of up to four at a time:
// each key and value row is read and widened once for all of them instead of once per query head.

// S query heads (q: S rows, dim apart) against up to R key rows (k: row 0, `stride` apart; n <= R valid):
// S * R dot products as S * R independent FMA chains, summed together, scaled and stored to out[s * ld + j].
// Rows past n repeat row n - 1 (no read past the run) and are not stored.
template <typename Isa, int S, int R, typename T>
void score_rows(const float* q, const T* k, int64_t stride, int64_t dim, int64_t n, float scale, float* out,
                int64_t ld) {
  using Vec = typename Isa::Vec;
  const T* rows[R];
#pragma GCC unroll 16
  for (int j = 0; j < R; ++j) rows[j] = k + std::min<int64_t>(j, n - 1) * stride;
  Vec acc[S * R];
#pragma GCC unroll 24
  for (int i = 0; i < S * R; ++i) acc[i] = Isa::zero();
  for (int64_t c = 0; c < dim; c += Isa::kLanes) {
    Vec qv[S];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) qv[s] = Isa::loadf(q + s * dim + c);
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      const Vec kv = Isa::load(rows[j] + c);
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) acc[s * R + j] = Isa::fma(qv[s], kv, acc[s * R + j]);
    }
  }
  Isa::template store_scores<S, R>(acc, n, scale, out, ld);
}

template <typename Isa, int S, typename T>
inline void score_block(const float* q, const T* k, int64_t stride, int64_t dim, int64_t n, float scale, float* out,
                        int64_t ld) {
  constexpr int R = Isa::rows(S);
  for (int64_t j = 0; j < n; j += R)
    score_rows<Isa, S, R>(q, k + j * stride, stride, dim, std::min<int64_t>(R, n - j), scale, out + j, ld);
}

// scores[h * ld + t] for t < length, one run of a sequence (see scores_plain), a block of key rows at a time:
// every KV head's query heads over the block while its rows are in L1
// (the run's first column is `column`; the prefetchers walk the sequence's keys, and its values, which are read
// next and would otherwise start cold: measured 13% faster)
template <typename Isa, typename T>
void scores_vec(const Shape& s, const float* q_seq, const T* keys, int64_t length, float scale, float* scores,
                int64_t ld, int64_t column, Prefetcher<T>& key_fetch, Prefetcher<T>& value_fetch) {
  const int64_t stride = s.n_kv * s.dim;
  for (int64_t t = 0; t < length; t += Isa::kBlock) {
    const int64_t n = std::min(Isa::kBlock, length - t);
    for (int64_t kv = 0; kv < s.n_kv; ++kv) {
      // the block's prefetches a share per KV head rather than in one burst (measured: 16% faster)
      key_fetch.upto(column + t + n * (kv + 1) / s.n_kv);
      value_fetch.upto(column + t + n * (kv + 1) / s.n_kv);
      const T* k = keys + t * stride + kv * s.dim;
      for (int64_t h = kv * s.group, left = s.group; left > 0;) {
        const int64_t take = sub_group(left);
        const float* q = q_seq + h * s.dim;
        float* out = scores + h * ld + t;
        switch (take) {
          case 1: score_block<Isa, 1>(q, k, stride, s.dim, n, scale, out, ld); break;
          case 2: score_block<Isa, 2>(q, k, stride, s.dim, n, scale, out, ld); break;
          case 3: score_block<Isa, 3>(q, k, stride, s.dim, n, scale, out, ld); break;
          default: score_block<Isa, 4>(q, k, stride, s.dim, n, scale, out, ld); break;
        }
        h += take;
        left -= take;
      }
    }
  }
}

// o[s * dim + c] (c < V vectors) += sum over t < n of w[s * ld + t] * value row t (v: row 0, `stride` apart)
// for the S heads of a sub-group: S * V accumulators in registers, each row widened once for the S heads
template <typename Isa, int S, int V, typename T>
void value_rows(const float* w, int64_t ld, const T* v, int64_t stride, int64_t n, float* o, int64_t dim) {
  using Vec = typename Isa::Vec;
  constexpr int L = Isa::kLanes;
  Vec acc[S * V];
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) acc[s * V + c] = Isa::loadf(o + s * dim + c * L);
  for (int64_t t = 0; t < n; ++t) {
    const T* row = v + t * stride;
    Vec wt[S];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) wt[s] = Isa::set1(w[s * ld + t]);
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) {
      const Vec x = Isa::load(row + c * L);
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) acc[s * V + c] = Isa::fma(wt[s], x, acc[s * V + c]);
    }
  }
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) Isa::storef(o + s * dim + c * L, acc[s * V + c]);
}

// the head's dims in chunks of 8, 4, 2, 1 vectors, at most Isa::kValueAccumulators for the sub-group
template <typename Isa, int S, typename T>
void value_block(const float* w, int64_t ld, const T* v, int64_t stride, int64_t n, float* o, int64_t dim) {
  constexpr int budget = Isa::kValueAccumulators / S;
  constexpr int widest = budget >= 8 ? 8 : budget >= 4 ? 4 : 2;
  constexpr int L = Isa::kLanes;
  for (int64_t c = 0; c < dim;) {
    const int64_t left = (dim - c) / L;
    if constexpr (widest >= 8) {
      if (left >= 8) {
        value_rows<Isa, S, 8>(w, ld, v + c, stride, n, o + c, dim);
        c += 8 * L;
        continue;
      }
    }
    if constexpr (widest >= 4) {
      if (left >= 4) {
        value_rows<Isa, S, 4>(w, ld, v + c, stride, n, o + c, dim);
        c += 4 * L;
        continue;
      }
    }
    if (left >= 2) {
      value_rows<Isa, S, 2>(w, ld, v + c, stride, n, o + c, dim);
      c += 2 * L;
    } else {
      value_rows<Isa, S, 1>(w, ld, v + c, stride, n, o + c, dim);
      c += L;
    }
  }
}

constexpr int64_t kValueRows = 32;  // value rows per block: every head's share while they are in L1

// o_seq [n_q, dim] += the weighted values of one run (see weighted_values_plain), a block of rows at a time.
// Most lines were asked for by the scores pass; asking again as the rows come near still measured 1.3x faster.
template <typename Isa, typename T>
void weighted_values_vec(const Shape& s, const float* weights, const T* values, int64_t length, float* o_seq,
                         int64_t ld, int64_t column, Prefetcher<T>& fetch) {
  const int64_t stride = s.n_kv * s.dim;
  for (int64_t t = 0; t < length; t += kValueRows) {
    const int64_t n = std::min(kValueRows, length - t);
    for (int64_t kv = 0; kv < s.n_kv; ++kv) {
      fetch.upto(column + t + n * (kv + 1) / s.n_kv);
      const T* v = values + t * stride + kv * s.dim;
      for (int64_t h = kv * s.group, left = s.group; left > 0;) {
        const int64_t take = sub_group(left);
        const float* w = weights + h * ld + t;
        float* o = o_seq + h * s.dim;
        switch (take) {
          case 1: value_block<Isa, 1>(w, ld, v, stride, n, o, s.dim); break;
          case 2: value_block<Isa, 2>(w, ld, v, stride, n, o, s.dim); break;
          case 3: value_block<Isa, 3>(w, ld, v, stride, n, o, s.dim); break;
          default: value_block<Isa, 4>(w, ld, v, stride, n, o, s.dim); break;
        }
        h += take;
        left -= take;
      }
    }
  }
}
#endif

// the widest path of this build whose vectors divide the head size
inline Path choose_path(int64_t dim) {
  (void)dim;  // unused in the portable build
#ifdef SEESAW_AVX512
  if (dim % 16 == 0) return Path::avx512;
#endif
#ifdef SEESAW_AVX2
  if (dim % 8 == 0) return Path::avx2;
#endif
  return Path::plain;
}

// One run's scores, softmax numerators and weighted values on the chosen path (the plain loops leave the
// prefetching to the hardware)
template <typename T>
inline void run_scores(Path path, const Shape& shape, const float* q_seq, const T* k, int64_t count, float scale,
                       float* scores, int64_t ld, int64_t column, Prefetcher<T>& key_fetch,
                       Prefetcher<T>& value_fetch) {
  (void)path, (void)column, (void)key_fetch, (void)value_fetch;
#ifdef SEESAW_AVX512
  if (path == Path::avx512)
    return scores_vec<Avx512>(shape, q_seq, k, count, scale, scores, ld, column, key_fetch, value_fetch);
#endif
#ifdef SEESAW_AVX2
  if (path == Path::avx2)
    return scores_vec<Avx2>(shape, q_seq, k, count, scale, scores, ld, column, key_fetch, value_fetch);
#endif
  scores_plain(shape, q_seq, k, count, scale, scores, ld);
}

template <typename T>
inline void run_values(Path path, const Shape& shape, const float* weights, const T* v, int64_t count,
                       float* o_seq, int64_t ld, int64_t column, Prefetcher<T>& value_fetch) {
  (void)path, (void)column, (void)value_fetch;
#ifdef SEESAW_AVX512
  if (path == Path::avx512)
    return weighted_values_vec<Avx512>(shape, weights, v, count, o_seq, ld, column, value_fetch);
#endif
#ifdef SEESAW_AVX2
  if (path == Path::avx2) return weighted_values_vec<Avx2>(shape, weights, v, count, o_seq, ld, column, value_fetch);
#endif
  weighted_values_plain(shape, weights, v, count, o_seq, ld);
}

inline float numerators(Path path, float* row, int64_t length) {
  (void)path;
#ifdef SEESAW_AVX512
  if (path == Path::avx512) return softmax_numerators_avx512(row, length);
#endif
#ifdef SEESAW_AVX2
  if (path == Path::avx2) return softmax_numerators_avx2(row, length);
#endif
  return softmax_numerators_plain(row, length);
}

// One sequence: its runs (first slot, count), of which the first `skip` tokens are outside the window,
// `length` tokens in all after it.
template <typename T>
void attend_one(const Shape& shape, const float* q_seq, const T* k, const T* v, float* o_seq,
                const int64_t* run_first, const int64_t* run_count, int64_t n_runs, int64_t skip, int64_t length,
                float scale, float softcap, Path path, std::vector<float>& scores, std::vector<float>& totals,
                std::vector<Span>& spans) {
  const int64_t n_q = shape.n_q, stride = shape.n_kv * shape.dim, dim = shape.dim;
  scores.resize(n_q * length);
  totals.resize(n_q);
  spans.clear();
  for (int64_t r = 0, skipped = 0; r < n_runs; ++r) {  // the runs inside the window
    const int64_t drop = std::min(run_count[r], skip - skipped);
    skipped += drop;
    if (run_count[r] > drop) spans.push_back({run_first[r] + drop, run_count[r] - drop});
  }
  const int64_t n_spans = static_cast<int64_t>(spans.size());
  std::fill(o_seq, o_seq + n_q * dim, 0.f);
  // scores over every run, then the softmax numerators
  Prefetcher<T> key_fetch(k, spans.data(), n_spans, stride), value_fetch(v, spans.data(), n_spans, stride);
  for (int64_t r = 0, column = 0; r < n_spans; column += spans[r++].count)
    run_scores(path, shape, q_seq, k + spans[r].first * stride, spans[r].count, scale, scores.data() + column,
               length, column, key_fetch, value_fetch);
  if (softcap > 0.f) {
    const float inverse_cap = 1.f / softcap;
    for (int64_t i = 0; i < n_q * length; ++i) scores[i] = softcap * std::tanh(scores[i] * inverse_cap);
  }
  for (int64_t h = 0; h < n_q; ++h) totals[h] = numerators(path, scores.data() + h * length, length);
  // the numerator-weighted sum of values, run by run
  Prefetcher<T> value_refetch(v, spans.data(), n_spans, stride);
  for (int64_t r = 0, column = 0; r < n_spans; column += spans[r++].count)
    run_values(path, shape, scores.data() + column, v + spans[r].first * stride, spans[r].count, o_seq, length,
               column, value_refetch);
  for (int64_t h = 0; h < n_q; ++h) {  // divided once at the end, as SDPA does
    const float inverse = 1.f / totals[h];
    for (int64_t i = 0; i < dim; ++i) o_seq[h * dim + i] *= inverse;
  }
}

template <typename T>
void attend(const Shape& shape, const float* q, const T* k, const T* v, float* o, const int64_t* offsets,
            const int64_t* run_first, const int64_t* run_count, const int64_t* skips, const int64_t* lengths,
            int64_t n_seqs, float scale, float softcap) {
  const Path path = choose_path(shape.dim);
  const int64_t per_seq = shape.n_q * shape.dim;
  // longest first, each thread taking the next sequence when done with one: the lengths of a batch differ
  // several-fold, and equal slices of it would leave a thread idle
  std::vector<int64_t> order(n_seqs);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [lengths](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_seqs));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scores, totals;
    std::vector<Span> spans;
    for (int64_t i = next.fetch_add(1); i < n_seqs; i = next.fetch_add(1)) {
      const int64_t seq = order[i], lo = offsets[seq], hi = offsets[seq + 1];
      attend_one(shape, q + seq * per_seq, k, v, o + seq * per_seq, run_first + lo, run_count + lo, hi - lo,
                 skips[seq], lengths[seq], scale, softcap, path, scores, totals, spans);
    }
  });
}

}  // namespace

namespace {

// The checks and the dispatch shared by both entry points: query [N, Hq, D] float32 over keys/values
// [slots, Hkv, D]; sequence n's KV is the runs off[n] .. off[n+1] of (first, count), in token order.
torch::Tensor attend_runs(const torch::Tensor& query, const torch::Tensor& keys, const torch::Tensor& values,
                          const int64_t* off, const int64_t* first, const int64_t* count, int64_t n_runs,
                          double scale, int64_t window, double softcap) {
  const auto cache_type = keys.scalar_type();
  TORCH_CHECK(query.scalar_type() == torch::kFloat && values.scalar_type() == cache_type &&
              (cache_type == torch::kFloat || cache_type == torch::kBFloat16 || cache_type == torch::kHalf),
              "decode_attention: a float32 query over a float32, bfloat16 or float16 cache only");
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous(),
              "decode_attention: contiguous tensors only");
  const int64_t n_seqs = query.size(0), n_q = query.size(1), dim = query.size(2), n_kv = keys.size(1);
  TORCH_CHECK(n_q % n_kv == 0 && keys.size(2) == dim && values.sizes() == keys.sizes(),
              "decode_attention: head shapes do not match");
  // every run inside the cache, every sequence non-empty: checked here, before the threads start
  const int64_t slots = keys.size(0);
  TORCH_CHECK(off[0] == 0 && off[n_seqs] == n_runs, "decode_attention: offsets do not cover the runs");
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

// Row `seq`'s new key (or value) [Hkv, D], already in the cache's dtype, into cache slot `slot`.
void write_rows(const torch::Tensor& rows, torch::Tensor& cache, const int64_t* write_slots, int64_t n_seqs) {
  const int64_t row_bytes = cache.size(1) * cache.size(2) * cache.element_size(), slots = cache.size(0);
  const char* from = static_cast<const char*>(rows.data_ptr());
  char* to = static_cast<char*>(cache.data_ptr());
  for (int64_t seq = 0; seq < n_seqs; ++seq) {
    TORCH_CHECK(write_slots[seq] >= 0 && write_slots[seq] < slots,
                "paged_decode_attention: write slot outside the cache");
    std::memcpy(to + write_slots[seq] * row_bytes, from + seq * row_bytes, row_bytes);
  }
}

}  // namespace

// query [N, Hq, D] float32; keys/values [slots, Hkv, D] float32, bfloat16 or float16; sequence n's KV is the
// runs offsets[n] .. offsets[n+1] of (run_first, run_count) (int64 slots), in token order. window > 0 keeps
// only each sequence's last `window` tokens; softcap > 0 caps the scores. Query head h uses KV head
// h / (Hq / Hkv). Returns [N, Hq, D] float32.
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                               torch::Tensor offsets, torch::Tensor run_first, torch::Tensor run_count,
                               double scale, int64_t window, double softcap) {
  for (const auto& t : {offsets, run_first, run_count})
    TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1,
                "decode_attention: int64 offsets and runs");
  TORCH_CHECK(offsets.size(0) == query.size(0) + 1 && run_first.size(0) == run_count.size(0),
              "decode_attention: offsets must have one entry per sequence plus one");
  return attend_runs(query, keys, values, offsets.data_ptr<int64_t>(), run_first.data_ptr<int64_t>(),
                     run_count.data_ptr<int64_t>(), run_first.size(0), scale, window, softcap);
}

// One layer of a decode step over the block table, in one call: the new token's key and value of each
// sequence ([N, Hkv, D], any float dtype) written into the cache (keys/values [slots, Hkv, D], slot = block *
// block_size + offset) at write_slots[n], then attention of query [N, Hq, D] (any float dtype; float32 inside)
// over sequence n's first lengths[n] tokens, which lie in blocks block_table[n][0], [1], ... (int64 rows of
// at least that many blocks; rows and the vectors may be longer than N: the step's views of fixed buffers).
// Adjacent blocks are read as one run. window/softcap as decode_attention. Returns [N, Hq, D] in the query's
// dtype.
torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor new_keys, torch::Tensor new_values,
                                     torch::Tensor keys, torch::Tensor values, torch::Tensor block_table,
                                     torch::Tensor lengths, torch::Tensor write_slots, int64_t block_size,
                                     double scale, int64_t window, double softcap) {
  const int64_t n_seqs = query.size(0);
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && block_table.dim() == 2 && block_table.stride(1) == 1 &&
              block_table.size(0) >= n_seqs, "paged_decode_attention: an int64 [>= N, blocks] block table");
  for (const auto& t : {lengths, write_slots})
    TORCH_CHECK(t.scalar_type() == torch::kLong && t.dim() == 1 && t.stride(0) == 1 && t.size(0) >= n_seqs,
                "paged_decode_attention: int64 lengths and write slots, one per sequence");
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.is_contiguous() && values.sizes() == keys.sizes() &&
              block_size > 0 && keys.size(0) % block_size == 0,
              "paged_decode_attention: contiguous [slots, Hkv, D] caches of whole blocks");
  TORCH_CHECK(new_keys.dim() == 3 && new_keys.size(0) == n_seqs && new_keys.size(1) == keys.size(1) &&
              new_keys.size(2) == keys.size(2) && new_values.sizes() == new_keys.sizes(),
              "paged_decode_attention: new keys/values [N, Hkv, D]");
  const auto fresh_keys = new_keys.to(keys.scalar_type()).contiguous();
  const auto fresh_values = new_values.to(values.scalar_type()).contiguous();
  const int64_t* slot = write_slots.data_ptr<int64_t>();
  write_rows(fresh_keys, keys, slot, n_seqs);
  write_rows(fresh_values, values, slot, n_seqs);
  // each sequence's blocks as runs of adjacent slots
  const int64_t num_blocks = keys.size(0) / block_size, row_stride = block_table.stride(0);
  const int64_t max_blocks = block_table.size(1);
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  std::vector<int64_t> offsets(n_seqs + 1, 0), first, count;
  for (int64_t seq = 0; seq < n_seqs; ++seq) {
    TORCH_CHECK(length[seq] > 0 && length[seq] <= max_blocks * block_size,
                "paged_decode_attention: a length outside the block table");
    for (int64_t b = 0, done = 0; done < length[seq]; ++b) {
      const int64_t block = table[seq * row_stride + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "paged_decode_attention: a block outside the cache");
      const int64_t take = std::min(block_size, length[seq] - done);
      if (static_cast<int64_t>(first.size()) > offsets[seq] && first.back() + count.back() == block * block_size) {
        count.back() += take;
      } else {
        first.push_back(block * block_size);
        count.push_back(take);
      }
      done += take;
    }
    offsets[seq + 1] = static_cast<int64_t>(first.size());
  }
  const auto out = attend_runs(query.to(torch::kFloat).contiguous(), keys, values, offsets.data(), first.data(),
                               count.data(), static_cast<int64_t>(first.size()), scale, window, softcap);
  return out.to(query.scalar_type());
}

namespace {

// The causal (and, with window > 0, sliding-window) mask of queries at positions done .. done + L - 1 over keys
// at 0 .. done + L - 1 (attention_reference.window_mask): [L, done + L], true where a query attends.
torch::Tensor window_mask(int64_t done, int64_t length, int64_t window, const torch::TensorOptions& options) {
  auto query_pos = at::arange(done, done + length, options.dtype(at::kLong));
  auto key_pos = at::arange(done + length, options.dtype(at::kLong));
  auto mask = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1);
  if (window > 0) mask = mask & (key_pos.unsqueeze(0) > query_pos.unsqueeze(1) - window);
  return mask;
}

// transformers' eager attention with a soft-cap, for one prompt: q [Hq, L, D] at positions done .. done + L - 1,
// k/v [Hkv, done + L, D] (a cached prefix's keys first when done > 0)
torch::Tensor eager_softcap(const torch::Tensor& q, torch::Tensor k, torch::Tensor v, double scale,
                            int64_t window, double softcap, int64_t done) {
  const int64_t groups = q.size(0) / k.size(0), length = q.size(1);
  if (groups > 1) {
    k = k.repeat_interleave(groups, 0);
    v = v.repeat_interleave(groups, 0);
  }
  auto scores = at::matmul(q, k.transpose(1, 2)) * scale;
  scores = at::tanh(scores / softcap) * softcap;
  auto mask = window_mask(done, length, window, q.options());
  scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  auto weights = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  return at::matmul(weights, v);
}

// Causal attention of one prompt in float32 through batched matrix products, `block_rows` query rows at a time,
// into out [Hq, L, D] (any float dtype): q [Hq, L, D] at positions done .. done + L - 1, k/v [Hkv, done + L, D]
// (a cached prefix's K/V first). A block of rows multiplies only the keys its last row sees (about half of the
// L x L scores, as a causal kernel skips), the query heads of a KV head as one matrix; scores, softmax and the
// weighted sum all in float32 (ATen's fused SDPA rounds the weights to bfloat16 before the sum).
#ifdef SEESAW_DPBF16
void causal_blocked_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                         int64_t done, int64_t block_rows, torch::Tensor out);
bool takes_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);
#endif

void causal_blocked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                    int64_t done, int64_t block_rows, torch::Tensor out) {
#ifdef SEESAW_DPBF16
  if (takes_bf16(q, k, v)) return causal_blocked_bf16(q, k, v, scale, done, block_rows, out);
#endif
  const int64_t n_q = q.size(0), n_kv = k.size(0), groups = n_q / n_kv, length = q.size(1), dim = q.size(2);
  const int64_t n_keys = k.size(1);
  const auto fp32 = q.options().dtype(at::kFloat);
  auto qf = at::empty({n_q, length, dim}, fp32);
  qf.copy_(q).mul_(scale);
  auto kf = at::empty({n_kv, n_keys, dim}, fp32), vf = at::empty({n_kv, n_keys, dim}, fp32);
  kf.copy_(k);
  vf.copy_(v);
  const auto grouped = qf.view({n_kv, groups, length, dim});
  const auto keys_t = kf.transpose(1, 2);
  const auto masked = -std::numeric_limits<float>::infinity();
  for (int64_t r0 = 0; r0 < length; r0 += block_rows) {
    const int64_t r1 = std::min(length, r0 + block_rows), rows = r1 - r0, seen = done + r1;
    auto block = grouped.slice(2, r0, r1).reshape({n_kv, groups * rows, dim});
    auto scores = at::bmm(block, keys_t.slice(2, 0, seen));  // [Hkv, G * rows, seen]
    // row i of the block (position done + r0 + i) sees keys up to done + r0 + i: mask the rest of the last rows
    scores.view({n_kv, groups, rows, seen}).slice(3, done + r0, seen)
        .masked_fill_(at::ones({rows, rows}, fp32.dtype(at::kBool)).triu_(1), masked);
    auto weights = at::_softmax(scores, -1, false);
    auto result = at::bmm(weights, vf.slice(1, 0, seen));  // [Hkv, G * rows, D]
    out.slice(1, r0, r1).copy_(result.view({n_q, rows, dim}));
  }
}

#ifdef SEESAW_DPBF16
// The scores of causal_blocked for bfloat16 queries and keys through VDPBF16PS (the AVX512_BF16 build): each
// product of two bfloat16 is exact in float32 and summed in float32 lanes, as in the float32 GEMM, at twice
// its rate, and without the float32 copies of q and k. Measured in docs/benchmarks.md.

constexpr int64_t kKeyTile = 32;  // keys per tile: two vectors of 16 float32 scores per query row

// One KV head's keys [n, D] (row stride ld, D even) as pairs of bfloat16 (one 32-bit word, VDPBF16PS's
// operand): out[p * n_pad + j] = (k[j][2p], k[j][2p + 1]), zero for n <= j < n_pad.
void pack_key_pairs(const c10::BFloat16* k, int64_t ld, int64_t n, int64_t dim, int64_t n_pad, uint32_t* out) {
  const int64_t pairs = dim / 2;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t row[256];  // dim <= 512 (checked by the caller)
    std::memcpy(row, k + j * ld, dim * sizeof(c10::BFloat16));
    for (int64_t p = 0; p < pairs; ++p) out[p * n_pad + j] = row[p];
  }
  for (int64_t p = 0; p < pairs; ++p) std::fill(out + p * n_pad + n, out + (p + 1) * n_pad, 0u);
}

// out[r * ld + c] = scale * (query row r) . (key j0 + c) for r < NR, c < 32: q[r] a row of D bfloat16 (D/2
// pairs), kp the packed keys from column j0 (pair p at kp + p * n_pad)
template <int NR>
void score_tile(const c10::BFloat16* const* q, const uint32_t* kp, int64_t n_pad, int64_t pairs, float scale,
                float* out, int64_t ld) {
  __m512 acc[NR][2];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kp + p * n_pad);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kp + p * n_pad + 16);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      int32_t pair;
      std::memcpy(&pair, q[r] + 2 * p, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    _mm512_storeu_ps(out + r * ld, _mm512_mul_ps(acc[r][0], vscale));
    _mm512_storeu_ps(out + r * ld + 16, _mm512_mul_ps(acc[r][1], vscale));
  }
}

void score_tiles(int rows, const c10::BFloat16* const* q, const uint32_t* kp, int64_t n_pad, int64_t pairs,
                 float scale, float* out, int64_t ld) {
  switch (rows) {
    case 1: return score_tile<1>(q, kp, n_pad, pairs, scale, out, ld);
    case 2: return score_tile<2>(q, kp, n_pad, pairs, scale, out, ld);
    case 3: return score_tile<3>(q, kp, n_pad, pairs, scale, out, ld);
    case 4: return score_tile<4>(q, kp, n_pad, pairs, scale, out, ld);
    case 5: return score_tile<5>(q, kp, n_pad, pairs, scale, out, ld);
    case 6: return score_tile<6>(q, kp, n_pad, pairs, scale, out, ld);
    case 7: return score_tile<7>(q, kp, n_pad, pairs, scale, out, ld);
    default: return score_tile<8>(q, kp, n_pad, pairs, scale, out, ld);
  }
}

// causal_blocked with bfloat16 q, k, v (head_dim a multiple of 32, rows contiguous): per block of query rows,
// each query head's scores over the keys its rows see (tiles of 32 keys, 8 rows at a time), the softmax of each
// row over its own keys in float32 (the keys it does not see weigh exactly 0, as the masked -inf do), then the
// weighted sum as before (a float32 GEMM over the values widened once). The query heads are spread over the
// intra-op threads.
void causal_blocked_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                         int64_t done, int64_t block_rows, torch::Tensor out) {
  const int64_t n_q = q.size(0), n_kv = k.size(0), groups = n_q / n_kv, length = q.size(1), dim = q.size(2);
  const int64_t n_keys = k.size(1), pairs = dim / 2;
  const int64_t n_pad = (n_keys + kKeyTile - 1) / kKeyTile * kKeyTile;
  const auto fp32 = q.options().dtype(at::kFloat);
  auto packed = at::empty({n_kv, pairs * n_pad}, q.options().dtype(at::kInt));
  uint32_t* kp = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const auto* k_data = k.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n_kv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      pack_key_pairs(k_data + h * k.stride(0), k.stride(1), n_keys, dim, n_pad, kp + h * pairs * n_pad);
  });
  auto vf = at::empty({n_kv, n_keys, dim}, fp32);
  vf.copy_(v);
  const int64_t most_rows = std::min(block_rows, length);
  auto weights = at::empty({n_kv, groups * most_rows, n_pad}, fp32);
  float* w = weights.data_ptr<float>();
  const auto* q_data = q.data_ptr<c10::BFloat16>();
  const float fscale = static_cast<float>(scale);
  for (int64_t r0 = 0; r0 < length; r0 += block_rows) {
    const int64_t r1 = std::min(length, r0 + block_rows), rows = r1 - r0, seen = done + r1;
    const int64_t tiles = (seen + kKeyTile - 1) / kKeyTile;
    at::parallel_for(0, n_q, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        const int64_t kv = h / groups, g = h % groups;
        float* head = w + (kv * groups * rows + g * rows) * n_pad;  // [Hkv, G * rows, n_pad] as the GEMM reads it
        const uint32_t* keys = kp + kv * pairs * n_pad;
        for (int64_t t = 0; t < tiles; ++t) {  // a tile of keys stays in L1 for all of the head's rows
          for (int64_t i0 = 0; i0 < rows; i0 += 8) {
            const int nr = static_cast<int>(std::min<int64_t>(8, rows - i0));
            const c10::BFloat16* rows_q[8];
            for (int r = 0; r < nr; ++r) rows_q[r] = q_data + h * q.stride(0) + (r0 + i0 + r) * q.stride(1);
            score_tiles(nr, rows_q, keys + t * kKeyTile, n_pad, pairs, fscale, head + i0 * n_pad + t * kKeyTile,
                        n_pad);
          }
        }
        for (int64_t i = 0; i < rows; ++i) {  // row i (position done + r0 + i) sees keys 0 .. done + r0 + i
          float* row = head + i * n_pad;
          const int64_t valid = done + r0 + i + 1;
          const float inverse = 1.f / softmax_numerators_avx512(row, valid);
          for (int64_t j = 0; j < valid; ++j) row[j] *= inverse;
          std::fill(row + valid, row + seen, 0.f);
        }
      }
    });
    auto block = weights.view(-1).narrow(0, 0, n_kv * groups * rows * n_pad).view({n_kv, groups * rows, n_pad})
                     .narrow(2, 0, seen);
    auto result = at::bmm(block, vf.slice(1, 0, seen));  // [Hkv, G * rows, D]
    out.slice(1, r0, r1).copy_(result.view({n_q, rows, dim}));
  }
}

// whether causal_blocked_bf16 takes these tensors
bool takes_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  return q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
         q.device().is_cpu() && q.size(2) % 32 == 0 && q.size(2) <= 512 && q.stride(2) == 1 && k.stride(2) == 1;
}
#endif

}  // namespace

// query [Hq, T, D], keys/values [Hkv, T, D] (any device and floating dtype): prompt i is positions
// cu_seqlens[i] .. cu_seqlens[i+1] - 1 (int64, on the CPU). Causal attention within each prompt, the last
// `window` positions only when window > 0, soft-capped when softcap > 0. Prompts over a cached prefix:
// context_keys/values, when not empty, hold one [Hkv, P_i, D] tensor per prompt (P_i = 0: none), the prefix's
// K/V, which prompt i's rows (its positions P_i on) also attend, as attention_reference.prefill_reference does.
// block_rows > 0: causal attention without window or soft-cap in float32 GEMMs of that many query rows
// (causal_blocked); 0: ATen's SDPA. Returns [Hq, T, D].
torch::Tensor prefill_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                                torch::Tensor cu_seqlens, double scale, int64_t window, double softcap,
                                std::vector<torch::Tensor> context_keys, std::vector<torch::Tensor> context_values,
                                int64_t block_rows) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes() &&
              query.size(1) == keys.size(1) && query.size(2) == keys.size(2) && query.size(0) % keys.size(0) == 0,
              "prefill_attention: query [Hq, T, D] and keys/values [Hkv, T, D] expected");
  TORCH_CHECK(cu_seqlens.scalar_type() == torch::kLong && cu_seqlens.device().is_cpu() && cu_seqlens.dim() == 1,
              "prefill_attention: cu_seqlens must be an int64 CPU vector");
  const int64_t n = cu_seqlens.size(0) - 1;
  const int64_t* bounds = cu_seqlens.data_ptr<int64_t>();
  TORCH_CHECK(n >= 1 && bounds[0] == 0 && bounds[n] == query.size(1), "prefill_attention: cu_seqlens must span T");
  const bool contexts = !context_keys.empty();
  TORCH_CHECK(!contexts || (static_cast<int64_t>(context_keys.size()) == n &&
                            static_cast<int64_t>(context_values.size()) == n),
              "prefill_attention: one context (possibly empty) per prompt, keys and values");
  const bool gqa = query.size(0) != keys.size(0);
  auto out = at::empty_like(query);
  pybind11::gil_scoped_release no_gil;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = bounds[i], hi = bounds[i + 1];
    TORCH_CHECK(hi > lo, "prefill_attention: an empty prompt");
    auto q = query.slice(1, lo, hi), k = keys.slice(1, lo, hi), v = values.slice(1, lo, hi);
    const int64_t done = contexts ? context_keys[i].size(1) : 0;
    torch::Tensor result;
    if (done > 0) {  // rows are positions done.. of the prompt; its keys are the prefix's, then its own
      TORCH_CHECK(context_keys[i].dim() == 3 && context_keys[i].size(0) == k.size(0) &&
                  context_keys[i].size(2) == k.size(2) && context_values[i].sizes() == context_keys[i].sizes(),
                  "prefill_attention: a context must be [Hkv, P, D], its keys and values alike");
      k = at::cat({context_keys[i].to(k.scalar_type()), k}, 1);
      v = at::cat({context_values[i].to(v.scalar_type()), v}, 1);
      if (block_rows > 0 && softcap <= 0 && window <= 0) {
        causal_blocked(q, k, v, scale, done, block_rows, out.slice(1, lo, hi));
        continue;
      } else if (softcap > 0) {
        result = eager_softcap(q, k, v, scale, window, softcap, done);
      } else {
        result = at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                                  window_mask(done, hi - lo, window, q.options()), 0.0, false, scale,
                                                  gqa).squeeze(0);
      }
    } else if (softcap > 0) {
      result = eager_softcap(q, k, v, scale, window, softcap, 0);
    } else if (window > 0 && hi - lo > window) {
      result = at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                                window_mask(0, hi - lo, window, q.options()), 0.0, false, scale,
                                                gqa).squeeze(0);
    } else if (block_rows > 0) {
      causal_blocked(q, k, v, scale, 0, block_rows, out.slice(1, lo, hi));
      continue;
    } else {
      result = at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), c10::nullopt, 0.0,
                                                true, scale, gqa).squeeze(0);
    }
    out.slice(1, lo, hi).copy_(result);
  }
  return out;
}

// how this build computes the scores of a bfloat16 prompt's causal attention (head sizes of whole 32-element pairs)
std::string prefill_scores_loop() {
#ifdef SEESAW_DPBF16
  return "avx512_bf16";
#else
  return "float32_gemm";
#endif
}

// the widest decode path this build has: avx512 (head_dim % 16 == 0; avx2 for other multiples of 8), avx2, or
// portable
std::string isa() {
#if defined(SEESAW_AVX512)
  return "avx512";
#elif defined(SEESAW_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// the path decode_attention takes for this head size in this build
std::string path_for(int64_t head_dim) {
  switch (choose_path(head_dim)) {
    case Path::avx512: return "avx512";
    case Path::avx2: return "avx2";
    default: return "portable";
  }
}

// ---------------------------------------------------------------------------------------------------------
// RMS norm, transformers' Llama recipe in one pass a row: the row in float32, its mean square, x * rsqrt(mean
// square + eps) rounded to the input's dtype, times the weight (in the input's dtype, as `weight * h.to(dtype)`
// computes it). Only the order of the sum of squares differs from ATen's reduction (16 partial sums here):
// the same to float32 rounding. Rows are spread over the intra-op threads in chunks of >= 16 Ki elements, so a
// decode step's few rows run on the calling thread.
template <typename T>
static inline T round_to(float x) { return static_cast<T>(x); }

// c10's round-to-nearest-even without its branch, so that the row loops vectorize
template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * n;
      T* dst = out + r * n;
      float partial[16] = {0.f};
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; ++j) {
          const float v = to_float(row[i + j]);
          partial[j] += v * v;
        }
      }
      for (int width = 8; width >= 1; width /= 2) {
        for (int j = 0; j < width; ++j) partial[j] += partial[j + width];
      }
      float sum = partial[0];
      for (; i < n; ++i) {
        const float v = to_float(row[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
      for (int64_t k = 0; k < n; ++k) {
        const T scaled = round_to<T>(to_float(row[k]) * inv);
        dst[k] = round_to<T>(to_float(weight[k]) * to_float(scaled));
      }
    }
  });
}

// rms_norm(x [..., n] contiguous, weight [n], eps) -> a new tensor like x; x and weight of one dtype
torch::Tensor seesaw_rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  RECORD_FUNCTION("seesaw::rms_norm", std::vector<c10::IValue>({x}));  // one kernel in torch.profiler's counts
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight of one dtype");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: weight [n] for x [..., n]");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(x);
  const int64_t n = weight.size(0);
  const int64_t rows = n ? x.numel() / n : 0;
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case torch::kBFloat16:
      rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                    rows, n, e);
      break;
    case torch::kHalf:
      rms_norm_rows(x.data_ptr<c10::Half>(), weight.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, n, e);
      break;
    case torch::kFloat:
      rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, n, e);
      break;
    default:
      TORCH_CHECK(false, "rms_norm: float32, bfloat16 or float16 only");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// silu(gate) * up, the gated MLP's middle (transformers' `act_fn(gate_proj(x)) * up_proj(x)` with SiLU), in one
// pass: silu rounded to the inputs' dtype, then the product rounded, as the two ATen operators round. The
// sigmoid's exponential is the softmax's polynomial (exp_nonpositive, of -|x|): within a few float32 ulps of
// ATen's, so one bfloat16 result in many thousands may differ by one step (none in 460,800 of a test's). Rows
// over the intra-op threads in chunks of >= 16 Ki elements, as the RMS norm's; bfloat16 in AVX-512 lanes end to
// end, other dtypes (and the tails) through the scalar loop, whose exponential is the C library's.
#if defined(SEESAW_AVX512)
// x * sigmoid(x) over 16 lanes: sigmoid(x) = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below (e = e^-|x| <= 1)
SEESAW_INLINE __m512 silu16(__m512 x) {
  const __m512 e = exp_nonpositive<Avx512>(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 silu = _mm512_mul_ps(x, _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e)));
  // below -88.72 ATen's e^-x overflows: x / inf, -0 (or NaN for -inf); exp_nonpositive stops at e^-87
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.72f), _CMP_LT_OQ);
  return _mm512_mask_div_ps(silu, overflow, x, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

// float32 lanes rounded to bfloat16 (nearest even; NaN stays NaN) and widened back: round_to<BFloat16> in lanes
SEESAW_INLINE __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
}
SEESAW_INLINE __m512 widen_bits(__m512i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16, 16)); }
#endif

template <typename T>
void silu_mul_rows(const T* gate, int64_t gate_ld, const T* up, int64_t up_ld, T* out, int64_t rows, int64_t n) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate + r * gate_ld;
      const T* u = up + r * up_ld;
      T* dst = out + r * n;
      int64_t j = 0;
#if defined(SEESAW_AVX512)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the whole pass in lanes
        for (; j + 16 <= n; j += 16) {
          const __m512 activated = widen_bits(bf16_bits(silu16(Avx512::load(g + j))));
          const __m512i product = bf16_bits(_mm512_mul_ps(activated, Avx512::load(u + j)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_cvtepi32_epi16(product));
        }
      }
#endif
      for (; j < n; ++j) {
        const float x = to_float(g[j]);
        const T activated = round_to<T>(x / (1.0f + std::exp(-x)));
        dst[j] = round_to<T>(to_float(activated) * to_float(u[j]));
      }
    }
  });
}

// silu_mul(gate [..., n], up [..., n]) -> a new contiguous tensor [..., n]; one dtype, each row contiguous
torch::Tensor seesaw_silu_mul(torch::Tensor gate, torch::Tensor up) {
  RECORD_FUNCTION("seesaw::silu_mul", std::vector<c10::IValue>({gate, up}));  // one kernel in torch.profiler's counts
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "silu_mul: CPU tensors only");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && gate.sizes() == up.sizes() && gate.dim() >= 1,
              "silu_mul: gate and up of one dtype and shape");
  const int64_t n = gate.size(-1);
  auto g = gate.reshape({-1, n});
  auto u = up.reshape({-1, n});
  if (g.stride(1) != 1) g = g.contiguous();
  if (u.stride(1) != 1) u = u.contiguous();
  auto out = torch::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = g.size(0);
  switch (gate.scalar_type()) {
    case torch::kBFloat16:
      silu_mul_rows(g.data_ptr<c10::BFloat16>(), g.stride(0), u.data_ptr<c10::BFloat16>(), u.stride(0),
                    out.data_ptr<c10::BFloat16>(), rows, n);
      break;
    case torch::kHalf:
      silu_mul_rows(g.data_ptr<c10::Half>(), g.stride(0), u.data_ptr<c10::Half>(), u.stride(0),
                    out.data_ptr<c10::Half>(), rows, n);
      break;
    case torch::kFloat:
      silu_mul_rows(g.data_ptr<float>(), g.stride(0), u.data_ptr<float>(), u.stride(0), out.data_ptr<float>(), rows,
                    n);
      break;
    default:
      TORCH_CHECK(false, "silu_mul: float32, bfloat16 or float16 only");
  }
  return out;
}

// argmax_rows(x [N, V] bfloat16, rows contiguous) -> int64 [N]: each row's first index of its largest value, as
// torch.argmax of the row widened to float32 (the widening is exact, so the same index; a NaN counts as the
// largest, the first one). One pass over the bf16 logits instead of a float32 copy and a second pass over it:
// a greedy decode step's sampling (64 x 49,152 on SmolLM2: 3.8 ms -> measured in docs/benchmarks.md).
static int64_t argmax_row(const c10::BFloat16* row, int64_t n) {
  int64_t j = 0, best = 0;
  float peak = -std::numeric_limits<float>::infinity();
#if defined(SEESAW_AVX512)
  if (n >= 16) {
    __m512 vpeak = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512i vbest = _mm512_setzero_si512(), index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                        14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 v = Avx512::load(row + j);
      const __mmask16 above = _mm512_cmp_ps_mask(v, vpeak, _CMP_GT_OQ);  // strictly: a lane keeps its first
      vpeak = _mm512_mask_mov_ps(vpeak, above, v);
      vbest = _mm512_mask_mov_epi32(vbest, above, index);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      index = _mm512_add_epi32(index, step);
    }
    if (nan) {  // rare: the first NaN, as torch.argmax
      for (int64_t i = 0; i < n; ++i)
        if (std::isnan(static_cast<float>(row[i]))) return i;
    }
    peak = _mm512_reduce_max_ps(vpeak);
    const __mmask16 at_peak = _mm512_cmp_ps_mask(vpeak, _mm512_set1_ps(peak), _CMP_EQ_OQ);
    best = _mm512_mask_reduce_min_epi32(at_peak, vbest);
    if (peak == -std::numeric_limits<float>::infinity()) best = 0;  // all -inf so far: the first index
  }
#endif
  for (; j < n; ++j) {
    const float v = static_cast<float>(row[j]);
    if (std::isnan(v)) return j;
    if (v > peak) {
      peak = v;
      best = j;
    }
  }
  return best;
}

torch::Tensor argmax_rows(torch::Tensor x) {
  RECORD_FUNCTION("seesaw::argmax_rows", std::vector<c10::IValue>({x}));
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.size(1) > 0 &&
              x.stride(1) == 1, "argmax_rows: a CPU bfloat16 [N, V] tensor with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  auto out = torch::empty({rows}, x.options().dtype(torch::kLong));
  const auto* data = x.data_ptr<c10::BFloat16>();
  auto* result = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) result[r] = argmax_row(data + r * ld, n);
  });
  return out;
}

// the other sources built into this module: linear_rows.cpp
torch::Tensor linear_rows(torch::Tensor x, std::vector<torch::Tensor> weights, bool portable);
std::string linear_rows_loop();
// rotary.cpp
std::tuple<torch::Tensor, torch::Tensor> rotary(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the widest decode-attention path compiled into this build");
  m.def("path", &path_for, "the decode-attention path this build takes for a head size");
  m.def("decode_attention", &decode_attention,
        "seesaw_ds decode attention over one layer's paged cache (CPU; float32, bfloat16 or float16 cache)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "seesaw_ds decode step of one layer over the block table: the new K/V written, then attention (CPU)");
  m.def("rms_norm", &seesaw_rms_norm, "transformers' Llama RMS norm in one pass a row (CPU)");
  m.def("linear_rows", &linear_rows, "bfloat16 linears over a few input rows, each weight row streamed (CPU)",
        pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("portable") = false);
  m.def("silu_mul", &seesaw_silu_mul, "silu(gate) * up in one pass (CPU)");
  m.def("rotary", &rotary, "transformers' Llama apply_rotary_pos_emb for q and k in one call (CPU)");
  m.def("linear_rows_loop", &linear_rows_loop, "linear_rows's fast loop in this build: avx512_bf16 or portable");
  m.def("argmax_rows", &argmax_rows, "each row's first index of its largest value, bfloat16 rows (CPU)");
  m.def("prefill_scores_loop", &prefill_scores_loop,
        "how this build computes a bfloat16 prompt's attention scores: avx512_bf16 (VDPBF16PS) or float32_gemm");
  m.def("prefill_attention", &prefill_attention,
        "seesaw_ds packed ragged prefill attention, one call per layer (ATen SDPA per prompt), over cached "
        "prefixes too");
}

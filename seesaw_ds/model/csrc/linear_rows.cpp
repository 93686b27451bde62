// Linear layers over a few input rows (CPU, bfloat16): y[M, N] = x[M, K] . W[N, K]^T for M <= kMaxRows, the
// weights read in their own row-major layout, one or several of them (a module's siblings, q/k/v or gate/up,
// whose outputs are concatenated) in one call.
//
// Why by hand: a decode step at batch 1 or 2 is a stream of the layers' weights through a dot product with one
// or two rows, bound by memory. oneDNN's prepacked bf16 linear (what the engine calls otherwise) reads the
// weights at 11-17 GB/s here against the 25 / 50 GB/s that one / two cores stream (a bf16 sum over the same
// 212 MB): its blocked layout reads many rows' pieces at once, which the hardware prefetchers follow poorly
// from DRAM. This loop reads each weight row front to back, one row after the other, so that the whole
// matrix is one sequential stream per thread (each thread takes a contiguous range of output rows), with four
// independent accumulators a row. Measured on the AMD EPYC guest (AVX512_BF16, no AMX), SmolLM2's 30 layers of
// q/k/v, o, gate/up and down (212 MB, distinct per layer, so from DRAM): one row 12.8 ms on one thread and 7.5
// ms on two, against oneDNN's 18.7 and 12.3 ms; two rows 12.5 / 7.7 against 19.7 / 12.4; four rows even
// (15.5 / 10.9 against 16.0 / 10.6), past which oneDNN's blocked GEMM is the faster.
//
// Arithmetic: float32 products and sums, the result rounded once to bfloat16 (round to nearest even), as
// oneDNN's: only the order of the sum differs. Two loops: VDPBF16PS (AVX512_BF16: bf16 pairs multiplied and
// added into float32 lanes; in the build for CPUs that have it, kernels.isa() "avx512bf16") and a portable one
// (bf16 widened to float32, which the compiler vectorizes with the build's instruction set), which the tests
// run against the first. The weights must lie row-major (each output's K values contiguous): a row-parallel
// shard, which lies transposed, stays with oneDNN (a column-wise loop measured no faster than it on two threads).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SEESAW_BF16_DOT 1
#endif

namespace {

constexpr int kMaxRows = 4;

// one weight: `rows` rows of K bfloat16 values, row r at w + r * ld
struct Piece {
  const uint16_t* w;
  int64_t ld;
  int64_t rows;
};

inline float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline uint16_t round_bf16(float x) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if (x != x) return 0x7FC0u;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// out[m] = x[m] . w over K, portable: 16 partial sums a row, which the compiler vectorizes
template <int M>
void dot_rows_portable(const float* x, int64_t K, const uint16_t* w, float* out) {
  float partial[M][16] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    float wide[16];
    for (int j = 0; j < 16; ++j) wide[j] = widen(w[k + j]);
    for (int m = 0; m < M; ++m) {
      for (int j = 0; j < 16; ++j) partial[m][j] += x[m * K + k + j] * wide[j];
    }
  }
  for (int m = 0; m < M; ++m) {
    float sum = 0.f;
    for (int j = 0; j < 16; ++j) sum += partial[m][j];
    for (int64_t t = k; t < K; ++t) sum += x[m * K + t] * widen(w[t]);
    out[m] = sum;
  }
}

#ifdef SEESAW_BF16_DOT
// out[m] = x[m] . w over K with VDPBF16PS: four accumulators a row, the tail through masked loads
template <int M>
inline void dot_rows_bf16(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w, float* out) {
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m) {
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    for (int u = 0; u < 4; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int m = 0; m < M; ++m) {
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], (__m512bh)_mm512_loadu_si512(x + m * ldx + k + 32 * u), wv);
      }
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                                       : static_cast<__mmask32>((1u << (K - k)) - 1u);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k), wv);
    }
  }
  for (int m = 0; m < M; ++m) {
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                _mm512_add_ps(acc[m][2], acc[m][3])));
  }
}
#endif

template <int M>
void run(const uint16_t* x, int64_t ldx, int64_t K, const std::vector<Piece>& pieces, int64_t N, uint16_t* y,
         bool bf16_dot) {
  std::vector<float> xf;  // the portable loop's rows in float32, widened once
  if (!bf16_dot) {
    xf.resize(M * K);
    for (int m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) xf[m * K + k] = widen(x[m * ldx + k]);
    }
  }
  // each thread one contiguous range of output rows: one sequential stream through the weights
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t base = 0;  // the first output row of pieces[p]
    for (const Piece& piece : pieces) {
      const int64_t lo = std::max(begin, base), hi = std::min(end, base + piece.rows);
      for (int64_t n = lo; n < hi; ++n) {
        const uint16_t* row = piece.w + (n - base) * piece.ld;
        float sums[M];
#ifdef SEESAW_BF16_DOT
        if (bf16_dot) {
          dot_rows_bf16<M>(x, ldx, K, row, sums);
        } else {
          dot_rows_portable<M>(xf.data(), K, row, sums);
        }
#else
        dot_rows_portable<M>(xf.data(), K, row, sums);
#endif
        for (int m = 0; m < M; ++m) y[m * N + n] = round_bf16(sums[m]);
      }
      base += piece.rows;
    }
  });
}

}  // namespace

std::string linear_rows_loop() {
#ifdef SEESAW_BF16_DOT
  return "avx512_bf16";
#else
  return "portable";
#endif
}

// linear_rows(x [..., K] bf16, weights [N_i, K] bf16 (rows may be strided, each row contiguous), portable)
// -> [..., sum N_i] bf16: x's rows against every weight's rows, the weights' outputs side by side; `portable`
// takes the portable loop in a build that has the other
torch::Tensor linear_rows(torch::Tensor x, std::vector<torch::Tensor> weights, bool portable) {
  RECORD_FUNCTION("seesaw::linear_rows", std::vector<c10::IValue>({x}));  // one kernel in torch.profiler's counts
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16, "linear_rows: bfloat16 CPU input");
  TORCH_CHECK(!weights.empty(), "linear_rows: at least one weight");
  const int64_t K = x.size(-1);
  auto rows = x.reshape({-1, K});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  const int64_t M = rows.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "linear_rows: 1 to ", kMaxRows, " input rows, got ", M);
  std::vector<Piece> pieces;
  int64_t N = 0;
  for (const auto& w : weights) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kBFloat16 && w.dim() == 2 && w.size(1) == K &&
                    (w.stride(1) == 1 || w.size(1) == 1),
                "linear_rows: bfloat16 CPU weights [N, ", K, "] with contiguous rows");
    pieces.push_back({reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0), w.size(0)});
    N += w.size(0);
  }
#ifdef SEESAW_BF16_DOT
  const bool bf16_dot = !portable;
#else
  const bool bf16_dot = false;
#endif
  auto out = torch::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(rows.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(out.data_ptr());
  {
    pybind11::gil_scoped_release no_gil;
    switch (M) {
      case 1: run<1>(xp, rows.stride(0), K, pieces, N, yp, bf16_dot); break;
      case 2: run<2>(xp, rows.stride(0), K, pieces, N, yp, bf16_dot); break;
      case 3: run<3>(xp, rows.stride(0), K, pieces, N, yp, bf16_dot); break;
      default: run<4>(xp, rows.stride(0), K, pieces, N, yp, bf16_dot); break;
    }
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// CPU kernels of the model's two attention ops, forward and backward, with RoPE applied inside (schemas in
// ltm_ops.cpp; math, autograd and fake kernels in ltm_kernels/attention_cpp.py; the eager definitions are
// reference.self_attention_ref and reference.latent_attention_ref):
//   ltm::self_attention    causal sliding window: query i sees keys j with i - window < j <= i
//   ltm::latent_attention  N tokens to all M latents of their layer, no mask (also KV-cache decoding: N = 1)
//
// One task per (batch, head) (at::parallel_for): it rotates q and k (adjacent pairs) into contiguous buffers
// in the compute type, copies v, and walks the queries in blocks of kBlockQ rows. Self-attention block
// [i0, i1) only ever sees keys [max(0, i0 - window + 1), i1), so the work is O(N (window + kBlockQ) hd), no
// N x N score or mask tensor exists, and only the entries at the two edges of that band are masked.
// Per block: S = scale Q K^T (a GEMM), softmax with the row max, O = P V (a GEMM); lse = max + log(sum) is
// saved (B, H, N) in the compute type. The backward recomputes P = exp(S - lse) per block and does
//   dV += P^T dO,  dP = dO V^T,  dS = P (dP - delta) with delta = rowsum(dO O),
//   dQ = scale dS K,  dK += scale dS^T Q
// (five GEMMs; dK, dV accumulate in the task's own buffers: no races), then rotates dQ, dK back:
//   d_e = g_e cos + g_o sin,  d_o = -g_e sin + g_o cos.
// Latent attention is the same code with one key range [0, M) for every row.
//
// Dtypes: float32 and float64 compute in their own type; bfloat16 / float16 are read into float buffers,
// computed in float and stored back (lse in float). The RoPE tables may be any floating dtype (the model
// passes float32, float64 for float64 models) and are converted to the compute type once per call.
// Layouts: q, k, v, grad_out, out may have any strides (the model passes transposed views of (B, N, H, hd));
// out, dq, dk, dv take the layout of q, k, v (empty_like: the same strides where those are dense, so for the
// model's views merging the heads afterwards is free; contiguous otherwise).
//
// GEMMs: the BLAS that libtorch_cpu exports (MKL in torch's x86 wheels, Fortran sgemm_/dgemm_), called
// directly on the task's buffers (inside at::parallel_for's OpenMP region MKL runs each call on the calling
// thread, as it does for ATen's own kernels). A torch without those
// symbols still loads this extension (weak references) and the GEMMs go through at::addmm_ on views of the
// same buffers instead, which costs a few microseconds of tensor bookkeeping per call.
// The softmax exp: float uses exp_softmax (vectorisable_exp.h: plain arithmetic that GCC vectorises; libm's
// expf is a scalar call), compiled for the x86-64 baseline, AVX2 and AVX-512 and picked at run time; float64
// stays on libm's exp (its tests compare to ~1e-10).
//
// Measured on a 2-core Intel Xeon (AVX-512, KVM, shared with other jobs), torch 2.13.0+cpu (MKL), GCC 12.2,
// float32, B = 4, H = 4, hd = 64, inputs the model's transposed views, through the public functions and
// autograd, milliseconds, median of 20-30 calls (min in brackets):
//   op                                threads   forward        fwd + bwd      eager reference fwd + bwd
//   self, N = 512, window = 128          1      5.1  (4.7)     16.8 (15.8)    49.8 (45.2)
//   self, N = 512, window = 128          2      2.9  (2.7)      9.9  (8.8)    29.9 (26.1)
//   self, N = 1024, window = 256         2      7.4  (7.1)     25.1 (24.4)    83.7 (77.0)
//   latent, N = 512, M = 4               1      1.0  (0.8)      3.0  (2.3)     7.4  (6.6)
//   latent, N = 512, M = 4               2      0.6  (0.5)      2.1  (1.7)     4.7  (3.9)
// Self-attention is GEMM-bound (MKL reaches ~95 GFLOP/s per core on the 64 x 191 x 64 tiles); latent attention
// with M = 4 is bound by reading q, out, grad_out and writing the gradients. Through at::addmm_ instead of the
// direct BLAS call: self fwd + bwd 10% slower, latent 70% slower (1 thread). Query blocks of 32, 48 and 64 rows
// are within noise of each other at N = 512 (64 is best at N = 1024, window 256), 128 is ~25% slower.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "blas.h"
#include "cpu_isa.h"
#include "vectorisable_exp.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ltm {
namespace {

// Query rows per block. The self-attention band of a block holds kBlockQ + window - 1 keys, so larger blocks
// waste more of the GEMM on masked entries at the diagonal, smaller ones make more, smaller GEMM calls.
constexpr int64_t kBlockQ = 64;

// ----------------------------------------------------------------------------------------- exp and rows

inline float exp_impl(float x) { return exp_softmax(x); }
inline double exp_impl(double x) { return std::exp(x); }

// Columns [lo, hi) of row `i` of a query block whose keys start at jb; all of [0, L) without the mask.
template <bool kCausal>
inline void valid_columns(int64_t i, int64_t jb, int64_t L, int64_t window, int64_t& lo, int64_t& hi) {
  if constexpr (kCausal) {
    lo = std::max<int64_t>(0, i - window + 1) - jb;
    hi = i + 1 - jb;
  } else {
    lo = 0;
    hi = L;
  }
}

// The elementwise work of one block of `rows` query rows (starting at token i0) on the score tile S
// (rows x L, row-major), keys starting at jb. Masked entries are never exponentiated: they are set to 0.
struct Block {
  int64_t rows, L, i0, jb, window;
};

// Unmasked tiles with rows shorter than this (latent attention with few latents: M = 4 in the CPU preset) are
// exponentiated in one flat loop over the whole tile: per row, the vector loops would run only their scalar
// remainder, and the exp was then the bulk of the op's time.
constexpr int64_t kShortRow = 16;

// exp(S - shift[r]) over a whole rows x L tile (L < kShortRow), vectorised across rows.
template <typename T>
inline void exp_tile_short_rows(T* S, int64_t rows, int64_t L, const T* shift) {
  T shifts[kBlockQ * kShortRow];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < L; ++c) {
      shifts[r * L + c] = shift[r];
    }
  }
  const int64_t n = rows * L;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    S[i] = exp_impl(S[i] - shifts[i]);
  }
}

// Forward: S <- exp(S - rowmax) on the valid entries (0 elsewhere); row max and row sum out.
template <typename T, bool kCausal>
inline void softmax_block(T* S, const Block& blk, T* row_max, T* row_sum) {
  if (!kCausal && blk.L < kShortRow) {
    for (int64_t r = 0; r < blk.rows; ++r) {
      const T* s = S + r * blk.L;
      row_max[r] = *std::max_element(s, s + blk.L);
    }
    exp_tile_short_rows(S, blk.rows, blk.L, row_max);
    for (int64_t r = 0; r < blk.rows; ++r) {
      const T* s = S + r * blk.L;
      row_sum[r] = std::accumulate(s, s + blk.L, T(0));
    }
    return;
  }
  for (int64_t r = 0; r < blk.rows; ++r) {
    T* s = S + r * blk.L;
    int64_t lo, hi;
    valid_columns<kCausal>(blk.i0 + r, blk.jb, blk.L, blk.window, lo, hi);
    T m = s[lo];
#pragma omp simd reduction(max : m)
    for (int64_t c = lo; c < hi; ++c) {
      m = s[c] > m ? s[c] : m;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = lo; c < hi; ++c) {
      const T p = exp_impl(s[c] - m);
      s[c] = p;
      sum += p;
    }
    std::fill(s, s + lo, T(0));
    std::fill(s + hi, s + blk.L, T(0));
    row_max[r] = m;
    row_sum[r] = sum;
  }
}

// Backward: S <- P = exp(S - lse) on the valid entries, 0 elsewhere.
template <typename T, bool kCausal>
inline void probs_block(T* S, const Block& blk, const T* lse) {
  if (!kCausal && blk.L < kShortRow) {
    exp_tile_short_rows(S, blk.rows, blk.L, lse);
    return;
  }
  for (int64_t r = 0; r < blk.rows; ++r) {
    T* s = S + r * blk.L;
    int64_t lo, hi;
    valid_columns<kCausal>(blk.i0 + r, blk.jb, blk.L, blk.window, lo, hi);
    const T shift = lse[r];
#pragma omp simd
    for (int64_t c = lo; c < hi; ++c) {
      s[c] = exp_impl(s[c] - shift);
    }
    std::fill(s, s + lo, T(0));
    std::fill(s + hi, s + blk.L, T(0));
  }
}

// Backward: S <- dS = P (dP - delta) on the valid entries (the others hold P = 0 and stay 0).
template <typename T, bool kCausal>
inline void dscores_block(T* S, const T* dP, const Block& blk, const T* delta) {
  for (int64_t r = 0; r < blk.rows; ++r) {
    T* s = S + r * blk.L;
    const T* dp = dP + r * blk.L;
    int64_t lo, hi;
    valid_columns<kCausal>(blk.i0 + r, blk.jb, blk.L, blk.window, lo, hi);
    const T d = delta[r];
#pragma omp simd
    for (int64_t c = lo; c < hi; ++c) {
      s[c] = s[c] * (dp[c] - d);
    }
  }
}

template <typename T, bool kCausal>
struct RowFns {
  void (*softmax)(T*, const Block&, T*, T*);
  void (*probs)(T*, const Block&, const T*);
  void (*dscores)(T*, const T*, const Block&, const T*);
};

// The three row functions compiled for the x86-64 baseline (SSE2), AVX2 and AVX-512 and picked at run time,
// so that the build machine's ISA does not matter (float only; double calls libm and stays on the baseline).
// flatten: the exp must inline into the loops for them to vectorise.
template <typename T, bool kCausal>
[[gnu::flatten]] void softmax_default(T* S, const Block& b, T* m, T* s) {
  softmax_block<T, kCausal>(S, b, m, s);
}
template <typename T, bool kCausal>
[[gnu::flatten]] void probs_default(T* S, const Block& b, const T* l) {
  probs_block<T, kCausal>(S, b, l);
}
template <typename T, bool kCausal>
[[gnu::flatten]] void dscores_default(T* S, const T* dP, const Block& b, const T* d) {
  dscores_block<T, kCausal>(S, dP, b, d);
}

#if defined(__x86_64__)
template <typename T, bool kCausal>
[[gnu::target("avx2"), gnu::flatten]] void softmax_avx2(T* S, const Block& b, T* m, T* s) {
  softmax_block<T, kCausal>(S, b, m, s);
}
template <typename T, bool kCausal>
[[gnu::target("avx2"), gnu::flatten]] void probs_avx2(T* S, const Block& b, const T* l) {
  probs_block<T, kCausal>(S, b, l);
}
template <typename T, bool kCausal>
[[gnu::target("avx2"), gnu::flatten]] void dscores_avx2(T* S, const T* dP, const Block& b, const T* d) {
  dscores_block<T, kCausal>(S, dP, b, d);
}
// prefer-vector-width=512: GCC would otherwise stay on 256-bit vectors.
#define LTM_AVX512 gnu::target("avx512f,avx512bw,avx512vl,prefer-vector-width=512"), gnu::flatten
template <typename T, bool kCausal>
[[LTM_AVX512]] void softmax_avx512(T* S, const Block& b, T* m, T* s) {
  softmax_block<T, kCausal>(S, b, m, s);
}
template <typename T, bool kCausal>
[[LTM_AVX512]] void probs_avx512(T* S, const Block& b, const T* l) {
  probs_block<T, kCausal>(S, b, l);
}
template <typename T, bool kCausal>
[[LTM_AVX512]] void dscores_avx512(T* S, const T* dP, const Block& b, const T* d) {
  dscores_block<T, kCausal>(S, dP, b, d);
}
#undef LTM_AVX512
#endif  // __x86_64__

template <typename T, bool kCausal>
RowFns<T, kCausal> select_row_fns() {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return {softmax_avx512<T, kCausal>, probs_avx512<T, kCausal>, dscores_avx512<T, kCausal>};
      case Isa::kAvx2:
        return {softmax_avx2<T, kCausal>, probs_avx2<T, kCausal>, dscores_avx2<T, kCausal>};
      case Isa::kDefault:
        break;
    }
  }
#endif
  return {softmax_default<T, kCausal>, probs_default<T, kCausal>, dscores_default<T, kCausal>};
}

// ------------------------------------------------------------------------------------ one (batch, head)

// Keys [jb, je) that query block [i0, i1) can see.
template <bool kCausal>
inline void block_keys(int64_t i0, int64_t i1, int64_t M, int64_t window, int64_t& jb, int64_t& je) {
  if constexpr (kCausal) {
    jb = std::max<int64_t>(0, i0 - window + 1);
    je = i1;
  } else {
    jb = 0;
    je = M;
  }
}

// Most keys one block can see: the width of the score tiles.
template <bool kCausal>
int64_t max_block_keys(int64_t N, int64_t M, int64_t window) {
  return kCausal ? std::min(N, kBlockQ + window - 1) : M;
}

// Q (N x D), K, V (M x D), rotated where needed, contiguous. Writes O (N x D) and lse (N); S: scratch tile.
template <typename T, bool kCausal>
void forward_head(const T* Q, const T* K, const T* V, int64_t N, int64_t M, int64_t D, int64_t window, T scale,
                  const RowFns<T, kCausal>& fns, T* O, T* lse, T* S) {
  T row_max[kBlockQ], row_sum[kBlockQ];
  for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
    const int64_t i1 = std::min(i0 + kBlockQ, N), rows = i1 - i0;
    int64_t jb, je;
    block_keys<kCausal>(i0, i1, M, window, jb, je);
    const Block blk{rows, je - jb, i0, jb, window};
    gemm<T>(false, true, rows, blk.L, D, scale, Q + i0 * D, D, K + jb * D, D, T(0), S, blk.L);  // S = s Q K^T
    fns.softmax(S, blk, row_max, row_sum);
    gemm<T>(false, false, rows, D, blk.L, T(1), S, blk.L, V + jb * D, D, T(0), O + i0 * D, D);  // O = P V
    for (int64_t r = 0; r < rows; ++r) {
      T* o = O + (i0 + r) * D;
      const T inv = T(1) / row_sum[r];
      for (int64_t d = 0; d < D; ++d) {
        o[d] *= inv;
      }
      lse[i0 + r] = row_max[r] + std::log(row_sum[r]);
    }
  }
}

// Gradients of one (batch, head) into dQ (N x D; skipped when null), dK, dV (M x D), all in the rotated frame
// of Q and K.
// delta = rowsum(dO O) (N). S, dP: scratch tiles.
template <typename T, bool kCausal>
void backward_head(const T* Q, const T* K, const T* V, const T* dO, const T* lse, const T* delta, int64_t N, int64_t M,
                   int64_t D, int64_t window, T scale, const RowFns<T, kCausal>& fns, T* dQ, T* dK, T* dV, T* S,
                   T* dP) {
  std::fill(dK, dK + M * D, T(0));
  std::fill(dV, dV + M * D, T(0));
  for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
    const int64_t i1 = std::min(i0 + kBlockQ, N), rows = i1 - i0;
    int64_t jb, je;
    block_keys<kCausal>(i0, i1, M, window, jb, je);
    const Block blk{rows, je - jb, i0, jb, window};
    const int64_t L = blk.L;
    gemm<T>(false, true, rows, L, D, scale, Q + i0 * D, D, K + jb * D, D, T(0), S, L);   // S = s Q K^T
    fns.probs(S, blk, lse + i0);                                                         // S = P
    gemm<T>(true, false, L, D, rows, T(1), S, L, dO + i0 * D, D, T(1), dV + jb * D, D);  // dV += P^T dO
    gemm<T>(false, true, rows, L, D, T(1), dO + i0 * D, D, V + jb * D, D, T(0), dP, L);  // dP = dO V^T
    fns.dscores(S, dP, blk, delta + i0);                                                 // S = dS
    if (dQ != nullptr) {
      gemm<T>(false, false, rows, D, L, scale, S, L, K + jb * D, D, T(0), dQ + i0 * D, D);  // dQ = s dS K
    }
    gemm<T>(true, false, L, D, rows, scale, S, L, Q + i0 * D, D, T(1), dK + jb * D, D);  // dK += s dS^T Q
  }
}

// ------------------------------------------------------------------------------------- loads and stores

// A (rows x D) slice of a strided tensor: element (r, d) at x[r * s_row + d * s_col].
template <typename scalar_t>
struct Strided {
  scalar_t* x;
  int64_t s_row, s_col;
};

template <typename scalar_t>
Strided<scalar_t> head_of(const at::Tensor& t, int64_t b, int64_t h) {
  scalar_t* base = const_cast<scalar_t*>(t.const_data_ptr<scalar_t>());
  return {base + b * t.stride(0) + h * t.stride(1), t.stride(2), t.stride(3)};
}

// Calls f with the column stride as a compile-time 1 where it is 1 (the common case: GCC then vectorises
// the loops over columns), as a run-time value otherwise.
template <typename F>
inline void with_col_stride(int64_t s_col, const F& f) {
  if (s_col == 1) {
    f(std::integral_constant<int64_t, 1>{});
  } else {
    f(s_col);
  }
}

// dst (rows x D, contiguous) = x with each pair (2p, 2p + 1) of row r turned by the angle of cos/sin[r, p].
template <typename scalar_t, typename T>
void load_rotated(const Strided<scalar_t>& src, int64_t rows, int64_t D, const T* cos, const T* sin, T* dst) {
  const int64_t P = D / 2;
  with_col_stride(src.s_col, [&](auto sc) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* x = src.x + r * src.s_row;
      const T* c = cos + r * P;
      const T* s = sin + r * P;
      T* y = dst + r * D;
      for (int64_t p = 0; p < P; ++p) {
        const T e = static_cast<T>(x[2 * p * sc]), o = static_cast<T>(x[(2 * p + 1) * sc]);
        y[2 * p] = e * c[p] - o * s[p];
        y[2 * p + 1] = e * s[p] + o * c[p];
      }
    }
  });
}

// The transpose of that rotation applied to g (rows x D, contiguous), stored into the strided dst.
template <typename scalar_t, typename T>
void store_unrotated(const T* g, int64_t rows, int64_t D, const T* cos, const T* sin, const Strided<scalar_t>& dst) {
  const int64_t P = D / 2;
  with_col_stride(dst.s_col, [&](auto sc) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* gr = g + r * D;
      const T* c = cos + r * P;
      const T* s = sin + r * P;
      scalar_t* x = dst.x + r * dst.s_row;
      for (int64_t p = 0; p < P; ++p) {
        const T ge = gr[2 * p], go = gr[2 * p + 1];
        x[2 * p * sc] = static_cast<scalar_t>(ge * c[p] + go * s[p]);
        x[(2 * p + 1) * sc] = static_cast<scalar_t>(go * c[p] - ge * s[p]);
      }
    }
  });
}

template <typename scalar_t, typename T>
void load_plain(const Strided<scalar_t>& src, int64_t rows, int64_t D, T* dst) {
  with_col_stride(src.s_col, [&](auto sc) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* x = src.x + r * src.s_row;
      for (int64_t d = 0; d < D; ++d) {
        dst[r * D + d] = static_cast<T>(x[d * sc]);
      }
    }
  });
}

template <typename scalar_t, typename T>
void store_plain(const T* src, int64_t rows, int64_t D, const Strided<scalar_t>& dst) {
  with_col_stride(dst.s_col, [&](auto sc) {
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* x = dst.x + r * dst.s_row;
      for (int64_t d = 0; d < D; ++d) {
        x[d * sc] = static_cast<scalar_t>(src[r * D + d]);
      }
    }
  });
}

// dot[r] = sum_d x[r, d] * y[r, d], x strided, y (rows x D) contiguous.
template <typename scalar_t, typename T>
void row_dots(const Strided<scalar_t>& x, const T* y, int64_t rows, int64_t D, T* dot) {
  with_col_stride(x.s_col, [&](auto sc) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* xr = x.x + r * x.s_row;
      const T* yr = y + r * D;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) {
        acc += static_cast<T>(xr[d * sc]) * yr[d];
      }
      dot[r] = acc;
    }
  });
}

// ------------------------------------------------------------------------------------------------ checks

constexpr const char* kSelf = "self_attention";
constexpr const char* kLatent = "latent_attention";

struct Dims {
  int64_t B, H, N, M, D;
};

Dims check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool self) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (batch, heads, tokens, head_dim), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (batch, heads, keys, head_dim), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const Dims dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == dims.B && k.size(1) == dims.H && k.size(3) == dims.D, op,
              ": k must have the batch, heads and head_dim of q ", q.sizes(), ", got shape ", k.sizes());
  if (self) {
    TORCH_CHECK(dims.M == dims.N, op, ": k must have as many positions as q (", dims.N, "), got shape ", k.sizes());
  } else {
    TORCH_CHECK(dims.M >= 1, op, ": k must hold at least one key, got shape ", k.sizes());
  }
  TORCH_CHECK(dims.D > 0 && dims.D % 2 == 0, op, ": head_dim (q.shape[-1]) must be even (RoPE turns pairs), got ",
              dims.D);
  TORCH_CHECK(dims.N < INT_MAX && dims.M < INT_MAX && dims.D < INT_MAX, op,
              ": tokens, keys and head_dim must each be < 2^31");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype, op, ": k must have the dtype of q (", dtype, "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dtype, op, ": v must have the dtype of q (", dtype, "), got ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor for this kernel, got ", q.device());
  TORCH_CHECK(k.device().is_cpu(), op, ": k must be a CPU tensor for this kernel, got ", k.device());
  TORCH_CHECK(v.device().is_cpu(), op, ": v must be a CPU tensor for this kernel, got ", v.device());
  return dims;
}

void check_tables(const char* op, const char* cos_name, const char* sin_name, const at::Tensor& cos,
                  const at::Tensor& sin, int64_t rows, int64_t D, const char* rows_of) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, cos_name}, {sin, sin_name}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == D / 2, op, ": ", name, " must have shape (", rows,
                ", ", D / 2, ") (", rows_of, ", head_dim / 2), got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  }
  TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), op, ": ", sin_name, " must have the dtype of ", cos_name, " (",
              cos.scalar_type(), "), got ", sin.scalar_type());
}

void check_window(const char* op, int64_t window) {
  TORCH_CHECK(window >= 1, op, ": window must be >= 1 (query i sees keys i - window < j <= i), got ", window);
}

// grad_out and out of the backward: q's shape, dtype, device; lse: (B, H, N) in the compute dtype.
void check_backward(const char* op, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out,
                    const at::Tensor& lse) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (", q.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  }
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2), op,
              ": lse must have shape (batch, heads, tokens) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
              "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype, op, ": lse must be ", lse_dtype, " for q of dtype ", q.scalar_type(),
              ", got ", lse.scalar_type());
  TORCH_CHECK(lse.device().is_cpu(), op, ": lse must be a CPU tensor, got ", lse.device());
}

// --------------------------------------------------------------------------------------------- drivers

struct Tables {
  at::Tensor cos_q, sin_q, cos_k, sin_k;  // contiguous, in the compute dtype
};

Tables convert_tables(const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k,
                      const at::Tensor& sin_k, at::ScalarType compute) {
  const auto conv = [compute](const at::Tensor& t) { return t.to(compute).contiguous(); };
  return {conv(cos_q), conv(sin_q), conv(cos_k), conv(sin_k)};
}

template <typename scalar_t, bool kCausal>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Dims& dims, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const Tables& tab, int64_t window) {
  using T = at::opmath_type<scalar_t>;
  // Plain copies: lambdas cannot capture structured bindings before C++20.
  const int64_t B = dims.B, H = dims.H, N = dims.N, M = dims.M, D = dims.D;
  // q's layout (a transposed view of (B, N, H, D) from the model: merging the heads afterwards is a view).
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(c10::CppTypeToScalarType<T>::value));
  const T scale = T(1) / std::sqrt(static_cast<T>(D));
  const RowFns<T, kCausal> fns = select_row_fns<T, kCausal>();
  const int64_t tile = std::min(N, kBlockQ) * max_block_keys<kCausal>(N, M, window);
  const T* cq = tab.cos_q.const_data_ptr<T>();
  const T* sq = tab.sin_q.const_data_ptr<T>();
  const T* ck = tab.cos_k.const_data_ptr<T>();
  const T* sk = tab.sin_k.const_data_ptr<T>();
  T* lse_p = lse.mutable_data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(static_cast<size_t>(2 * N * D + 2 * M * D + tile));
    T *Q = buf.data(), *O = Q + N * D, *K = O + N * D, *V = K + M * D, *S = V + M * D;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      load_rotated(head_of<scalar_t>(q, b, h), N, D, cq, sq, Q);
      load_rotated(head_of<scalar_t>(k, b, h), M, D, ck, sk, K);
      load_plain(head_of<scalar_t>(v, b, h), M, D, V);
      forward_head<T, kCausal>(Q, K, V, N, M, D, window, scale, fns, O, lse_p + bh * N, S);
      store_plain(O, N, D, head_of<scalar_t>(out, b, h));
    }
  });
  return {out, lse};
}

template <typename scalar_t, bool kCausal>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const Dims& dims, const at::Tensor& grad_out,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const Tables& tab,
                                                             const at::Tensor& out, const at::Tensor& lse_in,
                                                             int64_t window, bool q_grad) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = dims.B, H = dims.H, N = dims.N, M = dims.M, D = dims.D;
  at::Tensor dq = q_grad ? at::empty_like(q) : at::empty({0}, q.options());
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  const at::Tensor lse = lse_in.contiguous();
  const T scale = T(1) / std::sqrt(static_cast<T>(D));
  const RowFns<T, kCausal> fns = select_row_fns<T, kCausal>();
  const int64_t tile = std::min(N, kBlockQ) * max_block_keys<kCausal>(N, M, window);
  const T* cq = tab.cos_q.const_data_ptr<T>();
  const T* sq = tab.sin_q.const_data_ptr<T>();
  const T* ck = tab.cos_k.const_data_ptr<T>();
  const T* sk = tab.sin_k.const_data_ptr<T>();
  const T* lse_p = lse.const_data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(static_cast<size_t>(3 * N * D + N + 5 * M * D + 2 * tile));
    T *Q = buf.data(), *dO = Q + N * D, *dQ = dO + N * D, *delta = dQ + N * D;
    T *K = delta + N, *V = K + M * D, *dK = V + M * D, *dV = dK + M * D, *S = dV + M * D, *dP = S + tile;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      load_rotated(head_of<scalar_t>(q, b, h), N, D, cq, sq, Q);
      load_rotated(head_of<scalar_t>(k, b, h), M, D, ck, sk, K);
      load_plain(head_of<scalar_t>(v, b, h), M, D, V);
      load_plain(head_of<scalar_t>(grad_out, b, h), N, D, dO);
      row_dots(head_of<scalar_t>(out, b, h), dO, N, D, delta);  // delta = rowsum(dO * out), out as stored
      backward_head<T, kCausal>(Q, K, V, dO, lse_p + bh * N, delta, N, M, D, window, scale, fns, q_grad ? dQ : nullptr,
                                dK, dV, S, dP);
      if (q_grad) {
        store_unrotated(dQ, N, D, cq, sq, head_of<scalar_t>(dq, b, h));
      }
      store_unrotated(dK, M, D, ck, sk, head_of<scalar_t>(dk, b, h));
      store_plain(dV, M, D, head_of<scalar_t>(dv, b, h));
    }
  });
  return {dq, dk, dv};
}

at::ScalarType compute_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> self_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& cos, const at::Tensor& sin, int64_t window) {
  const Dims dims = check_qkv(kSelf, q, k, v, true);
  check_tables(kSelf, "cos", "sin", cos, sin, dims.N, dims.D, "tokens");
  check_window(kSelf, window);
  const at::Tensor c = cos.to(compute_dtype(q)).contiguous(), s = sin.to(compute_dtype(q)).contiguous();
  const Tables tab{c, s, c, s};
  const int64_t w = std::min(window, std::max<int64_t>(dims.N, 1));  // a window beyond N is plain causal
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "self_attention_cpu",
                                  [&] { result = forward_impl<scalar_t, true>(dims, q, k, v, tab, w); });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_backward_cpu(const at::Tensor& grad_out,
                                                                           const at::Tensor& q, const at::Tensor& k,
                                                                           const at::Tensor& v, const at::Tensor& cos,
                                                                           const at::Tensor& sin, const at::Tensor& out,
                                                                           const at::Tensor& lse, int64_t window) {
  const char* op = "self_attention_backward";
  const Dims dims = check_qkv(op, q, k, v, true);
  check_tables(op, "cos", "sin", cos, sin, dims.N, dims.D, "tokens");
  check_window(op, window);
  check_backward(op, q, grad_out, out, lse);
  const at::Tensor c = cos.to(compute_dtype(q)).contiguous(), s = sin.to(compute_dtype(q)).contiguous();
  const Tables tab{c, s, c, s};
  const int64_t w = std::min(window, std::max<int64_t>(dims.N, 1));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "self_attention_backward_cpu", [&] {
    result = backward_impl<scalar_t, true>(dims, grad_out, q, k, v, tab, out, lse, w, true);
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> latent_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                        const at::Tensor& cos_k, const at::Tensor& sin_k) {
  const Dims dims = check_qkv(kLatent, q, k, v, false);
  check_tables(kLatent, "cos_q", "sin_q", cos_q, sin_q, dims.N, dims.D, "tokens");
  check_tables(kLatent, "cos_k", "sin_k", cos_k, sin_k, dims.M, dims.D, "keys");
  const Tables tab = convert_tables(cos_q, sin_q, cos_k, sin_k, compute_dtype(q));
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "latent_attention_cpu",
                                  [&] { result = forward_impl<scalar_t, false>(dims, q, k, v, tab, 0); });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_q,
    const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k, const at::Tensor& out,
    const at::Tensor& lse, bool q_grad) {
  const char* op = "latent_attention_backward";
  const Dims dims = check_qkv(op, q, k, v, false);
  check_tables(op, "cos_q", "sin_q", cos_q, sin_q, dims.N, dims.D, "tokens");
  check_tables(op, "cos_k", "sin_k", cos_k, sin_k, dims.M, dims.D, "keys");
  check_backward(op, q, grad_out, out, lse);
  const Tables tab = convert_tables(cos_q, sin_q, cos_k, sin_k, compute_dtype(q));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "latent_attention_backward_cpu", [&] {
    result = backward_impl<scalar_t, false>(dims, grad_out, q, k, v, tab, out, lse, 0, q_grad);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltm, CPU, m) {
  m.impl("self_attention", &self_attention_cpu);
  m.impl("self_attention_backward", &self_attention_backward_cpu);
  m.impl("latent_attention", &latent_attention_cpu);
  m.impl("latent_attention_backward", &latent_attention_backward_cpu);
}

}  // namespace ltm

// CPU kernel of the LM head with its cross-entropy (schemas in ltm_ops.cpp; autograd, fake kernels and the
// functional in ltm_kernels/lm_head_nll_cpp.py; the eager definition is reference.lm_head_nll_ref):
//   ltm::lm_head_nll           per-sequence summed NLL of logits = hidden weight^T, the rows' logsumexp and,
//                              when asked, dh = d(row NLL)/d(hidden row) = softmax(l) weight - weight[target]
//   ltm::lm_head_nll_backward  grad_hidden = grad[b] dh, and grad_weight only when asked (decoder updates)
//
// Why one pass and no (rows x V) logits: the inner loop needs the NLL and dh at every step, for 2048 rows and
// V = 50258 (400 MB of fp32 logits). The rows are split into tasks of `rows_per_task`; a task walks the
// vocabulary in blocks of `vocab_block` weight rows and keeps, per row, the running max m, the running sum
// s = sum_j exp(l_j - m) and the accumulator a = sum_j exp(l_j - m) W_j, rescaling s and a by exp(m_old - m)
// when m grows (the online softmax of FlashAttention, with W as the values). A block's logits are consumed in
// cache right after the GEMM that makes them, the softmax gradient overwrites them in place, and at the end
//   lse = m + log s,   nll_row = lse - l_target,   dh = a / s - W_target         (0 for target -1).
// dW (decoder updates only) recomputes the logits per vocabulary block from the saved lse: one task per block.
//
// Engines, picked per call (`choose_plan` for float, `bf16_engine` for bfloat16):
//   avx512  float, x86 with AVX-512F: the transposed problem l^T = W H^T, so that a SIMD vector spans 16 rows
//           (tokens) and the softmax's max, exp and sum run across rows with no horizontal reduction. Both
//           GEMMs (l^T = W_j H^T and a^T += W_j^T P^T) use one 12 x 32 register-tile kernel that broadcasts
//           weight elements against rows of a panel-major H^T (or P^T); W is packed once per call in 12-row
//           tiles (pack_tiles) that both GEMMs read. Tasks take as many rows as fit in L2 (choose_plan).
//           Its Bf16Pairs kind runs bfloat16 the same way with vdpbf16ps (AVX512-BF16) on pairs of k, fp32
//           accumulation, W tile-packed twice (its rows as pairs along d for the logits, paired along the
//           vocabulary for the dh GEMM), P rounded to bf16. Only where
//           vdpbf16ps outruns fp32 FMA (timed once per process; AMD Zen 4/5, not Intel Xeons).
//   blas    float64, and float without AVX-512: the row-major problem with the BLAS GEMM of blas.h.
//   amx     bfloat16 on CPUs with AMX (and AVX512-BF16), d a multiple of 32: both GEMMs on the tile unit with
//           fp32 accumulation, the softmax in fp32 and P rounded to bf16 for the dh GEMM.
// Other bfloat16 and all float16 inputs are converted to float on entry and computed in float.
// LTM_CPU_BF16_ENGINE=amx|dot|float (default auto) names the bfloat16 engine, for tests and benchmarks.
// Workspace: per-thread buffers that only ever grow, kept across calls (thread_local), so the inner loop's
// steps reuse them instead of page-faulting fresh ones in every step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "blas.h"
#include "cpu_isa.h"
#include "vectorisable_exp.h"

// GCC 12's AVX-512 intrinsics start from an undefined register (_mm512_undefined_ps), which
// -Wmaybe-uninitialized reports in every function that inlines them: a false positive of the header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#if defined(__unix__)
#include <unistd.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ltm {
namespace {

// ------------------------------------------------------------------------------------------- workspace

// A per-thread buffer of at least `n` elements, 64-byte aligned, contents undefined. It only grows, so the
// inner loop's second and later steps allocate nothing.
template <typename T, int kSlot>
T* scratch(int64_t n) {
  struct Buffer {
    void* p = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  const size_t want = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
  if (want > buf.bytes) {
    std::free(buf.p);
    const size_t rounded = (want + 63) / 64 * 64;
    buf.p = std::aligned_alloc(64, rounded);
    TORCH_CHECK(buf.p != nullptr, "lm_head_nll: out of memory allocating ", rounded, " bytes of workspace");
    buf.bytes = rounded;
  }
  return static_cast<T*>(buf.p);
}

// ------------------------------------------------------------------------------------------------- plan

enum class Engine { kAvx512, kBlas };

struct Plan {
  Engine engine;
  int64_t rows_per_task;  // a multiple of 32 for avx512 (its tile is 32 rows wide)
  int64_t vocab_block;    // weight rows per block: a block's logits (rows_per_task x vocab_block) stay in L2
};

// Rows per task: `widest` (a multiple of 32), shrunk in steps of 32 until every thread gets two tasks.
inline int64_t task_rows(int64_t rows, int64_t widest) {
  const int64_t threads = at::get_num_threads();
  int64_t per_task = widest;
  while (per_task > 32 && (rows + per_task - 1) / per_task < 2 * threads) {
    per_task -= 32;
  }
  return per_task;
}

// run(r0, rows) for the tasks of `per_task` rows that cover [0, M), on ATen's threads.
template <typename F>
void for_each_task(int64_t M, int64_t per_task, const F& run) {
  at::parallel_for(0, (M + per_task - 1) / per_task, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      run(task * per_task, std::min(per_task, M - task * per_task));
    }
  });
}

// The per-core L2 in bytes (sysconf, else sysfs; 1 MB if neither says).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    long n = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    n = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (n <= 0) {
      if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index2/size", "r")) {
        long kb = 0;
        if (std::fscanf(f, "%ldK", &kb) == 1) {
          n = kb * 1024;
        }
        std::fclose(f);
      }
    }
    return n > 0 ? static_cast<int64_t>(n) : int64_t{1} << 20;
  }();
  return bytes;
}

// avx512: a task's H^T, a^T, the block's logits (rows x vocab_block each) and the weight block stay in ~60% of
// L2. Measured at d = 256, V = 50258, 2048 rows (benchmarks/NOTES.md, "The CPU inner loop"): 252 vocabulary rows
// (a multiple of the 12-row tile, ~256 KB of weight), and as many rows as fit: 256 on a 2 MB L2 (Intel Xeon), where
// fewer rows per task re-stream W from L3 more often (one pass per task); 96 on a 1 MB L2, the size measured best
// on an AMD EPYC Zen 5 (with row-major task buffers: not re-measured since they became panel-major).
// More than 256 leaves too few tasks for two threads. Small problems shrink the task so every thread works.
template <typename T>
Plan choose_plan(int64_t rows, int64_t d) {
  const bool avx512 = std::is_same_v<T, float> && cpu_isa() == Isa::kAvx512;
  // For larger d, keep the weight block near 256 KB.
  const int64_t target_rows = (64 * 1024) / std::max<int64_t>(d, 1);
  if (!avx512) {
    return {Engine::kBlas, task_rows(rows, 64), std::clamp<int64_t>(target_rows, 16, 256)};
  }
  const int64_t vocab_block = std::clamp<int64_t>(target_rows / 12 * 12, 12, 252);
  const int64_t room = l2_bytes() * 6 / 10 - vocab_block * d * 4;
  const int64_t fit = room / (4 * (2 * d + vocab_block)) / 32 * 32;
  return {Engine::kAvx512, task_rows(rows, std::clamp<int64_t>(fit, 32, 256)), vocab_block};
}

// The end of a task, shared by the engines: lse = m + log s, nll = lse - l_target, and dh = a / s - W_target
// (0 for an ignored row). a_at(t, k) reads the accumulator a of row t, w_at(v, k) the weight; dh may alias a.
template <typename T, typename AccessA, typename AccessW>
inline void finish_rows(int64_t rows, int64_t d, const T* m, const T* s, const T* tl, const int64_t* tgt, bool want_dh,
                        T* lse, T* row_nll, T* dh, AccessA a_at, AccessW w_at) {
  for (int64_t t = 0; t < rows; ++t) {
    lse[t] = m[t] + std::log(s[t]);
    const bool keep = tgt[t] >= 0;
    row_nll[t] = keep ? lse[t] - tl[t] : T(0);
    if (!want_dh) {
      continue;
    }
    T* out = dh + t * d;
    if (!keep) {
      std::fill(out, out + d, T(0));
      continue;
    }
    const T inv = T(1) / s[t];
    for (int64_t k = 0; k < d; ++k) {
      out[k] = a_at(t, k) * inv - w_at(tgt[t], k);
    }
  }
}

// ----------------------------------------------------------------------------------------- avx512 engine

#if defined(__x86_64__)
// avx512bf16 is in the target of the float code too, so that one tile template serves both element kinds;
// the compiler emits BF16 instructions only for the intrinsics that ask for them (the Bf16Pairs kind, run only
// where the CPU has them).
#define LTM_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,fma")))

// vdpbf16ps is usable: AVX-512 (not lowered by ATEN_CPU_CAPABILITY) and AVX512-BF16.
bool bf16_dot_usable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

// FLOPs per ns of one thread over 24 independent accumulators: vdpbf16ps (bf16) or vfmadd231ps.
LTM_AVX512 double dot_rate(bool bf16) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) {
    acc[i] = _mm512_set1_ps(1e-3f * static_cast<float>(i));
  }
  // Normal numbers read as float or as bf16 pairs (0.998 and 0.001 as either), so no denormal slows either.
  __m512 x = _mm512_castsi512_ps(_mm512_set1_epi32(0x3F7F3F7F));
  const __m512 y = _mm512_castsi512_ps(_mm512_set1_epi32(0x3A833A83));
  constexpr int64_t kIters = 4096;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t n = 0; n < kIters; ++n) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) {
      acc[i] = bf16 ? _mm512_dpbf16_ps(acc[i], (__m512bh)x, (__m512bh)y) : _mm512_fmadd_ps(x, y, acc[i]);
    }
    __asm__ volatile("" : "+v"(x));  // keeps the loop from being folded
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 0; i < 24; ++i) {
    __asm__ volatile("" : : "v"(acc[i]));  // the sums are used, so none of the work is dropped
  }
  return static_cast<double>(kIters) * 24 * 16 * (bf16 ? 4 : 2) / ns;
}

// Whether vdpbf16ps multiplies faster than fp32 FMA here, timed once per process (best of 5, ~1 ms): on the
// Intel Xeon with AMX measured here a zmm vdpbf16ps gives half the FMA rate in FLOPs, so the float engine wins;
// AMD Zen 4 runs it at about twice (oneDNN's bf16 GEMMs reach ~2x fp32 there, benchmarks/NOTES.md).
bool bf16_dot_fast() {
  static const bool fast = [] {
    double bf = 0, fma = 0;
    for (int r = 0; r < 5; ++r) {
      fma = std::max(fma, dot_rate(false));
      bf = std::max(bf, dot_rate(true));
    }
    return bf >= 1.3 * fma;
  }();
  return fast;
}

constexpr int kTileRows = 12;  // 12 x 2 accumulators + 2 B vectors + 1 broadcast: 27 of the 32 zmm registers

// n rounded up to whole tiles: the rows a tile-packed matrix of n rows holds (pack_tiles).
constexpr int64_t whole_tiles(int64_t n) { return (n + kTileRows - 1) / kTileRows * kTileRows; }

// The tile's element kinds. F32: one float per element, one FMA per product. Bf16Pairs: two bfloat16 of
// consecutive k packed in one uint32 (low half first), and vdpbf16ps adds both products into an fp32 lane.
struct F32 {
  using Elem = float;
  static constexpr int kPack = 1;
  LTM_AVX512 static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  LTM_AVX512 static __m512 bcast(float x) { return _mm512_set1_ps(x); }
  LTM_AVX512 static __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

struct Bf16Pairs {
  using Elem = uint32_t;
  static constexpr int kPack = 2;
  LTM_AVX512 static __m512 load(const uint32_t* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  LTM_AVX512 static __m512 bcast(uint32_t x) { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(x))); }
  LTM_AVX512 static __m512 madd(__m512 acc, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};

// The task's row-indexed operands are panel-major: panel p holds the task's rows [32p, 32p + 32) as a
// (K x 32) row-major block, so that a tile's B rows and C rows are contiguous 128-byte lines. A row-major
// (K x rp) layout puts them rp * 4 bytes apart, which for rp = 128 or 256 maps every row of a B panel onto a
// few L1 sets and evicts it while the tiles walk down A.
constexpr int64_t kPanel = 32;

// Where a GEMM's A operand (m x K) keeps element (i, k), with i = kTileRows t + r (row r of tile t):
//   a + t * tile + r * row + (k / chunk) * chunk_step + (k % chunk) * col.
// chunk >= K is one chunk (chunk_step unused); the tile-packed weight's dh GEMM reads it in chunks of 12.
template <typename Elem>
struct OperandA {
  const Elem* a;
  int64_t tile, row, col, chunk, chunk_step;
};

// C[r][0:32] (+)= sum_k A(r, k) B[k][0:32] for r < MR, over tile t of `A`, B and C with row stride kPanel (k counts
// elements of the kind: pairs for Bf16Pairs). `col_scale` null: C = acc; else C = C * col_scale + acc (the online
// softmax's rescale of a^T, fused into the store). `prefetch` non-null (one-chunk A only): the next tile's lines,
// fetched one 64-byte line per row (per 16 elements of a packed tile) and 16 k ahead of their use.
// kRow, kCol, kChunk > 0 fix A's strides at compile time (the tile-packed weight's layouts), so that every
// broadcast of a chunk is one pointer plus a constant: with runtime strides the 12 row addresses spill registers.
template <int MR, typename E, int kRow, int kCol, int kChunk>
LTM_AVX512 inline void tile(int64_t K, const OperandA<typename E::Elem>& A, int64_t t, const typename E::Elem* b,
                            float* c, const float* col_scale, const typename E::Elem* prefetch) {
  using Elem = typename E::Elem;
  constexpr int64_t kLine = 64 / sizeof(Elem);
  const int64_t row = kRow > 0 ? kRow : A.row, col = kCol > 0 ? kCol : A.col, chunk = kChunk > 0 ? kChunk : A.chunk;
  const Elem* a_tile = A.a + t * A.tile;
  const int64_t pf_row = row == 1 ? kLine : row;  // a packed tile's lines are consecutive
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const Elem* ac = a_tile + k0 / chunk * A.chunk_step;
    const Elem* bc = b + k0 * kPanel;
    const int64_t kn = std::min(chunk, K - k0);
    for (int64_t k = 0; k < kn; ++k) {
      if (prefetch != nullptr && k % kLine == 0) {
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(prefetch + i * pf_row + k * col), _MM_HINT_T0);
        }
      }
      const __m512 b0 = E::load(bc + k * kPanel);
      const __m512 b1 = E::load(bc + k * kPanel + 16);
      const Elem* ak = ac + k * col;
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) {
        const __m512 x = E::bcast(ak[i * row]);
        acc0[i] = E::madd(acc0[i], x, b0);
        acc1[i] = E::madd(acc1[i], x, b1);
      }
    }
  }
  if (col_scale == nullptr) {
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      _mm512_storeu_ps(c + i * kPanel, acc0[i]);
      _mm512_storeu_ps(c + i * kPanel + 16, acc1[i]);
    }
  } else {
    const __m512 s0 = _mm512_loadu_ps(col_scale), s1 = _mm512_loadu_ps(col_scale + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      _mm512_storeu_ps(c + i * kPanel, _mm512_fmadd_ps(_mm512_loadu_ps(c + i * kPanel), s0, acc0[i]));
      _mm512_storeu_ps(c + i * kPanel + 16, _mm512_fmadd_ps(_mm512_loadu_ps(c + i * kPanel + 16), s1, acc1[i]));
    }
  }
}

template <int MR, typename E, int kRow, int kCol, int kChunk>
LTM_AVX512 void tile_rows(int64_t K, const OperandA<typename E::Elem>& A, int64_t t, const typename E::Elem* b,
                          float* c, const float* col_scale, int mr) {
  if constexpr (MR > 0) {
    if (mr == MR) {
      tile<MR, E, kRow, kCol, kChunk>(K, A, t, b, c, col_scale, nullptr);
    } else {
      tile_rows<MR - 1, E, kRow, kCol, kChunk>(K, A, t, b, c, col_scale, mr);
    }
  }
}

template <typename E, int kRow, int kCol, int kChunk>
LTM_AVX512 void gemm_panels_fixed(int64_t m, int64_t n, int64_t K, const OperandA<typename E::Elem>& A,
                                  const typename E::Elem* b, int64_t b_panel, float* c, int64_t c_panel,
                                  const float* col_scale, int64_t tiles_after) {
  const int64_t full = m / kTileRows;
  for (int64_t j = 0; j < n; j += kPanel) {
    const typename E::Elem* bp = b + j / kPanel * b_panel;
    float* cp = c + j / kPanel * c_panel;
    const float* cs = col_scale == nullptr ? nullptr : col_scale + j;
    for (int64_t t = 0; t < full; ++t) {
      const bool ahead = j == 0 && t + 1 < full + tiles_after;
      tile<kTileRows, E, kRow, kCol, kChunk>(K, A, t, bp, cp + t * kTileRows * kPanel, cs,
                                             ahead ? A.a + (t + 1) * A.tile : nullptr);
    }
    if (full * kTileRows < m) {
      tile_rows<kTileRows - 1, E, kRow, kCol, kChunk>(K, A, full, bp, cp + full * kTileRows * kPanel, cs,
                                                      static_cast<int>(m - full * kTileRows));
    }
  }
}

// C (m x n fp32) (+)= A (m x K) B (K x n), n a multiple of kPanel, B and C panel-major: panel p of B at b + p *
// b_panel, of C at c + p * c_panel. The B panel (K x 32) stays in L1 while the tiles walk down A. `tiles_after`
// (one-chunk A only): how many tiles of A past this GEMM's are readable. The first panel's tiles prefetch the
// next tile, so that A, streamed from L3 in that panel (the weight block), is in L1 by its turn.
template <typename E>
LTM_AVX512 void gemm_panels(int64_t m, int64_t n, int64_t K, const OperandA<typename E::Elem>& A,
                            const typename E::Elem* b, int64_t b_panel, float* c, int64_t c_panel,
                            const float* col_scale, int64_t tiles_after) {
  if (A.row == 1 && A.col == kTileRows && A.chunk >= K) {  // the packed weight in the logits GEMM
    gemm_panels_fixed<E, 1, kTileRows, 0>(m, n, K, A, b, b_panel, c, c_panel, col_scale, tiles_after);
  } else {  // ... and in the dh GEMM
    TORCH_INTERNAL_ASSERT(A.row == kTileRows && A.col == 1 && A.chunk == kTileRows, "lm_head_nll: unpacked operand");
    gemm_panels_fixed<E, kTileRows, 1, kTileRows>(m, n, K, A, b, b_panel, c, c_panel, col_scale, 0);
  }
}

// exp_softmax of vectorisable_exp.h, 16 lanes: the same polynomial and clamps (max/min with the constant
// first, so a NaN x is returned unchanged and stays NaN), results for x < -87 flushed to 0. 2^n is applied by
// one vscalefps instead of two factors built from bits: for x >= -87 both are exact scalings of p by a power
// of two (results bit-identical), and below that the result is 0 either way.
LTM_AVX512 inline __m512 exp_softmax16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.73f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 kRound = _mm512_set1_ps(12582912.0f);
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), kRound);
  const __m512 n = _mm512_sub_ps(t, kRound);
  const __m512 r =
      _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(p, n);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(tiny, e, _mm512_setzero_ps());
}

// P^T of one block (panel-major, panels of vb x 32 fp32, in place in lt) as the B operand of the dh GEMM, with
// its panel stride: for F32 lt itself; for Bf16Pairs rounded to bf16 and paired along the vocabulary, panels of
// (vb / 2) x 32 with out[q][t] = (P^T[2q][t], P^T[2q + 1][t]), the row past an odd jb zero.
LTM_AVX512 inline std::pair<const float*, int64_t> probabilities(F32, const float* lt, int64_t, int64_t vb, int64_t) {
  return {lt, vb * kPanel};
}

LTM_AVX512 inline std::pair<const uint32_t*, int64_t> probabilities(Bf16Pairs, const float* lt, int64_t rp, int64_t vb,
                                                                    int64_t jb) {
  const int64_t panel = vb / 2 * kPanel;
  uint32_t* out = scratch<uint32_t, 13>(rp / kPanel * panel);
  for (int64_t p = 0; p < rp / kPanel; ++p) {
    const float* lp = lt + p * vb * kPanel;
    for (int64_t q = 0; q < (jb + 1) / 2; ++q) {
      const float* lo = lp + 2 * q * kPanel;
      const bool odd_end = 2 * q + 1 == jb;
      for (int64_t t = 0; t < kPanel; t += 16) {
        const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lo + t)));
        const __m512i b = odd_end
                              ? _mm512_setzero_si512()
                              : _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lo + kPanel + t)));
        _mm512_storeu_si512(out + p * panel + q * kPanel + t, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
      }
    }
  }
  return {out, panel};
}

inline float weight_value(F32, const float* w, int64_t i) { return w[i]; }
inline float weight_value(Bf16Pairs, const uint32_t* w, int64_t i) {
  return static_cast<float>(at::BFloat16(reinterpret_cast<const uint16_t*>(w)[i], at::BFloat16::from_bits()));
}

// One task: rows [r0, r0 + rows) of the flattened (M, d) hidden, given as `rows` rows of d / kPack elements.
// logits_w: the weight as the A of l^T = W H^T (V x d / kPack); dh_w: as the A of a^T += W^T P^T (d x V / kPack,
// element (k, c) with c counting kPack vocabulary rows); both tile-packed (pack_tiles: for F32 one packed copy
// serves both, Bf16Pairs packs W's rows as pairs along d and W paired along the vocabulary). w_rows: the weight's
// rows, for the targets' rows in dh. Blocks start at multiples of vb, a multiple of kTileRows (of 2 kTileRows for
// Bf16Pairs), so a block's operands start at a whole tile and a whole chunk.
// Writes lse and the row NLL, and dh when wanted.
template <typename E>
LTM_AVX512 void task_avx512(const typename E::Elem* H, const OperandA<typename E::Elem>& logits_w,
                            const OperandA<typename E::Elem>& dh_w, const typename E::Elem* w_rows, const int64_t* tgt,
                            int64_t rows, int64_t d, int64_t V, int64_t vb, bool want_dh, float* lse, float* row_nll,
                            float* dh) {
  using Elem = typename E::Elem;
  const int64_t dk = d / E::kPack;                      // elements per row
  const int64_t rp = (rows + 31) / 32 * 32;             // padded rows: the tile is 32 wide; pad rows hold zeros
  Elem* ht = scratch<Elem, 0>(dk * rp);                 // H^T, panels of dk x 32
  float* lt = scratch<float, 1>(vb * rp);               // l^T then P^T of one vocabulary block, panels of vb x 32
  float* at = scratch<float, 2>(want_dh ? d * rp : 1);  // a^T, panels of d x 32
  float* stat = scratch<float, 3>(4 * rp);              // m, s, rescale, target logit
  float *m = stat, *s = stat + rp, *scale = stat + 2 * rp, *tl = stat + 3 * rp;
  // Row t of the task in panel-major layouts: panel t / 32, lane t % 32.
  auto panel_offset = [](int64_t t, int64_t panel_rows) { return t / kPanel * panel_rows * kPanel + t % kPanel; };
  for (int64_t t = 0; t < rp; ++t) {
    Elem* col = ht + panel_offset(t, dk);
    for (int64_t k = 0; k < dk; ++k) {
      col[k * kPanel] = t < rows ? H[t * dk + k] : Elem(0);
    }
  }
  std::fill(m, m + rp, -std::numeric_limits<float>::infinity());
  std::fill(s, s + rp, 0.0f);
  std::fill(tl, tl + rp, 0.0f);
  if (want_dh) {
    std::fill(at, at + d * rp, 0.0f);
  }
  for (int64_t j0 = 0; j0 < V; j0 += vb) {  // vb is even, so j0 / kPack is whole
    const int64_t jb = std::min(vb, V - j0);
    OperandA<Elem> wl = logits_w, wd = dh_w;
    wl.a += j0 * dk;
    wd.a += j0 / E::kPack * d;
    gemm_panels<E>(jb, rp, dk, wl, ht, dk * kPanel, lt, vb * kPanel, nullptr,
                   (V - j0 - jb) / kTileRows);  // l^T = W_j H^T
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t c = tgt[t] - j0;
      if (c >= 0 && c < jb) {
        tl[t] = lt[panel_offset(t, vb) + c * kPanel];
      }
    }
    for (int64_t t = 0; t < rp; t += 16) {
      float* col = lt + panel_offset(t, vb);  // 16 rows of the block's logits, column c at col + c * kPanel
      const __m512 m_old = _mm512_loadu_ps(m + t);
      __m512 mx = m_old;
      for (int64_t c = 0; c < jb; ++c) {
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(col + c * kPanel));
      }
      const __m512 sc = exp_softmax16(_mm512_sub_ps(m_old, mx));  // m_old = -inf at the first block: 0
      __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(s + t), sc);
      for (int64_t c = 0; c < jb; ++c) {
        const __m512 p = exp_softmax16(_mm512_sub_ps(_mm512_loadu_ps(col + c * kPanel), mx));
        sum = _mm512_add_ps(sum, p);
        _mm512_storeu_ps(col + c * kPanel, p);
      }
      _mm512_storeu_ps(m + t, mx);
      _mm512_storeu_ps(s + t, sum);
      _mm512_storeu_ps(scale + t, sc);
    }
    if (want_dh) {  // a^T = a^T * scale + W_j^T P^T
      const auto [pt, pt_panel] = probabilities(E{}, lt, rp, vb, jb);
      gemm_panels<E>(d, rp, (jb + E::kPack - 1) / E::kPack, wd, pt, pt_panel, at, d * kPanel, scale, 0);
    }
  }
  finish_rows(
      rows, d, m, s, tl, tgt, want_dh, lse, row_nll, dh,
      [&](int64_t t, int64_t k) { return at[panel_offset(t, d) + k * kPanel]; },
      [&](int64_t v, int64_t k) { return weight_value(E{}, w_rows, v * d + k); });
}
// The padding of the packed weight layouts: a whole number of AMX blocks (kAmxVocab).
constexpr int64_t kPackedVocab = 256;

// (W[2q][k], W[2q + 1][k]) of the bf16 weight (V x d) as one pair, low half first; a row past V reads as zero.
inline uint32_t vocab_pair(const uint16_t* W, int64_t V, int64_t d, int64_t q, int64_t k) {
  const uint32_t lo16 = 2 * q < V ? W[2 * q * d + k] : 0, hi16 = 2 * q + 1 < V ? W[(2 * q + 1) * d + k] : 0;
  return lo16 | (hi16 << 16);
}

// wv: the weight paired along the vocabulary, wv[q][k] = vocab_pair(q, k) for q < padded / 2; `padded` a
// multiple of kPackedVocab. The B operand of AMX's dh GEMM.
void pack_vocab_pairs(const uint16_t* W, int64_t V, int64_t d, int64_t padded, uint32_t* wv) {
  at::parallel_for(0, padded / kPackedVocab, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo * kPackedVocab / 2; q < hi * kPackedVocab / 2; ++q) {
      for (int64_t k = 0; k < d; ++k) {
        wv[q * d + k] = vocab_pair(W, V, d, q, k);
      }
    }
  });
}

// A (rows x cols) matrix given by value(i, k), packed by tiles of kTileRows rows, k-major inside a tile:
// out[t][k][r] = value(12 t + r, k), zero past `rows`. For the float weight (rows V, cols d) the logits GEMM
// then broadcasts from one sequential stream instead of 12 rows d apart (for d = 256 those share 4 L1 sets with
// the B panel and evict it: ~10% of the forward, benchmarks/NOTES.md), and the dh GEMM reads 12 vocabulary rows
// of 12 d-values per chunk. Bf16Pairs packs two matrices this way: W's rows as pairs along d (the logits GEMM),
// and W paired along the vocabulary (the dh GEMM).
template <typename Elem, typename Value>
void pack_tiles(int64_t rows, int64_t cols, const Value& value, Elem* out) {
  at::parallel_for(0, (rows + kTileRows - 1) / kTileRows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      Elem* o = out + t * kTileRows * cols;
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t i = t * kTileRows + r;
        for (int64_t k = 0; k < cols; ++k) {
          o[k * kTileRows + r] = i < rows ? value(i, k) : Elem(0);
        }
      }
    }
  });
}

// The tile-packed weight (pack_tiles) as the A of the logits GEMM and of the dh GEMM.
// `cols`: elements per packed row (d / kPack for the logits operand, d for the dh operand).
template <typename Elem>
OperandA<Elem> packed_logits_operand(const Elem* packed, int64_t cols) {
  return {packed, kTileRows * cols, 1, kTileRows, std::numeric_limits<int64_t>::max(), 0};
}
template <typename Elem>
OperandA<Elem> packed_dh_operand(const Elem* packed, int64_t cols) {
  return {packed, kTileRows * kTileRows, kTileRows, 1, kTileRows, kTileRows * cols};
}

#undef LTM_AVX512
#endif  // __x86_64__

// -------------------------------------------------------------------------------------------- amx engine
// bfloat16 on CPUs with AMX (Intel Sapphire Rapids and later): both GEMMs on the tile unit, fp32 accumulation.
// The row-major problem: l = H W_j^T (A = H rows, B = W_j^T in the pair-interleaved "VNNI" layout), the online
// softmax along each row in fp32, P rounded to bf16, then a += P W_j (A = P rows, B = W_j pair-interleaved
// along the vocabulary). The two B layouts of W are packed once per call, shared by all tasks. Tiles: 16 rows
// x 64 bytes each; C is 2 x 2 tiles (32 rows x 32 columns), so a task's rows and d are multiples of 32.
#if defined(__x86_64__) && defined(__linux__)
#define LTM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

constexpr int64_t kAmxVocab = kPackedVocab;  // vocabulary rows per block: l (128 x 256 fp32) and P stay in L2
constexpr int64_t kAmxRows = 128;

// AMX needs the kernel's permission for the tile data state (Linux 5.16+); asked once per process.
bool amx_usable() {
  static const bool ok = [] {
    if (!bf16_dot_usable()) {
      return false;
    }
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return amx_bf16 && amx_tile && syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

LTM_AMX inline void amx_begin() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

// C (32 x 32 fp32, row stride ldc floats) (+)= A (32 x 32K bf16, row stride lda elements) B, B in VNNI layout:
// 16K rows of pairs (row stride ldb uint32), 32 columns. Tiles 0-3 hold C, 4-5 A, 6-7 B.
LTM_AMX inline void amx_block(int64_t ksteps, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
                              int64_t ldc, bool accumulate) {
  if (accumulate) {
    _tile_loadd(0, c, ldc * 4);
    _tile_loadd(1, c + 16, ldc * 4);
    _tile_loadd(2, c + 16 * ldc, ldc * 4);
    _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < ksteps; ++k) {
    const uint16_t* ak = a + k * 32;
    const uint32_t* bk = b + k * 16 * ldb;
    _tile_loadd(4, ak, lda * 2);
    _tile_loadd(6, bk, ldb * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, bk + 16, ldb * 4);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, ak + 16 * lda, lda * 2);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

// wt, per block j of kAmxVocab vocabulary rows (zero past V): (d / 2) x kAmxVocab pairs,
// wt[p][n] = (W[n][2p], W[n][2p + 1]), the B operand of l = H W_j^T.
void pack_amx_columns(const uint16_t* W, int64_t V, int64_t d, uint32_t* wt) {
  const int64_t blocks = (V + kAmxVocab - 1) / kAmxVocab, block = kAmxVocab * d;
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      uint32_t* t = wt + j * block / 2;
      for (int64_t n = 0; n < kAmxVocab; ++n) {
        const int64_t row = j * kAmxVocab + n;
        const uint16_t* w = row < V ? W + row * d : nullptr;
        for (int64_t p = 0; p < d / 2; ++p) {
          uint32_t pair = 0;
          if (w != nullptr) {
            std::memcpy(&pair, w + 2 * p, 4);
          }
          t[p * kAmxVocab + n] = pair;
        }
      }
    }
  });
}

LTM_AMX inline float hmax(__m512 x) { return _mm512_reduce_max_ps(x); }

// One task: rows [r0, r0 + rows) of H (M x d bf16); the same outputs as task_avx512.
LTM_AMX void task_amx(const uint16_t* H, const uint16_t* W, const uint32_t* wt, const uint32_t* wv, const int64_t* tgt,
                      int64_t rows, int64_t d, int64_t V, bool want_dh, float* lse, float* row_nll, float* dh) {
  constexpr int64_t vb = kAmxVocab;
  const int64_t rp = (rows + 31) / 32 * 32;
  uint16_t* hp = scratch<uint16_t, 7>(rp * d);   // H rows, zero past `rows`
  float* l = scratch<float, 8>(rp * vb);         // one block's logits
  uint16_t* pb = scratch<uint16_t, 9>(rp * vb);  // P in bf16
  float* a = scratch<float, 10>(want_dh ? rp * d : 1);
  float* stat = scratch<float, 11>(3 * rp);
  float *m = stat, *s = stat + rp, *tl = stat + 2 * rp;
  std::memcpy(hp, H, rows * d * 2);
  std::memset(hp + rows * d, 0, (rp - rows) * d * 2);
  std::memset(pb, 0, rp * vb * 2);
  std::fill(m, m + rp, -std::numeric_limits<float>::infinity());
  std::fill(s, s + rp, 0.0f);
  std::fill(tl, tl + rp, 0.0f);
  if (want_dh) {
    std::fill(a, a + rp * d, 0.0f);
  }
  amx_begin();
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0, blk = 0; j0 < V; j0 += vb, ++blk) {
    const int64_t jb = std::min(vb, V - j0);
    const uint32_t* wtj = wt + blk * vb * d / 2;
    for (int64_t i = 0; i < rp; i += 32) {
      for (int64_t c = 0; c < vb; c += 32) {
        amx_block(d / 32, hp + i * d, d, wtj + c, vb, l + i * vb + c, vb, false);
      }
    }
    for (int64_t t = 0; t < rows; ++t) {
      float* lr = l + t * vb;
      const int64_t ct = tgt[t] - j0;
      if (ct >= 0 && ct < jb) {
        tl[t] = lr[ct];
      }
      __m512 vmx = ninf;
      for (int64_t c = 0; c < jb; c += 16) {
        const __mmask16 k = jb - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (jb - c)) - 1);
        vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(ninf, k, lr + c));
      }
      const float mx = std::max(m[t], hmax(vmx));
      const float sc = exp_softmax(m[t] - mx);
      const __m512 vm = _mm512_set1_ps(mx);
      __m512 sum = _mm512_setzero_ps();
      uint16_t* pr = pb + t * vb;
      for (int64_t c = 0; c < jb; c += 16) {
        const __mmask16 k = jb - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (jb - c)) - 1);
        const __m512 p = _mm512_maskz_mov_ps(k, exp_softmax16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, lr + c), vm)));
        sum = _mm512_add_ps(sum, p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c), (__m256i)_mm512_cvtneps_pbh(p));
      }
      s[t] = s[t] * sc + _mm512_reduce_add_ps(sum);
      m[t] = mx;
      if (want_dh && sc != 1.0f) {
        float* ar = a + t * d;
        for (int64_t k = 0; k < d; ++k) {
          ar[k] *= sc;
        }
      }
    }
    if (want_dh) {
      const uint32_t* wvj = wv + blk * vb * d / 2;
      for (int64_t i = 0; i < rp; i += 32) {
        for (int64_t c = 0; c < d; c += 32) {
          amx_block(vb / 32, pb + i * vb, vb, wvj + c, d, a + i * d + c, d, true);
        }
      }
    }
  }
  _tile_release();
  finish_rows(
      rows, d, m, s, tl, tgt, want_dh, lse, row_nll, dh, [&](int64_t t, int64_t k) { return a[t * d + k]; },
      [&](int64_t v, int64_t k) { return static_cast<float>(at::BFloat16(W[v * d + k], at::BFloat16::from_bits())); });
}

#undef LTM_AMX
#elif defined(__x86_64__)
bool amx_usable() { return false; }
#endif  // __x86_64__ && __linux__

// ----------------------------------------------------------------------------------------- bfloat16 entry

#if defined(__x86_64__)
enum class Bf16Engine { kAmx, kDot, kFloat };

// The bfloat16 engine for rows of width d. LTM_CPU_BF16_ENGINE (read once) is auto (the default), amx, dot or
// float: a named engine runs wherever this CPU and d allow it and the float conversion elsewhere, so the tests
// and benchmarks can run each engine the CPU has; auto takes AMX, else vdpbf16ps where it is the faster.
Bf16Engine bf16_engine(int64_t d) {
  static const std::string wanted = [] {
    const char* v = std::getenv("LTM_CPU_BF16_ENGINE");
    return std::string(v == nullptr ? "auto" : v);
  }();
  TORCH_CHECK(wanted == "auto" || wanted == "amx" || wanted == "dot" || wanted == "float",
              "LTM_CPU_BF16_ENGINE must be auto, amx, dot or float, got '", wanted, "'");
  if ((wanted == "auto" || wanted == "amx") && d % 32 == 0 && amx_usable()) {
    return Bf16Engine::kAmx;
  }
  if (d % 2 != 0 || !bf16_dot_usable()) {  // checked before bf16_dot_fast, which runs vdpbf16ps
    return Bf16Engine::kFloat;
  }
  return wanted == "dot" || (wanted == "auto" && bf16_dot_fast()) ? Bf16Engine::kDot : Bf16Engine::kFloat;
}

// bfloat16 on the AMX engine or the avx512 engine's Bf16Pairs kind (vdpbf16ps), both with fp32 accumulation;
// false for the float engine (other dtypes, other CPUs), and the caller converts to float.
bool lm_head_bf16(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, bool compute_grad,
                  at::Tensor& lse, at::Tensor& row_nll, at::Tensor& dh) {
  const int64_t d = hidden.size(2), V = weight.size(0), M = hidden.size(0) * hidden.size(1);
  if (hidden.scalar_type() != at::kBFloat16 || M == 0) {
    return false;
  }
  const Bf16Engine engine = bf16_engine(d);
  if (engine == Bf16Engine::kFloat) {
    return false;
  }
  const bool amx = engine == Bf16Engine::kAmx;
  const at::Tensor H = hidden.contiguous(), W = weight.contiguous(), tgt = targets.contiguous();
  const auto* h = reinterpret_cast<const uint16_t*>(H.data_ptr<at::BFloat16>());
  const auto* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const int64_t* t = tgt.data_ptr<int64_t>();
  float *l = lse.data_ptr<float>(), *nl = row_nll.data_ptr<float>();
  float* g = compute_grad ? dh.data_ptr<float>() : nullptr;
  // The packed weights live on the calling thread's grow-only buffers: the steps of an inner loop reuse them
  // (the workers only read them). The layout for the dh GEMM is packed only when dh is wanted.
  if (amx) {
#if defined(__linux__)
    const int64_t padded = (V + kPackedVocab - 1) / kPackedVocab * kPackedVocab;
    uint32_t* wv = compute_grad ? scratch<uint32_t, 12>(padded * d / 2) : nullptr;
    if (compute_grad) {
      pack_vocab_pairs(w, V, d, padded, wv);
    }
    uint32_t* wt = scratch<uint32_t, 14>(padded * d / 2);
    pack_amx_columns(w, V, d, wt);
    for_each_task(M, task_rows(M, kAmxRows), [&](int64_t r0, int64_t rows) {
      task_amx(h + r0 * d, w, wt, wv, t + r0, rows, d, V, compute_grad, l + r0, nl + r0,
               g == nullptr ? nullptr : g + r0 * d);
    });
#endif
  } else {
    const Plan plan = choose_plan<float>(M, d);
    // A block's vocabulary pairs start at a whole 12-pair chunk of the dh layout.
    const int64_t vocab_block = std::max<int64_t>(plan.vocab_block / (2 * kTileRows), 1) * 2 * kTileRows;
    const int64_t dk = d / 2, pairs = (V + 1) / 2;
    const auto* h2 = reinterpret_cast<const uint32_t*>(h);
    const auto* w2 = reinterpret_cast<const uint32_t*>(w);
    uint32_t* wl = scratch<uint32_t, 14>(whole_tiles(V) * dk);  // W's rows as pairs along d
    pack_tiles(V, dk, [&](int64_t v, int64_t k) { return w2[v * dk + k]; }, wl);
    uint32_t* wd =
        compute_grad ? scratch<uint32_t, 12>(whole_tiles(pairs) * d) : nullptr;  // W paired along the vocabulary
    if (compute_grad) {
      pack_tiles(pairs, d, [&](int64_t q, int64_t k) { return vocab_pair(w, V, d, q, k); }, wd);
    }
    for_each_task(M, plan.rows_per_task, [&](int64_t r0, int64_t rows) {
      task_avx512<Bf16Pairs>(h2 + r0 * dk, packed_logits_operand(wl, dk), packed_dh_operand(wd, d), w2, t + r0, rows, d,
                             V, vocab_block, compute_grad, l + r0, nl + r0, g == nullptr ? nullptr : g + r0 * d);
    });
  }
  return true;
}
#else
bool lm_head_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, at::Tensor&, at::Tensor&,
                  at::Tensor&) {
  return false;
}
#endif  // __x86_64__

// ------------------------------------------------------------------------------------------- blas engine

inline float exp_impl(float x) { return exp_softmax(x); }
inline double exp_impl(double x) { return std::exp(x); }

template <typename T>
void task_blas(const T* H, const T* W, const int64_t* tgt, int64_t rows, int64_t d, int64_t V, int64_t vb, bool want_dh,
               T* lse, T* row_nll, T* dh) {
  T* l = scratch<T, 4>(rows * vb);
  T* a = want_dh ? dh : nullptr;  // a accumulates in dh's rows directly
  T* stat = scratch<T, 5>(3 * rows);
  T *m = stat, *s = stat + rows, *tl = stat + 2 * rows;
  std::fill(m, m + rows, -std::numeric_limits<T>::infinity());
  std::fill(s, s + rows, T(0));
  std::fill(tl, tl + rows, T(0));
  if (want_dh) {
    std::fill(a, a + rows * d, T(0));
  }
  for (int64_t j0 = 0; j0 < V; j0 += vb) {
    const int64_t jb = std::min(vb, V - j0);
    const T* Wj = W + j0 * d;
    gemm<T>(false, true, rows, jb, d, T(1), H, d, Wj, d, T(0), l, jb);  // l = H W_j^T
    for (int64_t r = 0; r < rows; ++r) {
      T* lr = l + r * jb;
      const int64_t c = tgt[r] - j0;
      if (c >= 0 && c < jb) {
        tl[r] = lr[c];
      }
      T mx = m[r];
      for (int64_t j = 0; j < jb; ++j) {
        mx = lr[j] > mx ? lr[j] : mx;
      }
      const T sc = exp_impl(m[r] - mx);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < jb; ++j) {
        const T p = exp_impl(lr[j] - mx);
        lr[j] = p;
        sum += p;
      }
      s[r] = s[r] * sc + sum;
      m[r] = mx;
      if (want_dh && sc != T(1)) {
        T* ar = a + r * d;
        for (int64_t k = 0; k < d; ++k) {
          ar[k] *= sc;
        }
      }
    }
    if (want_dh) {
      gemm<T>(false, false, rows, d, jb, T(1), l, jb, Wj, d, T(1), a, d);  // a += P W_j
    }
  }
  finish_rows(
      rows, d, m, s, tl, tgt, want_dh, lse, row_nll, dh, [&](int64_t t, int64_t c) { return a[t * d + c]; },
      [&](int64_t v, int64_t c) { return W[v * d + c]; });
}

template <typename T>
// packed: the tile-packed weight for the avx512 engine (pack_weight), else null.
void run_task(const Plan& plan, const T* H, const T* W, const T* packed, const int64_t* tgt, int64_t rows, int64_t d,
              int64_t V, bool want_dh, T* lse, T* row_nll, T* dh) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (plan.engine == Engine::kAvx512) {
      task_avx512<F32>(H, packed_logits_operand(packed, d), packed_dh_operand(packed, d), W, tgt, rows, d, V,
                       plan.vocab_block, want_dh, lse, row_nll, dh);
      return;
    }
  }
#endif
  task_blas<T>(H, W, tgt, rows, d, V, plan.vocab_block, want_dh, lse, row_nll, dh);
}

// The avx512 engine's tile-packed copy of the weight, on the calling thread's grow-only buffer (the steps of an
// inner loop reuse it; the workers only read it), packed once per call; null for the other engines.
template <typename T>
const T* pack_weight(const Plan& plan, const T* W, int64_t V, int64_t d) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (plan.engine == Engine::kAvx512) {
      float* packed = scratch<float, 15>(whole_tiles(V) * d);
      pack_tiles(V, d, [&](int64_t v, int64_t k) { return W[v * d + k]; }, packed);
      return packed;
    }
  }
#endif
  return nullptr;
}

// ----------------------------------------------------------------------------------------------- checks

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.dim() == 3, "lm_head_nll: hidden must be (B, N, d), got ", hidden.dim(), " dimensions");
  TORCH_CHECK(weight.dim() == 2, "lm_head_nll: weight must be (V, d), got ", weight.dim(), " dimensions");
  TORCH_CHECK(weight.size(1) == hidden.size(2), "lm_head_nll: weight is (V, ", weight.size(1),
              ") but hidden has d = ", hidden.size(2));
  TORCH_CHECK(weight.size(0) >= 1, "lm_head_nll: weight must have at least one row (V >= 1)");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "lm_head_nll: hidden (", hidden.scalar_type(),
              ") and weight (", weight.scalar_type(), ") must have one dtype");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "lm_head_nll: hidden must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(targets.scalar_type() == at::kLong, "lm_head_nll: targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == hidden.size(0) && targets.size(1) == hidden.size(1),
              "lm_head_nll: targets must be (B, N) = (", hidden.size(0), ", ", hidden.size(1), "), got ",
              targets.sizes());
  for (const auto* t : {&hidden, &weight, &targets}) {
    TORCH_CHECK(t->device().is_cpu(), "lm_head_nll: the C++ kernel takes CPU tensors, got one on ", t->device());
  }
  if (targets.numel() > 0) {
    const int64_t lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < weight.size(0), "lm_head_nll: targets must be in [0, V = ", weight.size(0),
                ") or -1 (ignored), got values in [", lo, ", ", hi, "]");
  }
}

// --------------------------------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_nll_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                               const at::Tensor& targets, bool compute_grad) {
  check_inputs(hidden, weight, targets);
  const auto ct = compute_type(hidden.scalar_type());
  const int64_t B = hidden.size(0), N = hidden.size(1), d = hidden.size(2), V = weight.size(0), M = B * N;
  const auto opts = hidden.options().dtype(ct);
  at::Tensor lse = at::empty({M}, opts);
  at::Tensor row_nll = at::empty({M}, opts);
  at::Tensor dh = compute_grad ? at::empty({B, N, d}, opts) : at::empty({0}, opts);
  if (M > 0 && !lm_head_bf16(hidden, weight, targets, compute_grad, lse, row_nll, dh)) {
    const at::Tensor H = hidden.to(ct).contiguous();
    const at::Tensor W = weight.to(ct).contiguous();
    const at::Tensor tgt = targets.contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "lm_head_nll", [&] {
      const Plan plan = choose_plan<scalar_t>(M, d);
      const scalar_t* h = H.data_ptr<scalar_t>();
      const scalar_t* w = W.data_ptr<scalar_t>();
      const int64_t* t = tgt.data_ptr<int64_t>();
      scalar_t* l = lse.data_ptr<scalar_t>();
      scalar_t* nl = row_nll.data_ptr<scalar_t>();
      scalar_t* g = compute_grad ? dh.data_ptr<scalar_t>() : nullptr;
      const scalar_t* packed = pack_weight(plan, w, V, d);
      for_each_task(M, plan.rows_per_task, [&](int64_t r0, int64_t rows) {
        run_task(plan, h + r0 * d, w, packed, t + r0, rows, d, V, compute_grad, l + r0, nl + r0,
                 g == nullptr ? nullptr : g + r0 * d);
      });
    });
  }
  // Summed per sequence here, after the tasks: a fixed order, so the result does not depend on the threads.
  at::Tensor nll = row_nll.view({B, N}).sum(1);
  return {nll, lse, dh};
}

// dW = sum over rows of g_b (softmax(l) - onehot(target))^T h, from the saved lse; one task per vocab block.
template <typename T>
void weight_gradient(const T* H, const T* W, const int64_t* tgt, const T* lse, const T* grad, int64_t N, int64_t M,
                     int64_t d, int64_t V, T* dW) {
  constexpr int64_t kVocab = 256, kRows = 256;
  const int64_t tasks = (V + kVocab - 1) / kVocab;
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    T* p = scratch<T, 6>(kRows * kVocab);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t j0 = task * kVocab, jb = std::min(kVocab, V - j0);
      for (int64_t r0 = 0; r0 < M; r0 += kRows) {
        const int64_t rows = std::min(kRows, M - r0);
        gemm<T>(false, true, rows, jb, d, T(1), H + r0 * d, d, W + j0 * d, d, T(0), p, jb);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = r0 + r;
          T* pr = p + r * jb;
          if (tgt[row] < 0) {
            std::fill(pr, pr + jb, T(0));
            continue;
          }
          const T g = grad[row / N], shift = lse[row];
          for (int64_t j = 0; j < jb; ++j) {
            pr[j] = g * exp_impl(pr[j] - shift);
          }
          const int64_t c = tgt[row] - j0;
          if (c >= 0 && c < jb) {
            pr[c] -= g;
          }
        }
        gemm<T>(true, false, jb, d, rows, T(1), p, jb, H + r0 * d, d, r0 == 0 ? T(0) : T(1), dW + j0 * d, d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lm_head_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& hidden,
                                                            const at::Tensor& weight, const at::Tensor& targets,
                                                            const at::Tensor& lse, const at::Tensor& dh,
                                                            bool hidden_grad, bool weight_grad) {
  check_inputs(hidden, weight, targets);
  const auto ct = compute_type(hidden.scalar_type());
  const int64_t B = hidden.size(0), N = hidden.size(1), d = hidden.size(2), V = weight.size(0), M = B * N;
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B, "lm_head_nll_backward: grad must be (B,) = (", B, "), got ",
              grad.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == M, "lm_head_nll_backward: lse must be (B * N,) = (", M, "), got ",
              lse.sizes());
  const at::Tensor g = grad.to(ct).contiguous();
  at::Tensor grad_hidden = at::empty({0}, hidden.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  if (hidden_grad) {
    TORCH_CHECK(dh.dim() == 3 && dh.size(0) == B && dh.size(1) == N && dh.size(2) == d,
                "lm_head_nll_backward: hidden_grad needs the forward's dh (B, N, d): call lm_head_nll with "
                "compute_grad=True");
    grad_hidden = (dh * g.view({B, 1, 1})).to(hidden.scalar_type());
  }
  if (weight_grad) {
    const at::Tensor H = hidden.to(ct).contiguous(), W = weight.to(ct).contiguous();
    const at::Tensor tgt = targets.contiguous(), l = lse.to(ct).contiguous();
    at::Tensor dW = at::empty({V, d}, H.options());
    if (M == 0) {
      dW.zero_();
    } else {
      AT_DISPATCH_FLOATING_TYPES(ct, "lm_head_nll_backward", [&] {
        weight_gradient<scalar_t>(H.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), tgt.data_ptr<int64_t>(),
                                  l.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), N, M, d, V, dW.data_ptr<scalar_t>());
      });
    }
    grad_weight = dW.to(weight.scalar_type());
  }
  return {grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltm, CPU, m) {
  m.impl("lm_head_nll", &lm_head_nll_cpu);
  m.impl("lm_head_nll_backward", &lm_head_nll_backward_cpu);
}

}  // namespace ltm

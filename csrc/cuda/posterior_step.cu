// CUDA kernel of ltm::posterior_step (schema in ../ltm_ops.cpp; math in ltm_kernels/posterior_step_cpp.py, eager
// reference in ltm_kernels/reference.py; schedule, AdamW and input checks shared with the CPU kernel through
// ../posterior_step.h).
//
// One kernel per step, memory-bound: per element it reads 8 values and writes 7 (60 bytes in fp32). Each
// thread moves 16 bytes per tensor per access (4 floats, 8 halves, 2 doubles) when every pointer is 16-byte
// aligned, one element at a time otherwise; the ragged end is done element by element.
//
// The step counter lives on the device, so that a CUDA graph can replay the step T times: each block reads
// it once (thread 0), computes the scheduled lr and AdamW's bias corrections in double, and shares them
// through shared memory. Incrementing it needs care, since blocks of one launch run in any order: a block that
// wrote t + 1 before another block read t would give that block the wrong step. So every block reads the
// counter with an atomicAdd of 2^32 (a ticket in the high 32 bits; the count is the low 32), and the block
// that draws the last ticket, which knows every block has read, writes t + 1 and clears the tickets. Between
// launches the counter therefore holds exactly the number of updates done (count < 2^32).
//
// Launched on the current stream (at::cuda::getCurrentCUDAStream is c10::cuda::getCurrentCUDAStream; we use
// the c10 header, which needs no cuBLAS headers at build time): on any other stream a CUDA graph capture
// or torch.compile's reduce-overhead mode would silently miss or misorder the kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <new>

#include "../posterior_step.h"

namespace ltm {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535;  // grid-stride beyond this: plenty of blocks to fill any GPU

template <typename scalar_t>
struct Ptrs {
  scalar_t *mu, *lv, *m_mu, *v_mu, *m_lv, *v_lv, *z;
  const scalar_t *g, *e;
};

// kVec elements of one tensor, loaded or stored as one 16-byte access when kVec * sizeof(scalar_t) == 16.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ Pack<scalar_t, kVec> load(const scalar_t* p, int64_t i) {
  return reinterpret_cast<const Pack<scalar_t, kVec>*>(p)[i];
}

template <typename scalar_t, int kVec>
__device__ __forceinline__ void store(scalar_t* p, int64_t i, const Pack<scalar_t, kVec>& x) {
  reinterpret_cast<Pack<scalar_t, kVec>*>(p)[i] = x;
}

// Elements [i * kVec, (i + 1) * kVec): the math of the CPU loop, element for element.
template <typename scalar_t, int kVec, bool kLerpFromM>
__device__ __forceinline__ void update(const Ptrs<scalar_t>& p, int64_t i, const AdamW<at::opmath_type<scalar_t>>& a) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t half(0.5), one(1);
  // All loads first: 8 independent 16-byte loads in flight per thread.
  const auto mu = load<scalar_t, kVec>(p.mu, i), lv = load<scalar_t, kVec>(p.lv, i);
  const auto m_mu = load<scalar_t, kVec>(p.m_mu, i), v_mu = load<scalar_t, kVec>(p.v_mu, i);
  const auto m_lv = load<scalar_t, kVec>(p.m_lv, i), v_lv = load<scalar_t, kVec>(p.v_lv, i);
  const auto g = load<scalar_t, kVec>(p.g, i), e = load<scalar_t, kVec>(p.e, i);
  Pack<scalar_t, kVec> o_mu, o_lv, o_m_mu, o_v_mu, o_m_lv, o_v_lv, o_z;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const opmath_t mu_k = mu.v[k], lv_k = lv.v[k], g_k = g.v[k], e_k = e.v[k];
    // Gradients at the old (mu, logvar): CE through z = mu + e * sigma, plus the analytic KL.
    const opmath_t sigma = exp(half * lv_k);
    const opmath_t g_mu = g_k + mu_k;
    const opmath_t g_lv = half * g_k * e_k * sigma + half * (sigma * sigma - one);
    const auto mu_upd = adamw_update<kLerpFromM, opmath_t>(a, mu_k, g_mu, m_mu.v[k], v_mu.v[k]);
    const auto lv_upd = adamw_update<kLerpFromM, opmath_t>(a, lv_k, g_lv, m_lv.v[k], v_lv.v[k]);
    o_mu.v[k] = static_cast<scalar_t>(mu_upd.p);
    o_lv.v[k] = static_cast<scalar_t>(lv_upd.p);
    o_m_mu.v[k] = static_cast<scalar_t>(mu_upd.m);
    o_v_mu.v[k] = static_cast<scalar_t>(mu_upd.v);
    o_m_lv.v[k] = static_cast<scalar_t>(lv_upd.m);
    o_v_lv.v[k] = static_cast<scalar_t>(lv_upd.v);
    // From the stored (rounded) parameters, so z is exactly the sample of what the caller holds.
    o_z.v[k] =
        static_cast<scalar_t>(static_cast<opmath_t>(o_mu.v[k]) + e_k * exp(half * static_cast<opmath_t>(o_lv.v[k])));
  }
  store(p.mu, i, o_mu);
  store(p.lv, i, o_lv);
  store(p.m_mu, i, o_m_mu);
  store(p.v_mu, i, o_v_mu);
  store(p.m_lv, i, o_m_lv);
  store(p.v_lv, i, o_v_lv);
  store(p.z, i, o_z);
}

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t total_steps, schedule;
};

// n elements; with kVec > 1 all pointers are 16-byte aligned and the first (n / kVec) * kVec elements go
// as packs, the rest one by one.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    posterior_step_kernel(Ptrs<scalar_t> p, int64_t n, unsigned long long* step, Hyper h) {
  using opmath_t = at::opmath_type<scalar_t>;
  // Thread 0 takes the block's ticket and builds the step's scalars (lr, bias corrections: a few double ops);
  // the others copy them from shared memory. Raw storage: __shared__ variables cannot have constructors.
  __shared__ __align__(16) unsigned char adamw_raw[sizeof(AdamW<opmath_t>)];
  if (threadIdx.x == 0) {
    const unsigned long long old = atomicAdd(step, 1ull << 32);
    const int64_t t = static_cast<int64_t>(old & 0xffffffffull);
    if ((old >> 32) == gridDim.x - 1) {
      *step = static_cast<unsigned long long>(t + 1);  // last block to read: publish, clear the tickets
    }
    new (adamw_raw) AdamW<opmath_t>(scheduled_lr(t, h.total_steps, h.lr, h.schedule), t + 1, h.beta1, h.beta2, h.eps,
                                    h.weight_decay);
  }
  __syncthreads();
  const AdamW<opmath_t> a = *reinterpret_cast<const AdamW<opmath_t>*>(adamw_raw);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / kVec;
  const bool lerp_from_m = a.lerp_from_m();  // uniform across the grid: no divergence
  for (int64_t i = first; i < packs; i += stride) {
    if (lerp_from_m) {
      update<scalar_t, kVec, true>(p, i, a);
    } else {
      update<scalar_t, kVec, false>(p, i, a);
    }
  }
  for (int64_t i = packs * kVec + first; i < n; i += stride) {
    if (lerp_from_m) {
      update<scalar_t, 1, true>(p, i, a);
    } else {
      update<scalar_t, 1, false>(p, i, a);
    }
  }
}

template <typename scalar_t, int kVec>
void launch(const Ptrs<scalar_t>& p, int64_t n, at::Tensor& step, const Hyper& h, cudaStream_t stream) {
  const int64_t items = std::max<int64_t>(n / kVec, 1);  // at least one block: the counter must advance
  const int blocks = static_cast<int>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
  auto* counter = reinterpret_cast<unsigned long long*>(step.mutable_data_ptr<int64_t>());
  posterior_step_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(p, n, counter, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void posterior_step_cuda(at::Tensor& mu, at::Tensor& logvar, at::Tensor& exp_avg_mu, at::Tensor& exp_avg_sq_mu,
                         at::Tensor& exp_avg_logvar, at::Tensor& exp_avg_sq_logvar, at::Tensor& z,
                         const at::Tensor& grad_z, const at::Tensor& noise, at::Tensor& step, double lr,
                         int64_t total_steps, int64_t schedule, double beta1, double beta2, double eps,
                         double weight_decay) {
  const std::array<const at::Tensor*, 9> ts = {
      &mu, &logvar, &exp_avg_mu, &exp_avg_sq_mu, &exp_avg_logvar, &exp_avg_sq_logvar, &z, &grad_z, &noise};
  const at::Tensor g = grad_z.contiguous();
  const at::Tensor e = noise.contiguous();
  check_posterior_step_inputs(ts, {&g, &e}, step, lr, total_steps, schedule, beta1, beta2, eps, weight_decay);
  const c10::cuda::CUDAGuard guard(mu.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(mu.device().index()).stream();
  const Hyper h{lr, beta1, beta2, eps, weight_decay, total_steps, schedule};
  const int64_t n = mu.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), "posterior_step_cuda", [&] {
    const Ptrs<scalar_t> p = {mu.mutable_data_ptr<scalar_t>(),
                              logvar.mutable_data_ptr<scalar_t>(),
                              exp_avg_mu.mutable_data_ptr<scalar_t>(),
                              exp_avg_sq_mu.mutable_data_ptr<scalar_t>(),
                              exp_avg_logvar.mutable_data_ptr<scalar_t>(),
                              exp_avg_sq_logvar.mutable_data_ptr<scalar_t>(),
                              z.mutable_data_ptr<scalar_t>(),
                              g.const_data_ptr<scalar_t>(),
                              e.const_data_ptr<scalar_t>()};
    const bool vec = aligned16(p.mu) && aligned16(p.lv) && aligned16(p.m_mu) && aligned16(p.v_mu) &&
                     aligned16(p.m_lv) && aligned16(p.v_lv) && aligned16(p.z) && aligned16(p.g) && aligned16(p.e);
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec) {
      launch<scalar_t, kVec>(p, n, step, h, stream);
    } else {
      launch<scalar_t, 1>(p, n, step, h, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ltm, CUDA, m) { m.impl("posterior_step", &posterior_step_cuda); }

}  // namespace ltm

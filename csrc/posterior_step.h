// What the CPU (posterior_step.cpp) and CUDA (cuda/posterior_step.cu) kernels of ltm::posterior_step share:
// the input checks, the learning-rate schedule and the AdamW update. One definition, so that both devices
// compute the same function; C10_HOST_DEVICE is empty for the host compiler.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <cstdint>

namespace ltm {

// The op's `schedule` argument: the index into ltm_kernels.reference.SCHEDULES.
enum Schedule : int64_t { kCosine = 0, kLinear = 1, kConstant = 2 };

// Learning rate of update t (0-based) of `total`, lr_min = lr / 10, in double and in the operation order of
// ltm_kernels.reference.scheduled_lr, so that host and device agree with the reference to rounding.
C10_HOST_DEVICE inline double scheduled_lr(int64_t t, int64_t total, double lr, int64_t schedule) {
  const double lr_min = lr / 10;
  const double td = static_cast<double>(t), total_d = static_cast<double>(total);
  if (schedule == kCosine) {
    constexpr double kPi = 3.141592653589793;  // math.pi
    return lr_min + 0.5 * (1.0 + std::cos(kPi * td / total_d)) * (lr - lr_min);
  }
  if (schedule == kLinear) {
    return lr - (lr - lr_min) * td / total_d;
  }
  return lr;
}

// AdamW with the op order of torch.optim.AdamW's single-tensor path, so that both agree to rounding.
// Scalars are combined in double (as Python does there) and rounded once to the compute type.
template <typename opmath_t>
struct AdamW {
  opmath_t decay, lerp_w, one_minus_lerp_w, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps;

  C10_HOST_DEVICE AdamW(double lr, int64_t step, double beta1, double beta2_, double eps_, double weight_decay)
      : decay(1.0 - lr * weight_decay),
        lerp_w(1.0 - beta1),
        one_minus_lerp_w(opmath_t(1) - lerp_w),
        beta2(beta2_),
        one_minus_beta2(1.0 - beta2_),
        neg_step_size(-(lr / (1.0 - std::pow(beta1, static_cast<double>(step))))),
        bias_correction2_sqrt(std::sqrt(1.0 - std::pow(beta2_, static_cast<double>(step)))),
        eps(eps_) {}

  // Which of torch.lerp's two formulas exp_avg.lerp_(grad, 1 - beta1) takes (it picks by weight < 0.5);
  // a template argument of the loops, so that no per-element select on it is needed.
  C10_HOST_DEVICE bool lerp_from_m() const { return lerp_w < opmath_t(0.5); }
};

template <typename opmath_t>
struct AdamWResult {
  opmath_t p, m, v;
};

// One AdamW update of parameter p with gradient g and moments (m, v). By value, so that it inlines into
// the SIMD loop as plain arithmetic.
template <bool kLerpFromM, typename opmath_t>
C10_HOST_DEVICE inline AdamWResult<opmath_t> adamw_update(const AdamW<opmath_t>& a, opmath_t p, opmath_t g, opmath_t m,
                                                          opmath_t v) {
  p = p * a.decay;
  m = kLerpFromM ? m + a.lerp_w * (g - m) : g - (g - m) * a.one_minus_lerp_w;
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
  const opmath_t denom = std::sqrt(v) / a.bias_correction2_sqrt + a.eps;
  return {p + a.neg_step_size * m / denom, m, v};
}

// The checks every device's kernel makes before touching memory (shapes, dtypes, devices, contiguity,
// aliasing, the step counter's form, the hyper-parameters); TORCH_CHECK errors naming the argument.
// `inputs` are grad_z and noise after .contiguous(). The step counter's value is checked where it is free
// to read (CPU), never on CUDA (that would stall the host).
void check_posterior_step_inputs(const std::array<const at::Tensor*, 9>& ts,
                                 const std::array<const at::Tensor*, 2>& inputs, const at::Tensor& step, double lr,
                                 int64_t total_steps, int64_t schedule, double beta1, double beta2, double eps,
                                 double weight_decay);

}  // namespace ltm

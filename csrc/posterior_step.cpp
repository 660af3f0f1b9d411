// CPU kernel of ltm::posterior_step (schema in ltm_ops.cpp, math and reference in
// ltm_kernels/posterior_step.py and ltm_kernels/reference.py).
//
// One pass over memory: per element it reads 8 values (mu, logvar, 4 moments, grad_z, noise) and writes 7
// (mu, logvar, 4 moments, z), where the eager version makes ~30 full-tensor passes. Plain loops, not SIMD:
// the two scalar expf calls per element keep the compiler from vectorising, so on CPUs where torch's eager
// exp runs on AVX2/AVX-512 (Sleef) this kernel is slower than eager (~1.4x on a 2-core AVX-512 EPYC). On
// the CPU shapes of DESIGN.md section 5 the op costs well under a millisecond either way.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>

namespace ltm {
namespace {

// Elements per task: large enough to amortise scheduling, small enough to split (B, n_z, d) across threads.
constexpr int64_t kGrainSize = 2048;

constexpr int kNumMutable = 7;
constexpr std::array<const char*, 9> kNames = {
    "mu", "logvar", "exp_avg_mu", "exp_avg_sq_mu", "exp_avg_logvar", "exp_avg_sq_logvar", "z",
    "grad_z", "noise"};

void check_inputs(const std::array<const at::Tensor*, 9>& ts, double lr, int64_t step, double beta1,
                  double beta2, double eps, double weight_decay) {
  const at::Tensor& mu = *ts[0];
  for (size_t i = 1; i < ts.size(); ++i) {
    const at::Tensor& t = *ts[i];
    TORCH_CHECK(t.sizes() == mu.sizes(), "posterior_step: ", kNames[i], " must have the shape of mu ",
                mu.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == mu.scalar_type(), "posterior_step: ", kNames[i],
                " must have the dtype of mu (", mu.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == mu.device(), "posterior_step: ", kNames[i],
                " must be on the device of mu (", mu.device(), "), got ", t.device());
  }
  const auto dtype = mu.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "posterior_step: mu must be float32, float64, bfloat16 or float16, got ", dtype);
  for (int i = 0; i < kNumMutable; ++i) {
    TORCH_CHECK(ts[i]->is_contiguous(), "posterior_step: ", kNames[i], " must be contiguous");
  }
  // Updated in place element by element: two outputs sharing memory would silently mix their values.
  for (int i = 0; i < kNumMutable; ++i) {
    for (int j = i + 1; j < kNumMutable; ++j) {
      TORCH_CHECK(at::get_overlap_status(*ts[i], *ts[j]) == at::MemOverlapStatus::No, "posterior_step: ",
                  kNames[i], " and ", kNames[j], " must not share memory");
    }
  }
  TORCH_CHECK(step >= 1, "posterior_step: step must be >= 1 (the 1-based count of updates), got ", step);
  TORCH_CHECK(lr >= 0, "posterior_step: lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "posterior_step: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "posterior_step: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps > 0, "posterior_step: eps must be > 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0, "posterior_step: weight_decay must be >= 0, got ", weight_decay);
}

// AdamW with the op order of torch.optim.AdamW's single-tensor path, so that both agree to rounding.
// Scalars are combined in double (as Python does there) and rounded once to the compute type.
template <typename opmath_t>
struct AdamW {
  opmath_t decay, lerp_w, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps;

  AdamW(double lr, int64_t step, double beta1, double beta2_, double eps_, double weight_decay)
      : decay(1.0 - lr * weight_decay),
        lerp_w(1.0 - beta1),
        beta2(beta2_),
        one_minus_beta2(1.0 - beta2_),
        neg_step_size(-(lr / (1.0 - std::pow(beta1, static_cast<double>(step))))),
        bias_correction2_sqrt(std::sqrt(1.0 - std::pow(beta2_, static_cast<double>(step)))),
        eps(eps_) {}

  // Returns the new parameter; m and v are updated in place.
  inline opmath_t update(opmath_t p, opmath_t g, opmath_t& m, opmath_t& v) const {
    p = p * decay;
    // torch.lerp's two branches, for its rounding.
    m = lerp_w < opmath_t(0.5) ? m + lerp_w * (g - m) : g - (g - m) * (opmath_t(1) - lerp_w);
    v = v * beta2 + one_minus_beta2 * g * g;
    const opmath_t denom = std::sqrt(v) / bias_correction2_sqrt + eps;
    return p + neg_step_size * m / denom;
  }
};

template <typename scalar_t>
void posterior_step_impl(const std::array<const at::Tensor*, 9>& ts, const at::Tensor& grad_z,
                         const at::Tensor& noise, double lr, int64_t step, double beta1, double beta2,
                         double eps, double weight_decay) {
  // bf16 / fp16 / fp32 compute in float, fp64 in double; loads and stores stay in the tensor's dtype.
  using opmath_t = at::opmath_type<scalar_t>;
  const AdamW<opmath_t> adamw(lr, step, beta1, beta2, eps, weight_decay);
  const opmath_t half(0.5), one(1);

  scalar_t* mu_p = ts[0]->mutable_data_ptr<scalar_t>();
  scalar_t* lv_p = ts[1]->mutable_data_ptr<scalar_t>();
  scalar_t* m_mu_p = ts[2]->mutable_data_ptr<scalar_t>();
  scalar_t* v_mu_p = ts[3]->mutable_data_ptr<scalar_t>();
  scalar_t* m_lv_p = ts[4]->mutable_data_ptr<scalar_t>();
  scalar_t* v_lv_p = ts[5]->mutable_data_ptr<scalar_t>();
  scalar_t* z_p = ts[6]->mutable_data_ptr<scalar_t>();
  const scalar_t* g_p = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* e_p = noise.const_data_ptr<scalar_t>();

  at::parallel_for(0, ts[0]->numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const opmath_t mu = mu_p[i], lv = lv_p[i], g = g_p[i], e = e_p[i];
      // Gradients at the old (mu, logvar): CE through z = mu + e * sigma, plus the analytic KL.
      // exp(logvar) as sigma^2: the scalar exp calls are what this loop spends its time on.
      const opmath_t sigma = std::exp(half * lv);
      const opmath_t g_mu = g + mu;
      const opmath_t g_lv = half * g * e * sigma + half * (sigma * sigma - one);

      opmath_t m_mu = m_mu_p[i], v_mu = v_mu_p[i], m_lv = m_lv_p[i], v_lv = v_lv_p[i];
      const scalar_t mu_new = static_cast<scalar_t>(adamw.update(mu, g_mu, m_mu, v_mu));
      const scalar_t lv_new = static_cast<scalar_t>(adamw.update(lv, g_lv, m_lv, v_lv));
      mu_p[i] = mu_new;
      lv_p[i] = lv_new;
      m_mu_p[i] = static_cast<scalar_t>(m_mu);
      v_mu_p[i] = static_cast<scalar_t>(v_mu);
      m_lv_p[i] = static_cast<scalar_t>(m_lv);
      v_lv_p[i] = static_cast<scalar_t>(v_lv);
      // From the stored (rounded) parameters, so z is exactly the sample of what the caller holds.
      z_p[i] = static_cast<scalar_t>(static_cast<opmath_t>(mu_new) +
                                     e * std::exp(half * static_cast<opmath_t>(lv_new)));
    }
  });
}

void posterior_step_cpu(at::Tensor& mu, at::Tensor& logvar, at::Tensor& exp_avg_mu, at::Tensor& exp_avg_sq_mu,
                        at::Tensor& exp_avg_logvar, at::Tensor& exp_avg_sq_logvar, at::Tensor& z,
                        const at::Tensor& grad_z, const at::Tensor& noise, double lr, int64_t step, double beta1,
                        double beta2, double eps, double weight_decay) {
  const std::array<const at::Tensor*, 9> ts = {&mu, &logvar, &exp_avg_mu, &exp_avg_sq_mu, &exp_avg_logvar,
                                               &exp_avg_sq_logvar, &z, &grad_z, &noise};
  check_inputs(ts, lr, step, beta1, beta2, eps, weight_decay);
  // Read-only inputs may be strided views (e.g. a transposed gradient); the kernel indexes them flat.
  const at::Tensor g = grad_z.contiguous();
  const at::Tensor e = noise.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), "posterior_step_cpu", [&] {
    posterior_step_impl<scalar_t>(ts, g, e, lr, step, beta1, beta2, eps, weight_decay);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ltm, CPU, m) {
  m.impl("posterior_step", &posterior_step_cpu);
}

}  // namespace ltm

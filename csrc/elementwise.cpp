// CPU kernels of the model's elementwise ops, forward and backward, each one pass over its tensors (schemas in
// ltm_ops.cpp; autograd, fake kernels and functionals in ltm_kernels/elementwise_cpp.py; the eager definitions
// are reference.rms_norm_ref, add_rms_norm_ref and swiglu_ref):
//   ltm::rms_norm   h = x (+ residual),  rstd = 1 / sqrt(mean(h^2) + eps),  y = (h rstd) w      per row of d
//   ltm::swiglu     out = silu(g) u = g sigmoid(g) u
// Backward, with n = h rstd and dn = dy w:
//   dh = rstd (dn - n mean(dn n)) (+ the gradient arriving at the h output),  dw = sum over rows of dy n
//   dg = dout u sigmoid(g) (1 + g (1 - sigmoid(g))),  du = dout silu(g)
// Why: eager runs RMSNorm as six ATen kernels forward and about ten backward, each a pass over (rows, d) in
// memory, and SwiGLU as two forward and five backward; in the inner loop they were a fifth of a step's time.
// Compute in float (double for double); bfloat16 / float16 are read and written in their own dtype. The float
// loops are compiled for the x86-64 baseline, AVX2 and AVX-512 and picked by cpu_isa(), like attention.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "vectorisable_exp.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

namespace ltm {
namespace {

inline float exp_impl(float x) { return exp_vectorisable(x); }
inline double exp_impl(double x) { return std::exp(x); }

template <typename A>
inline A sigmoid(A g) {
  return A(1) / (A(1) + exp_impl(-g));
}

// bfloat16 <-> float by bit operations (round to nearest even, NaN kept): c10's conversion branches on NaN,
// which keeps the loops below from vectorising.
template <typename T>
inline at::opmath_type<T> to_acc(T v) {
  return static_cast<at::opmath_type<T>>(v);
}
inline float to_acc(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
template <typename T>
inline T from_acc(at::opmath_type<T> v) {
  return static_cast<T>(v);
}
template <>
inline at::BFloat16 from_acc<at::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = v != v ? 0x7FC00000u : bits + 0x7FFFu + ((bits >> 16) & 1u);
  return at::BFloat16(static_cast<uint16_t>(bits >> 16), at::BFloat16::from_bits());
}

// ------------------------------------------------------------------------------------------ row kernels

template <typename T>
struct RmsArgs {
  const T *x, *residual, *w;
  T *y, *h;
  at::opmath_type<T>* rstd;
  int64_t d;
  double eps;
};

template <typename T>
inline void rms_norm_rows(const RmsArgs<T>& a, int64_t r0, int64_t r1) {
  using A = at::opmath_type<T>;
  const int64_t d = a.d;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = a.x + r * d;
    T* h = a.h + r * d;
    A ss = 0;
    if (a.residual != nullptr) {
      const T* res = a.residual + r * d;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        const T hv = from_acc<T>(to_acc(x[i]) + to_acc(res[i]));
        h[i] = hv;
        ss += to_acc(hv) * to_acc(hv);
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        ss += to_acc(x[i]) * to_acc(x[i]);
      }
    }
    const T* hr = a.residual != nullptr ? h : x;
    const A rstd = A(1) / std::sqrt(ss / A(d) + static_cast<A>(a.eps));
    a.rstd[r] = rstd;
    T* y = a.y + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      // As the reference: the normalised row is rounded to T before the weight multiplies it.
      y[i] = from_acc<T>(to_acc(from_acc<T>(to_acc(hr[i]) * rstd)) * to_acc(a.w[i]));
    }
  }
}

template <typename T>
struct RmsBackArgs {
  const T *dy, *dh_out, *h, *w;
  const at::opmath_type<T>* rstd;
  T* dh;
  at::opmath_type<T>* dw_partial;  // (tasks, d) or null
  int64_t d;
};

template <typename T>
inline void rms_norm_backward_rows(const RmsBackArgs<T>& a, int64_t r0, int64_t r1, int64_t task) {
  using A = at::opmath_type<T>;
  const int64_t d = a.d;
  A* dw = a.dw_partial == nullptr ? nullptr : a.dw_partial + task * d;
  for (int64_t r = r0; r < r1; ++r) {
    const T *dy = a.dy + r * d, *h = a.h + r * d;
    const A rstd = a.rstd[r];
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; ++i) {
      dot += to_acc(dy[i]) * to_acc(a.w[i]) * to_acc(h[i]) * rstd;
    }
    const A mean = dot / A(d);
    T* dh = a.dh + r * d;
    const T* extra = a.dh_out == nullptr ? nullptr : a.dh_out + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const A n = to_acc(h[i]) * rstd;
      A g = rstd * (to_acc(dy[i]) * to_acc(a.w[i]) - n * mean);
      if (extra != nullptr) {
        g += to_acc(extra[i]);
      }
      dh[i] = from_acc<T>(g);
    }
    if (dw != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        dw[i] += to_acc(dy[i]) * to_acc(from_acc<T>(to_acc(h[i]) * rstd));
      }
    }
  }
}

template <typename T>
inline void swiglu_range(const T* g, const T* u, T* out, int64_t lo, int64_t hi) {
  using A = at::opmath_type<T>;
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const A gv = to_acc(g[i]);
    out[i] = from_acc<T>(gv * sigmoid(gv) * to_acc(u[i]));
  }
}

template <typename T>
inline void swiglu_backward_range(const T* dout, const T* g, const T* u, T* dg, T* du, int64_t lo, int64_t hi) {
  using A = at::opmath_type<T>;
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const A gv = to_acc(g[i]), uv = to_acc(u[i]), go = to_acc(dout[i]);
    const A s = sigmoid(gv);
    dg[i] = from_acc<T>(go * uv * s * (A(1) + gv * (A(1) - s)));
    du[i] = from_acc<T>(go * gv * s);
  }
}

// ------------------------------------------------------------------------- ISA copies (all but float64)

template <typename T>
struct Fns {
  void (*rms)(const RmsArgs<T>&, int64_t, int64_t);
  void (*rms_back)(const RmsBackArgs<T>&, int64_t, int64_t, int64_t);
  void (*swiglu)(const T*, const T*, T*, int64_t, int64_t);
  void (*swiglu_back)(const T*, const T*, const T*, T*, T*, int64_t, int64_t);
};

// flatten: the exp must inline into the loops for them to vectorise.
template <typename T>
[[gnu::flatten]] void rms_default(const RmsArgs<T>& a, int64_t r0, int64_t r1) {
  rms_norm_rows<T>(a, r0, r1);
}
template <typename T>
[[gnu::flatten]] void rms_back_default(const RmsBackArgs<T>& a, int64_t r0, int64_t r1, int64_t task) {
  rms_norm_backward_rows<T>(a, r0, r1, task);
}
template <typename T>
[[gnu::flatten]] void swiglu_default(const T* g, const T* u, T* o, int64_t lo, int64_t hi) {
  swiglu_range<T>(g, u, o, lo, hi);
}
template <typename T>
[[gnu::flatten]] void swiglu_back_default(const T* go, const T* g, const T* u, T* dg, T* du, int64_t lo, int64_t hi) {
  swiglu_backward_range<T>(go, g, u, dg, du, lo, hi);
}

#if defined(__x86_64__)
// Templates, so the bfloat16 / float16 copies get the vector ISA too (their conversions vectorise with it).
#define LTM_AVX2 gnu::target("avx2,fma,f16c"), gnu::flatten
// prefer-vector-width=512: GCC would otherwise stay on 256-bit vectors.
#define LTM_AVX512 gnu::target("avx512f,avx512bw,avx512vl,fma,f16c,prefer-vector-width=512"), gnu::flatten
#define LTM_ISA_COPIES(isa, attr)                                                                              \
  template <typename T>                                                                                        \
  [[attr]] void rms_##isa(const RmsArgs<T>& a, int64_t r0, int64_t r1) {                                       \
    rms_norm_rows<T>(a, r0, r1);                                                                               \
  }                                                                                                            \
  template <typename T>                                                                                        \
  [[attr]] void rms_back_##isa(const RmsBackArgs<T>& a, int64_t r0, int64_t r1, int64_t task) {                \
    rms_norm_backward_rows<T>(a, r0, r1, task);                                                                \
  }                                                                                                            \
  template <typename T>                                                                                        \
  [[attr]] void swiglu_##isa(const T* g, const T* u, T* o, int64_t lo, int64_t hi) {                           \
    swiglu_range<T>(g, u, o, lo, hi);                                                                          \
  }                                                                                                            \
  template <typename T>                                                                                        \
  [[attr]] void swiglu_back_##isa(const T* go, const T* g, const T* u, T* dg, T* du, int64_t lo, int64_t hi) { \
    swiglu_backward_range<T>(go, g, u, dg, du, lo, hi);                                                        \
  }
LTM_ISA_COPIES(avx2, LTM_AVX2)
LTM_ISA_COPIES(avx512, LTM_AVX512)
#undef LTM_ISA_COPIES
#undef LTM_AVX512
#undef LTM_AVX2
#endif  // __x86_64__

template <typename T>
Fns<T> select_fns() {
#if defined(__x86_64__)
  if constexpr (!std::is_same_v<T, double>) {
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return {rms_avx512<T>, rms_back_avx512<T>, swiglu_avx512<T>, swiglu_back_avx512<T>};
      case Isa::kAvx2:
        return {rms_avx2<T>, rms_back_avx2<T>, swiglu_avx2<T>, swiglu_back_avx2<T>};
      case Isa::kDefault:
        break;
    }
  }
#endif
  return {rms_default<T>, rms_back_default<T>, swiglu_default<T>, swiglu_back_default<T>};
}

// --------------------------------------------------------------------------------------------------- ops

constexpr int64_t kGrainElements = 1 << 15;  // per parallel_for chunk: fork/join costs more below this

void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.device().is_cpu(), op, ": the C++ kernel takes CPU tensors, got ", name, " on ", t.device());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " (", t.scalar_type(), ") must have the dtype of ",
              ref_name, " (", ref.scalar_type(), ")");
  TORCH_CHECK(t.device().is_cpu(), op, ": the C++ kernel takes CPU tensors, got ", name, " on ", t.device());
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have a last dimension of size >= 1, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be (", x.size(-1), ",), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight (", weight.scalar_type(),
              ") must have the dtype of x (", x.scalar_type(), ")");
  TORCH_CHECK(weight.device().is_cpu(), op, ": the C++ kernel takes CPU tensors, got weight on ", weight.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& weight, double eps) {
  check_norm(x, weight, "rms_norm");
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "rms_norm: eps must be a finite number > 0, got ", eps);
  const bool add = residual.has_value() && residual->defined();
  if (add) {
    check_like(*residual, x, "rms_norm", "residual", "x");
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor rc = add ? residual->contiguous() : at::Tensor();
  const int64_t d = x.size(-1), rows = x.numel() / d;
  at::Tensor y = at::empty_like(xc);
  at::Tensor h = add ? at::empty_like(xc) : at::empty({0}, x.options());
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(compute));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const RmsArgs<scalar_t> a{xc.data_ptr<scalar_t>(),
                              add ? rc.data_ptr<scalar_t>() : nullptr,
                              wc.data_ptr<scalar_t>(),
                              y.data_ptr<scalar_t>(),
                              add ? h.data_ptr<scalar_t>() : nullptr,
                              rstd.data_ptr<at::opmath_type<scalar_t>>(),
                              d,
                              eps};
    const auto fns = select_fns<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / d),
                     [&](int64_t r0, int64_t r1) { fns.rms(a, r0, r1); });
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                         const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         bool weight_grad) {
  check_norm(h, weight, "rms_norm_backward");
  check_like(grad_y, h, "rms_norm_backward", "grad_y", "h");
  const bool extra = grad_h.has_value() && grad_h->defined();
  if (extra) {
    check_like(*grad_h, h, "rms_norm_backward", "grad_h", "h");
  }
  const int64_t d = h.size(-1), rows = h.numel() / d;
  const auto compute = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.scalar_type() == compute && rstd.numel() == rows, "rms_norm_backward: rstd must be ", compute,
              " with one value per row (", rows, "), got ", rstd.scalar_type(), " ", rstd.sizes());
  const at::Tensor dyc = grad_y.contiguous(), hc = h.contiguous(), wc = weight.contiguous(), rc = rstd.contiguous();
  const at::Tensor ec = extra ? grad_h->contiguous() : at::Tensor();
  at::Tensor dh = at::empty_like(hc);
  at::Tensor dw = at::empty({0}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "rms_norm_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    // dw: one partial sum per task, added in task order afterwards, so the result does not depend on threads.
    const int64_t grain = std::max<int64_t>(1, kGrainElements / d);
    const int64_t tasks = (rows + grain - 1) / grain;
    at::Tensor partial;
    if (weight_grad) {
      partial = at::zeros({std::max<int64_t>(tasks, 1), d}, h.options().dtype(c10::CppTypeToScalarType<A>::value));
    }
    const RmsBackArgs<scalar_t> a{dyc.data_ptr<scalar_t>(),
                                  extra ? ec.data_ptr<scalar_t>() : nullptr,
                                  hc.data_ptr<scalar_t>(),
                                  wc.data_ptr<scalar_t>(),
                                  rc.data_ptr<A>(),
                                  dh.data_ptr<scalar_t>(),
                                  weight_grad ? partial.data_ptr<A>() : nullptr,
                                  d};
    const auto fns = select_fns<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        fns.rms_back(a, t * grain, std::min(rows, (t + 1) * grain), t);
      }
    });
    if (weight_grad) {
      dw = partial.sum(0).to(weight.scalar_type());
    }
  });
  return {dh, dw};
}

void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_float(gate, op, "gate");
  check_like(up, gate, op, "up", "gate");
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up, "swiglu");
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu", [&] {
    const auto fns = select_fns<scalar_t>();
    const scalar_t *gp = g.data_ptr<scalar_t>(), *up_ = u.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrainElements, [&](int64_t lo, int64_t hi) { fns.swiglu(gp, up_, op, lo, hi); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check_swiglu(gate, up, "swiglu_backward");
  check_like(grad, gate, "swiglu_backward", "grad", "gate");
  const at::Tensor go = grad.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_backward", [&] {
    const auto fns = select_fns<scalar_t>();
    const scalar_t *gop = go.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(), *up_ = u.data_ptr<scalar_t>();
    scalar_t *dgp = dg.data_ptr<scalar_t>(), *dup = du.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrainElements,
                     [&](int64_t lo, int64_t hi) { fns.swiglu_back(gop, gp, up_, dgp, dup, lo, hi); });
  });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltm, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace ltm

// Schemas of every op in the `ltm` library, and nothing else: kernels register against them from their
// own files (CPU in csrc/*.cpp, CUDA in csrc/cuda/*.cu, fake kernels from Python with register_fake).
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(ltm, m) {
  // One step of posterior inference on (mu, logvar): gradients of CE (given as grad_z = dL/dz at the
  // current sample) + KL, the AdamW update of both, and the next sample z = mu + noise * exp(logvar / 2).
  // `step` is a one-element int64 tensor on the device of mu holding the number of updates done so far, t:
  // the op makes update t + 1 at the scheduled rate of step t (schedule 0 cosine, 1 linear, 2 constant,
  // from lr to lr / 10 over total_steps; ltm_kernels.reference.scheduled_lr) and increments the counter.
  // Why a device counter and not host `lr, step` scalars: a CUDA graph freezes scalar arguments at capture,
  // so the whole T-step inner loop could not be one graph; with the counter, every step's launch is the
  // same and the graph replays all T of them. See ltm_kernels/posterior_step.py.
  m.def(
      "posterior_step(Tensor(a!) mu, Tensor(b!) logvar, Tensor(c!) exp_avg_mu, Tensor(d!) exp_avg_sq_mu, "
      "Tensor(e!) exp_avg_logvar, Tensor(f!) exp_avg_sq_logvar, Tensor(g!) z, Tensor grad_z, Tensor noise, "
      "Tensor(h!) step, float lr, int total_steps, int schedule, float beta1, float beta2, float eps, "
      "float weight_decay) -> ()");
}

// `import ltm_kernels._C` is what runs the static registrations above; the module itself stays empty.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}

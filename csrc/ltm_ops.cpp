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
  // same and the graph replays all T of them. See ltm_kernels/posterior_step_cpp.py.
  m.def(
      "posterior_step(Tensor(a!) mu, Tensor(b!) logvar, Tensor(c!) exp_avg_mu, Tensor(d!) exp_avg_sq_mu, "
      "Tensor(e!) exp_avg_logvar, Tensor(f!) exp_avg_sq_logvar, Tensor(g!) z, Tensor grad_z, Tensor noise, "
      "Tensor(h!) step, float lr, int total_steps, int schedule, float beta1, float beta2, float eps, "
      "float weight_decay) -> ()");
  // Causal sliding-window self-attention with RoPE (adjacent pairs) applied to q and k inside, scale
  // 1 / sqrt(head_dim): query i sees keys i - window < j <= i. q, k, v (B, H, N, hd), any strides; cos, sin
  // (N, hd / 2). Returns out (B, H, N, hd) and lse (B, H, N), the log-sum-exp of each query's scaled scores
  // (float32, float64 for float64 inputs), which the backward uses to recompute the probabilities.
  // See ltm_kernels/attention_cpp.py (autograd, fake kernels) and csrc/attention.cpp (CPU kernel).
  m.def(
      "self_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, int window) -> (Tensor out, "
      "Tensor lse)");
  // Gradients of self_attention's out with respect to q, k, v (none for the tables), from the forward's out
  // and lse.
  m.def(
      "self_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
      "Tensor out, Tensor lse, int window) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Unmasked attention of N queries to M keys (the tokens to their layer's latents; also KV-cache decoding),
  // RoPE on q at the q tables (N, hd / 2) and on k at the k tables (M, hd / 2), none on v. q (B, H, N, hd),
  // k, v (B, H, M, hd). Returns out (B, H, N, hd) and lse (B, H, N) as self_attention does.
  m.def(
      "latent_attention(Tensor q, Tensor k, Tensor v, Tensor cos_q, Tensor sin_q, Tensor cos_k, "
      "Tensor sin_k) -> (Tensor out, Tensor lse)");
  // Gradients of latent_attention's out with respect to q, k, v, from the forward's out and lse; with q_grad
  // false dq is not computed and is returned empty (the inner loop's layer-0 query is a constant).
  m.def(
      "latent_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cos_q, Tensor sin_q, "
      "Tensor cos_k, Tensor sin_k, Tensor out, Tensor lse, bool q_grad=True) -> (Tensor dq, Tensor dk, "
      "Tensor dv)");
  // The LM head with its cross-entropy, without (rows x V) logits: hidden (B, N, d), weight (V, d), targets
  // (B, N) int64 in [0, V) or -1 (ignored). Returns nll (B,), each sequence's summed -log softmax(l)[target] of
  // logits l = hidden weight^T; lse (B * N,), each row's logsumexp (for the backward); and when compute_grad,
  // dh (B, N, d) = softmax(l) weight - weight[target] (0 for ignored rows), else an empty tensor. nll, lse and
  // dh are float32 (float64 for float64 inputs). See ltm_kernels/lm_head_nll_cpp.py and csrc/lm_head.cpp.
  m.def(
      "lm_head_nll(Tensor hidden, Tensor weight, Tensor targets, bool compute_grad) -> (Tensor nll, "
      "Tensor lse, Tensor dh)");
  // Gradients of lm_head_nll's nll for the upstream grad (B,): grad_hidden = grad[b] dh (the forward's dh) in
  // hidden's dtype when hidden_grad, and grad_weight (V, d) in weight's dtype, recomputed from lse, when
  // weight_grad; each is an empty tensor when not asked for.
  m.def(
      "lm_head_nll_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor targets, Tensor lse, "
      "Tensor dh, bool hidden_grad, bool weight_grad) -> (Tensor grad_hidden, Tensor grad_weight)");
  // RMSNorm over the last dimension d, optionally of a residual sum: h = x (+ residual), rstd = 1 / sqrt(mean(h^2)
  // + eps) (float32, float64 for float64 x; one per row), y = (h rstd) weight with the normalised row rounded to x's
  // dtype first (as reference.rms_norm_ref). Returns y, h (an empty tensor without a residual: h is x) and rstd. See
  // ltm_kernels/elementwise_cpp.py.
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor y, Tensor h, Tensor rstd)");
  // Gradients of rms_norm: grad_x (= grad_residual) from grad_y and, when given, the gradient arriving at the h
  // output (add_rms_norm returns h too); grad_weight when weight_grad, else an empty tensor.
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor weight, Tensor rstd, bool weight_grad) "
      "-> (Tensor grad_x, Tensor grad_weight)");
  // SwiGLU gate: out = silu(gate) * up, elementwise, gate and up of one shape and dtype.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
}

// `import ltm_kernels._C` is what runs the static registrations above; the module itself stays empty.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}

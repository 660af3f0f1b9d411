"""The inner-loop engine (docs/model.md, 'The inner loop') on static buffers, as one CUDA graph on GPUs.

`InnerLoop(model, batch, seq_len, steps, lr, schedule, weight_decay)` owns every tensor the loop updates or
reads: tokens, targets, the initial and the current (mu, logvar), the fixed noise, z, the four Adam moments
and the step counter. A loop is

    load(tokens, targets, mu, logvar, noise, generator)    # checks; draws what is not given; copy_ into buffers
    execute()                                              # T steps on the buffers: graph replay on CUDA
    result()                                               # a Posterior holding copies of the outputs

(`run` does all three). `execute` is the same Python on every device: reset the moments and the counter,
z = mu + noise * sigma, the forward's part that does not depend on z (the embedding and layer 0 up to its
cross-attention query: `LTMDecoder.latent_free_prefix`) once, then T times the rest of the forward +
activation-only backward (`torch.autograd.grad` with respect to z) + the posterior-step op, then nll (one
more forward, at the fitted z; skipped under `final_nll=False`, for callers that only need the fitted
latents or run that forward themselves) and kl. Nothing in it reads a tensor on the host, and nothing
allocated in a step outlives it: the op's step counter and scheduled lr live on the device, z is the same
buffer every step (the gradient is taken through `z_leaf`, which shares its memory), and every update is
in place. The only per-step allocations are the forward/backward's temporaries, the same every step (on
CUDA they come from the graph's private memory pool, at the same addresses every replay).

On CUDA the whole `execute` (all T steps) is captured once into a `torch.cuda.CUDAGraph`, after a warm-up
on a side stream (first calls compile Triton kernels and create cuBLAS workspaces, which capture forbids);
later batches are `copy_`-ed into the static inputs and the graph is replayed: one launch per loop. The
graph bakes in the shapes, T, lr, schedule and weight decay, and the addresses of the model's weights: a new
key means a new engine (`cached_inner_loop` keeps a few per model). Updating the weights in place (an
optimizer step, load_state_dict) is fine; moving the model is a new key. `close()` (or `with InnerLoop(...)`)
releases the graph and its memory pool.
"""

from __future__ import annotations

import collections
import weakref

import torch

from ltm.latents import (
    ADAM_BETAS,
    ADAM_EPS,
    INNER_LOOP,
    SCHEDULES,
    Posterior,
    _param_dtype,
    check_inputs,
    check_loop_settings,
    draw_latents,
    kl_divergence,
)

MAX_CACHED_LOOPS = 4  # engines (graphs) kept per model by cached_inner_loop, least recently used dropped


class InnerLoop:
    """Posterior inference for one (batch, seq_len, steps, lr, schedule, weight_decay) on `model`'s device,
    dtype and backend ops. `graph`: capture a CUDA graph (default: on CUDA devices). `final_nll`: compute
    the nll at the fitted z (one forward after the last step); False leaves `nll` None."""

    def __init__(
        self,
        model,
        batch: int,
        seq_len: int,
        steps: int | None = None,
        lr: float = INNER_LOOP.lr,
        schedule: str = INNER_LOOP.schedule,
        weight_decay: float = INNER_LOOP.weight_decay,
        graph: bool | None = None,
        final_nll: bool = True,
    ):
        cfg = model.cfg
        steps = cfg.t_fast if steps is None else steps
        check_loop_settings(steps, lr, schedule, weight_decay, final_nll)
        for name, value, high in (("batch", batch, None), ("seq_len", seq_len, cfg.max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (high and value > high):
                raise ValueError(f"{name} must be an int in [1, {high or 'inf'}], got {value!r}")
        device = model.tok_embeddings.weight.device
        if graph and device.type != "cuda":
            raise ValueError(f"graph=True needs a CUDA model, got one on {device}")
        # A weak reference: a cached engine must not keep its model (and the model its engines) alive.
        self._model = weakref.ref(model)
        self.ops = model.ops
        self.steps, self.lr, self.schedule, self.weight_decay = steps, float(lr), schedule, float(weight_decay)
        self.use_graph = device.type == "cuda" if graph is None else bool(graph)
        self.final_nll = final_nll
        self.key = loop_key(model, batch, seq_len, steps, lr, schedule, weight_decay, final_nll)

        shape = (batch, cfg.n_z, cfg.d_model)
        f = dict(device=device, dtype=_param_dtype(model))
        self.tokens = torch.zeros(batch, seq_len, dtype=torch.int64, device=device)
        self.targets = torch.zeros(batch, seq_len, dtype=torch.int64, device=device)
        self.mu0, self.logvar0, self.noise = (torch.zeros(shape, **f) for _ in range(3))  # static inputs
        self.mu, self.logvar, self.z = (torch.zeros(shape, **f) for _ in range(3))  # loop state
        self.moments = [torch.zeros(shape, **f) for _ in range(4)]  # exp_avg / exp_avg_sq of mu, logvar
        self.step = torch.zeros(1, dtype=torch.int64, device=device)  # updates done, on the device
        self.z_leaf = self.z.detach().requires_grad_(True)  # shares z's memory: dL/dz without a copy
        self.nll = self.kl = None  # outputs of the last execute (on CUDA: in the graph's pool)
        self._graph = None
        self._pool = None

    # ------------------------------------------------------------------------------------------ the loop
    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this InnerLoop no longer exists")
        return model

    def _step(self, model, prefix) -> None:
        """One inner step on the buffers: forward from `prefix`, dCE/dz, posterior step (counter and lr on
        the device)."""
        with torch.enable_grad():
            nll = model.sequence_nll(self.tokens, self.targets, self.z_leaf, prefix)
            (grad_z,) = torch.autograd.grad(nll.sum(), self.z_leaf)
        self.ops.posterior_step(
            self.mu,
            self.logvar,
            *self.moments,
            self.z,
            grad_z,
            self.noise,
            self.step,
            self.lr,
            self.steps,
            SCHEDULES.index(self.schedule),
            ADAM_BETAS[0],
            ADAM_BETAS[1],
            ADAM_EPS,
            self.weight_decay,
        )

    @torch.no_grad()
    def _loop(self):
        """The whole inner loop on the static buffers (what the CUDA graph captures); returns (nll or None, kl)."""
        model = self.model
        self.mu.copy_(self.mu0)
        self.logvar.copy_(self.logvar0)
        for m in self.moments:
            m.zero_()
        self.step.zero_()
        self.z.copy_(self.mu + self.noise * torch.exp(0.5 * self.logvar))
        # The part of the forward that does not depend on z, once per loop (no_grad: no step differentiates
        # into it, so layer 0's cross-attention query gets no gradient either).
        prefix = model.latent_free_prefix(self.tokens)
        for _ in range(self.steps):
            self._step(model, prefix)
        nll = model.sequence_nll(self.tokens, self.targets, self.z, prefix) if self.final_nll else None
        return nll, kl_divergence(self.mu, self.logvar)

    # ------------------------------------------------------------------------------------------- public
    def load(
        self,
        tokens,
        targets,
        mu=None,
        logvar=None,
        noise=None,
        generator: torch.Generator | None = None,
        checked: bool = False,
    ) -> None:
        """Copy a batch into the static inputs; mu / logvar / noise not given are drawn (from `generator`) as
        `infer_posterior` documents. Validates the inputs (a host read) unless `checked`."""
        model = self.model
        if not checked:
            tokens, targets, mu, logvar, noise = check_inputs(model, tokens, targets, mu, logvar, noise)
        if tuple(tokens.shape) != tuple(self.tokens.shape):
            raise ValueError(
                f"tokens must have shape {tuple(self.tokens.shape)} (batch, seq_len) for this "
                f"InnerLoop, got {tuple(tokens.shape)}"
            )
        mu, logvar, noise = draw_latents(model, tokens.shape[0], mu, logvar, noise, generator)
        self.tokens.copy_(tokens)
        self.targets.copy_(targets)
        self.mu0.copy_(mu)
        self.logvar0.copy_(logvar)
        self.noise.copy_(noise)

    def capture(self) -> None:
        """Capture the loop into a CUDA graph now (execute does it on first use). Runs the loop once first,
        on a side stream, as CUDA-graph capture requires, on whatever the buffers hold."""
        if not self.use_graph or self._graph is not None:
            return
        device = self.z.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._loop()
        torch.cuda.current_stream(device).wait_stream(side)
        self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.nll, self.kl = self._loop()
        self._graph = graph

    def execute(self) -> None:
        """Run the loop on the loaded batch: one graph replay on CUDA, the same ops in Python elsewhere.
        No host synchronisation; results stay in the buffers (`mu`, `logvar`, `z`, `nll`, `kl`)."""
        if self.use_graph:
            self.capture()
            self._graph.replay()
        else:
            self.nll, self.kl = self._loop()

    def result(self) -> Posterior:
        """Copies of the last execute's outputs (the buffers are overwritten by the next one)."""
        if self.kl is None:
            raise RuntimeError("InnerLoop.result() before execute()")
        return Posterior(
            mu=self.mu.clone(),
            logvar=self.logvar.clone(),
            z=self.z.clone(),
            noise=self.noise.clone(),
            nll=None if self.nll is None else self.nll.clone(),
            kl=self.kl.clone(),
        )

    def run(
        self,
        tokens,
        targets,
        mu=None,
        logvar=None,
        noise=None,
        generator: torch.Generator | None = None,
        checked: bool = False,
    ) -> Posterior:
        """load + execute + result: the posterior of one batch, as `LTMDecoder.infer_posterior` returns it."""
        self.load(tokens, targets, mu, logvar, noise, generator=generator, checked=checked)
        self.execute()
        return self.result()

    def close(self) -> None:
        """Release the CUDA graph and its memory pool (the buffers go with the object)."""
        if self._graph is not None:
            self._graph.reset()
        self._graph = self._pool = None
        self.nll = self.kl = None  # graph-pool tensors: holding them would keep the pool's blocks

    def __enter__(self) -> InnerLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def loop_key(model, batch, seq_len, steps, lr, schedule, weight_decay, final_nll=True) -> tuple:
    """What a captured loop depends on: shapes and settings, and the model's dtype, device, ops and weight
    addresses (a graph reads weights where they were at capture), and the autocast state."""
    weight = model.tok_embeddings.weight
    autocast = (
        (torch.is_autocast_enabled(weight.device.type), torch.get_autocast_dtype(weight.device.type))
        if weight.device.type in ("cuda", "cpu")
        else None
    )
    return (
        batch,
        seq_len,
        steps,
        float(lr),
        schedule,
        float(weight_decay),
        final_nll,
        weight.dtype,
        weight.device,
        id(model.ops),
        tuple(p.data_ptr() for p in model.parameters()),
        autocast,
    )


# model -> OrderedDict(key -> InnerLoop); weak keys, so engines go with their model.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_inner_loop(model, batch, seq_len, steps, lr, schedule, weight_decay, final_nll=True) -> InnerLoop:
    """The engine for this loop on `model`, built (and on CUDA captured on first use) once per key; the
    least recently used of more than MAX_CACHED_LOOPS per model is closed."""
    loops = _CACHE.setdefault(model, collections.OrderedDict())
    key = loop_key(model, batch, seq_len, steps, lr, schedule, weight_decay, final_nll)
    if key in loops:
        loops.move_to_end(key)
        return loops[key]
    loop = loops[key] = InnerLoop(model, batch, seq_len, steps, lr, schedule, weight_decay, final_nll=final_nll)
    while len(loops) > MAX_CACHED_LOOPS:
        loops.popitem(last=False)[1].close()
    return loop


def clear_cached_inner_loops(model=None) -> None:
    """Close the cached engines of `model` (of every model if None), releasing their graphs."""
    models = list(_CACHE.keys()) if model is None else [model]
    for m in models:
        for loop in _CACHE.pop(m, {}).values():
            loop.close()

"""Generation (docs/model.md, 'Generation'): unconditional (z ~ p(z), optionally scaled) or conditional (q(z | prompt)
fitted by the inner loop, then decoded); greedy, temperature, top-k, top-p; a KV cache so each new token
costs one small forward (`LTMDecoder.decode_step`), or full recomputation for checking it.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

import torch

from ltm.latents import INNER_LOOP
from ltm.tokenizer import Tokenizer, check_vocab
from ltm.validation import COUNT, NON_NEGATIVE, SEED, STEPS, Range


def prior_latents(model, batch: int = 1, scale: float = 1.0, generator: torch.Generator | None = None):
    """z ~ N(0, scale^2 I) of shape (batch, n_z, d); scale < 1 trades diversity for typicality."""
    COUNT.check("batch", batch)
    NON_NEGATIVE.check("scale", scale)
    cfg, w = model.cfg, model.tok_embeddings.weight
    z = torch.randn(
        (batch, cfg.n_z, cfg.d_model),
        generator=generator,
        dtype=torch.float32,
        device=generator.device if generator is not None else "cpu",
    )
    return (scale * z).to(w.device)


def posterior_latents(
    model,
    prompt: torch.Tensor,
    steps: int | None = None,
    lr: float = INNER_LOOP.lr,
    schedule: str = INNER_LOOP.schedule,
    sample: bool = False,
    generator: torch.Generator | None = None,
):
    """Fit q(z | prompt) with the inner loop on the prompt's next-token targets; return its mean (or, with
    `sample`, the loop's sample z). prompt: (B, P) with P >= 2."""
    prompt = model.check_tokens(prompt, "prompt")
    if prompt.shape[1] < 2:
        raise ValueError("prompt needs at least 2 tokens to fit a posterior on (e.g. BOS + text)")
    post = model.infer_posterior(
        prompt[:, :-1], prompt[:, 1:], steps=steps, lr=lr, schedule=schedule, generator=generator
    )
    return post.z if sample else post.mu


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return (
        torch.multinomial(
            probs.cpu() if generator is None or generator.device.type == "cpu" else probs, 1, generator=generator
        )
        .view(-1)
        .to(logits.device)
    )


TOP_P = Range(float, 0, 1, low_open=True, optional=True)


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    STEPS.check("max_new_tokens", max_new_tokens)
    NON_NEGATIVE.check("temperature (0 = greedy)", temperature)
    Range(int, 1, optional=True).check("top_k", top_k)
    TOP_P.check("top_p", top_p)


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    z: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Continue `prompt` (B, P) given latents z (B, n_z, d); returns (B, P + new) token ids.

    Stops early once every row has produced `eos_id` (rows already done are padded with it). `on_token`
    receives each new column (B,) as it is chosen, for streaming. `use_cache=False` recomputes the whole
    prefix for every token (slow; the reference the cache is tested against)."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompt = model.check_tokens(prompt, "prompt")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the context max_seq_len={model.cfg.max_seq_len}"
        )
    z = model.check_latent(z, prompt.shape[0], "z")
    out, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    if max_new_tokens == 0:
        return out
    if use_cache:
        cache = model.init_kv_cache(z, total)
        logits = model.decode_step(prompt, cache)[:, -1]
    for i in range(max_new_tokens):
        if not use_cache:
            logits = model(out, z)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and bool(done.all()):
            break
        if use_cache and i + 1 < max_new_tokens:
            logits = model.decode_step(nxt[:, None], cache)[:, -1]
    return out


def generate_text(
    model,
    prompt: str = "",
    max_new_tokens: int = 100,
    conditional: bool = True,
    prior_scale: float = 1.0,
    steps: int | None = None,
    lr: float = INNER_LOOP.lr,
    schedule: str = INNER_LOOP.schedule,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stream=None,
) -> str:
    """Text continuation of `prompt` (BOS + prompt, stopping at EOS). The posterior is fitted on the prompt when
    `conditional` and the prompt is non-empty; otherwise z ~ N(0, prior_scale^2 I). With `stream` (a file,
    e.g. sys.stdout) the text is written as it is generated."""
    SEED.check("seed", seed)
    NON_NEGATIVE.check("prior_scale", prior_scale)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_vocab(model.cfg)
    tok = Tokenizer(model.cfg.encoding)
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([tok.encode_document(prompt)[:-1]], device=device)  # BOS + prompt, no EOS
    if conditional and ids.shape[1] >= 2:
        z = posterior_latents(
            model,
            ids,
            steps=steps,
            lr=lr,
            schedule=schedule,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
    else:
        z = prior_latents(model, 1, prior_scale, generator)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []

    def emit(nxt):
        token = int(nxt[0])
        if token in (tok.eos_id, tok.bos_id):
            return
        piece = decoder.decode(tok.encoding.decode_single_token_bytes(token))
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()

    generate(
        model,
        ids,
        z,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tok.eos_id,
        generator=generator,
        on_token=emit,
    )
    tail = decoder.decode(b"", final=True)
    pieces.append(tail)
    if stream is not None:
        stream.write(tail)
        stream.flush()
    return "".join(pieces)

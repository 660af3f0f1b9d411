"""Generation: the KV cache against full recomputation, sampling filters, conditional/unconditional text."""

import io

import pytest
import torch

from helpers import random_published_sd
from ltm import LTMConfig, LTMDecoder
from ltm.generate import generate, generate_text, posterior_latents, prior_latents, sample_next


def model_with(window, max_seq_len=48, dtype=torch.float64):
    cfg = LTMConfig.from_name("ltm-tiny", window_size=window, max_seq_len=max_seq_len)
    model = LTMDecoder(cfg, backend="eager").to(dtype)
    model.load_published_state_dict(random_published_sd(cfg, seed=window))  # peaked logits, attention far from flat
    return model


@pytest.mark.parametrize("window,prompt_len", [(16, 7), (5, 7), (5, 1), (48, 20), (1, 3)])
def test_greedy_with_kv_cache_equals_full_recomputation(window, prompt_len):
    model = model_with(window)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 258, (3, prompt_len), generator=g)
    z = torch.randn(3, model.cfg.n_z, model.cfg.d_model, generator=g, dtype=torch.float64)
    n_new = model.cfg.max_seq_len - prompt_len
    cached = generate(model, prompt, z, n_new, temperature=0)
    full = generate(model, prompt, z, n_new, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    # The cache's logits are the forward's logits, past the window and across calls of any length.
    cache = model.init_kv_cache(z, model.cfg.max_seq_len)
    with torch.no_grad():
        pieces = [model.decode_step(cached[:, :prompt_len], cache), model.decode_step(cached[:, prompt_len:], cache)]
        torch.testing.assert_close(torch.cat(pieces, 1), model(cached, z), rtol=1e-10, atol=1e-10)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    # top_p 0.6: token 3 holds 0.64 of the mass, so it alone survives.
    assert set(sample_next(logits, 1.0, top_p=0.6, generator=g).tolist()) == {3}
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=g).tolist()) == {2, 3}
    assert sample_next(logits[:1], 0.0).tolist() == [3]
    counts = torch.bincount(sample_next(logits, 1.0, generator=g), minlength=4).double() / 2000
    torch.testing.assert_close(counts, logits[0].softmax(-1).double(), atol=0.04, rtol=0)


def test_eos_stops_rows_and_errors_name_the_argument():
    model = model_with(8, dtype=torch.float32)
    z = prior_latents(model, 2, scale=0.5, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[257, 104], [257, 105]])
    first = generate(model, prompt, z, 1, temperature=0)[:, -1]
    out = generate(model, prompt, z, 10, temperature=0, eos_id=int(first[0]))
    assert (out[0, 2:] == first[0]).all()  # row 0 is done at once and padded with EOS
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, z, model.cfg.max_seq_len)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, z, 2, top_p=0.0)
    with pytest.raises(ValueError, match="z must have shape"):
        generate(model, prompt, z[:1], 2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        posterior_latents(model, prompt[:, :1])


def test_generate_text_streams_what_it_returns():
    model = model_with(8, dtype=torch.float32)
    for conditional in (True, False):
        stream = io.StringIO()
        text = generate_text(
            model,
            "ab",
            max_new_tokens=12,
            conditional=conditional,
            steps=2,
            temperature=0.8,
            top_k=50,
            seed=1,
            stream=stream,
        )
        assert stream.getvalue() == text and isinstance(text, str)
    a = generate_text(model, "ab", max_new_tokens=8, steps=2, seed=3)
    assert a == generate_text(model, "ab", max_new_tokens=8, steps=2, seed=3)  # seeded: reproducible

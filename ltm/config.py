"""Model configuration: one dataclass, the published presets, and our small test/demo presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ltm.validation import COUNT, Range, check_choice

ENCODINGS = ("gpt2", "bytes")  # the tokenizers of ltm.tokenizer


def swiglu_hidden_size(d_model: int) -> int:
    """Published SwiGLU width: 2/3 of 4d, rounded up to a multiple of 32 (1376 for d = 512)."""
    return 32 * math.ceil(int(8 * d_model / 3) / 32)


@dataclass
class LTMConfig:
    vocab_size: int = 50258  # GPT-2 BPE (50257) + BOS <|beginoftext|>
    n_layer: int = 3
    n_head: int = 8
    d_model: int = 512
    max_seq_len: int = 1024  # context length; also sets the latent key positions
    window_size: int = 256  # token n attends to tokens n-W+1 .. n
    n_z: int = 24  # latent vectors in TOTAL, split evenly over layers
    d_ff: int | None = None  # None: the published SwiGLU width for d_model
    norm_eps: float = 1e-5  # in (0, 1]
    rope_theta: float = 10000.0  # RoPE base, > 0
    t_fast: int = 16  # default inner-loop steps (infer_posterior(steps=None))
    encoding: str = "gpt2"  # tokenizer the model is trained with (ENCODINGS); travels with checkpoints
    # (vocab_size >= the tokenizer's is checked where a tokenizer meets the model: ltm.tokenizer.check_vocab)

    def __post_init__(self):
        if self.d_ff is None:
            self.d_ff = swiglu_hidden_size(self.d_model)
        positive = ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "window_size", "n_z", "d_ff", "t_fast")
        for name in positive:
            COUNT.check(f"LTMConfig.{name}", getattr(self, name))
        Range(float, 0, 1, low_open=True).check("LTMConfig.norm_eps", self.norm_eps)
        Range(float, 0, low_open=True).check("LTMConfig.rope_theta", self.rope_theta)
        check_choice("LTMConfig.encoding", self.encoding, ENCODINGS)
        if self.d_model % self.n_head:
            raise ValueError(f"LTMConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"LTMConfig head dim d_model / n_head = {self.head_dim} must be even (RoPE pairs)")
        if self.n_z % self.n_layer:
            raise ValueError(
                f"LTMConfig.n_z ({self.n_z}) must be divisible by n_layer ({self.n_layer}): "
                "each layer owns n_z / n_layer latents"
            )
        if self.max_seq_len < self.n_z:
            raise ValueError(
                f"LTMConfig.max_seq_len ({self.max_seq_len}) must be >= n_z ({self.n_z}): "
                "latent positions are j * (max_seq_len // n_z)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_z_per_layer(self) -> int:
        return self.n_z // self.n_layer

    @property
    def latent_stride(self) -> int:
        """Latent j's key sits at RoPE position j * latent_stride (n_z is the total count)."""
        return self.max_seq_len // self.n_z

    @classmethod
    def from_name(cls, name: str, **overrides) -> LTMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown LTM preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LTMConfig:
        if not isinstance(values, dict):
            raise ValueError(f"LTMConfig values must be a dict of field: value, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown LTMConfig fields {unknown}; the fields are {', '.join(known)}")
        return cls(**values)


_PUBLISHED = dict(vocab_size=50258, n_head=8, d_model=512, max_seq_len=1024, window_size=256, encoding="gpt2")

PRESETS = {
    # The paper's models (Kong et al. 2025): 38.37M, 51.01M, 76.28M parameters.
    "ltm-s": dict(_PUBLISHED, n_layer=3, n_z=24, t_fast=16),
    "ltm-m": dict(_PUBLISHED, n_layer=6, n_z=24, t_fast=16),
    "ltm-l": dict(_PUBLISHED, n_layer=12, n_z=96, t_fast=64),
    # The CPU benchmark's configuration (docs/targets.md, 'CPU'; GPT-2 vocabulary).
    "ltm-cpu": dict(
        vocab_size=50258,
        n_layer=4,
        n_head=4,
        d_model=256,
        max_seq_len=512,
        window_size=128,
        n_z=16,
        t_fast=16,
        encoding="gpt2",
    ),
    # Tests and demos: byte-level tokenizer (256 bytes + EOS + BOS), runs in milliseconds on a CPU.
    "ltm-tiny": dict(
        vocab_size=258,
        n_layer=2,
        n_head=2,
        d_model=64,
        max_seq_len=64,
        window_size=16,
        n_z=8,
        t_fast=4,
        encoding="bytes",
    ),
}

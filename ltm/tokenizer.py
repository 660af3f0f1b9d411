"""Tokenizers: the published GPT-2 BPE vocabulary, and a byte-level one that needs no files.

Two encodings, both `tiktoken.Encoding`s with the same special-token layout (EOS, then BOS, last):

- ``"gpt2"``: the vocabulary of the published LTMs, 50258 tokens = GPT-2 BPE (50257, EOS
  ``<|endoftext|>`` = 50256) + BOS ``<|beginoftext|>`` = 50257. tiktoken downloads the GPT-2 BPE files
  on first use and caches them, so it needs the network once (or ``TIKTOKEN_CACHE_DIR`` pointing to a
  cache that holds them).
- ``"bytes"``: every byte is its own token (256), EOS = 256, BOS = 257, 258 tokens. Any UTF-8 text round
  trips exactly and nothing is downloaded, so it is the default for tests, CI and CPU demos.

Documents are encoded ``[BOS] + text + [EOS]`` and concatenated. Token ids mean nothing without their
encoding, so the encoding name is recorded in every dataset and checkpoint, and `check_encoding` refuses
to run a model with a different tokenizer than it was trained with.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from ltm.config import ENCODINGS
from ltm.files import atomic_write_bytes

VOCAB_SIZES = {"gpt2": 50258, "bytes": 258}  # ids of each encoding, BOS and EOS included
BOS_TOKEN = "<|beginoftext|>"
EOS_TOKEN = "<|endoftext|>"

# GPT-2 BPE files as tiktoken (tiktoken_ext/openai_public.py) fetches them, with their sha256. Kept here so
# we can tell whether they are cached without calling tiktoken's downloader, and fetch them with a timeout.
_GPT2_VOCAB_BPE = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)
_GPT2_ENCODER_JSON = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
)
_GPT2_FILES = (_GPT2_VOCAB_BPE, _GPT2_ENCODER_JSON)
# tiktoken's gpt2 / r50k_base pattern (equivalent to the original GPT-2 regex, faster).
_GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# tiktoken's requests.get has no timeout; behind a firewall that drops packets it would block for minutes.
_DOWNLOAD_TIMEOUT_S = (10, 60)  # (connect, read)


def _tiktoken_cache_dir() -> str:
    """The directory tiktoken.load.read_file_cached uses ('' = caching disabled)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cache_path(cache_dir: str, url: str) -> str:
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())  # tiktoken's cache key


def _is_cached(path: str, sha256: str) -> bool:
    # tiktoken re-downloads a cached file whose hash does not match, so such a file does not count.
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == sha256
    except OSError:
        return False


def gpt2_is_cached() -> bool:
    """Whether "gpt2" can be loaded without the network (its BPE files are in tiktoken's cache)."""
    cache_dir = _tiktoken_cache_dir()
    return bool(cache_dir) and all(_is_cached(_cache_path(cache_dir, url), h) for url, h in _GPT2_FILES)


def _prefetch_gpt2_files(cache_dir: str) -> None:
    """Put the GPT-2 files where tiktoken looks for them, like tiktoken does, but with a timeout."""
    import requests  # a tiktoken dependency

    for url, sha256 in _GPT2_FILES:
        path = _cache_path(cache_dir, url)
        if _is_cached(path, sha256):
            continue
        resp = requests.get(url, timeout=_DOWNLOAD_TIMEOUT_S)
        resp.raise_for_status()
        if hashlib.sha256(resp.content).hexdigest() != sha256:
            raise OSError(f"sha256 mismatch for {url} (corrupted download?)")
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write_bytes(path, resp.content)


def _load_gpt2() -> tiktoken.Encoding:
    cache_dir = _tiktoken_cache_dir()
    try:
        if cache_dir:
            _prefetch_gpt2_files(cache_dir)
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=_GPT2_VOCAB_BPE[0],
            vocab_bpe_hash=_GPT2_VOCAB_BPE[1],
            encoder_json_file=_GPT2_ENCODER_JSON[0],
            encoder_json_hash=_GPT2_ENCODER_JSON[1],
        )
    except OSError as e:  # requests' ConnectionError / Timeout / HTTPError are OSErrors too
        raise RuntimeError(
            "could not load the GPT-2 BPE files for encoding 'gpt2'. tiktoken downloads them on first use, "
            "which needs network access once (or TIKTOKEN_CACHE_DIR pointing to a cache that holds them; "
            f"looked in {cache_dir or '(caching disabled)'!r}). Offline, use encoding='bytes'. "
            f"Cause: {type(e).__name__}: {e}"
        ) from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: 50256, BOS_TOKEN: 50257},
        explicit_n_vocab=VOCAB_SIZES["gpt2"],
    )


def _load_bytes() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="bytes",
        # With no merges the split cannot change the ids; bounded pieces keep encoding linear and cheap.
        pat_str=r"[\s\S]{1,64}",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOS_TOKEN: 256, BOS_TOKEN: 257},
        explicit_n_vocab=VOCAB_SIZES["bytes"],
    )


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The `tiktoken.Encoding` called `name` (one of ENCODINGS). Only "gpt2" may touch the network."""
    if name == "gpt2":
        return _load_gpt2()
    if name == "bytes":
        return _load_bytes()
    raise ValueError(f"unknown encoding {name!r}; known encodings: {', '.join(map(repr, ENCODINGS))}")


def check_encoding(expected: str, found: str, what: str) -> None:
    """Refuse to pair token ids or a model from one encoding with another (e.g. what="checkpoint")."""
    if expected != found:
        raise ValueError(
            f"{what} was trained with tokenizer {expected!r} but {found!r} was given; "
            "a model is never run with a different tokenizer than it was trained with"
        )


def check_vocab(cfg, what: str = "the model") -> None:
    """Refuse a model config whose vocabulary cannot hold every id of its tokenizer (cfg.encoding)."""
    need = VOCAB_SIZES[cfg.encoding]
    if cfg.vocab_size < need:
        raise ValueError(
            f"{what} has vocab_size={cfg.vocab_size}, smaller than the {need} ids of its tokenizer "
            f"{cfg.encoding!r}; use vocab_size >= {need} (or another encoding)"
        )


@dataclass(frozen=True)
class Tokenizer:
    """Encode/decode text with one of ENCODINGS; documents are [BOS] + text + [EOS]."""

    name: str
    encoding: tiktoken.Encoding = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "encoding", get_encoding(self.name))

    def __reduce__(self):  # pickle by name (e.g. to DataLoader workers), not the whole 50k-token table
        return (Tokenizer, (self.name,))

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def bos_id(self) -> int:
        return self.encoding.encode_single_token(BOS_TOKEN)

    @property
    def eos_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" inside user text is text, never a document boundary.
        return self.encoding.encode_ordinary(text)

    def encode_document(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text), self.eos_id]

    def encode_documents(self, texts: Iterable[str]) -> list[int]:
        if isinstance(texts, str):  # iterating a str would make one document per character
            raise TypeError(
                "encode_documents expects an iterable of strings, got a single str; "
                "use encode_document for one document"
            )
        return [i for text in texts for i in self.encode_document(text)]

    def decode(self, ids) -> str:
        """Text of `ids` (list of ints, or 1-D torch tensor / numpy array); BOS/EOS appear as their strings.

        Byte sequences that are not valid UTF-8 (e.g. a generation cut inside a character) decode to U+FFFD.
        """
        if hasattr(ids, "tolist"):  # torch tensor / numpy array, without importing either
            if getattr(ids, "ndim", 1) != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError as e:
            raise TypeError(f"ids must be a sequence of integer token ids: {e}") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids contains {i}, outside the {self.name!r} vocabulary [0, {self.vocab_size})")
        return self.encoding.decode(ids)

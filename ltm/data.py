"""Token data: `prepare` turns text into a token file, `WindowSampler` draws training windows from it.

A prepared dataset is two files side by side:
    <name>.bin    the token ids of every document, `BOS + text + EOS`, concatenated; little-endian uint16
                  when the vocabulary fits (< 65536 ids), else uint32
    <name>.json   metadata: encoding, vocab_size, dtype, n_tokens, n_documents, bos_id, eos_id, sources
Token ids mean nothing without their encoding, so loading checks it (`ltm.tokenizer.check_encoding`).

Inputs: text files (one document each), folders (every .txt / .md / .jsonl file below them, sorted), and
JSONL files (one document per line: an object with a text field, or a bare JSON string).

Batches are a pure function of (seed, step): resuming at step s needs only s, and a run on W processes
sees exactly the batches one process sees with a W times larger batch (each rank takes its slice).

    ltm prepare corpus/ notes.jsonl -o data/train --encoding bytes
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ltm.files import atomic_open
from ltm.progress import progress_bar
from ltm.tokenizer import ENCODINGS, Tokenizer, check_encoding
from ltm.validation import check_output

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
FORMAT = "ltm-tokens"
SAMPLINGS = ("random", "blocks")


class DataError(ValueError):
    """A data file or input that cannot be used; the message names it and says why."""


# ---------------------------------------------------------------- reading documents
def _input_files(paths: Iterable) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"input folder {path} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    return files


def iter_documents(paths: Iterable, jsonl_key: str = "text") -> Iterator[str]:
    """Every document of the inputs, in order; empty documents are skipped."""
    for path in _input_files(paths):
        if path.suffix in JSONL_SUFFIXES:
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{line_no} is not valid JSON: {err}") from None
                    if isinstance(obj, dict):
                        if jsonl_key not in obj or not isinstance(obj[jsonl_key], str):
                            raise DataError(
                                f"{path}:{line_no} has no string field {jsonl_key!r} "
                                f"(choose the field with jsonl_key / --jsonl-key)"
                            )
                        obj = obj[jsonl_key]
                    if not isinstance(obj, str):
                        raise DataError(f"{path}:{line_no}: expected an object or a string, got {type(obj).__name__}")
                    if obj:
                        yield obj
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text: {err}") from None
            if text:
                yield text


# ---------------------------------------------------------------- token files
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def data_paths(path) -> tuple[Path, Path]:
    """(token file, metadata file) of a dataset named by either file or by the common stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".bin", ".json") else path
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def prepare(inputs, output, encoding: str = "bytes", jsonl_key: str = "text", progress: bool = True) -> dict:
    """Tokenize `inputs` (files, folders, JSONL) into `<output>.bin` + `<output>.json`; returns the metadata.

    Both files are written to temporary names and renamed only when complete: an error (or a crash) leaves
    any earlier dataset at `output` as it was. An output that is one of the inputs is refused."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("inputs: give at least one text file, folder or JSONL file")
    if encoding not in ENCODINGS:
        raise DataError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    bin_path, meta_path = data_paths(output)
    sources = _input_files(inputs)
    for path in (bin_path, meta_path):
        try:
            check_output("output", path, [("input", p) for p in sources])
        except ValueError as err:
            raise DataError(str(err)) from None
    tok = Tokenizer(encoding)
    dtype = token_dtype(tok.vocab_size)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    n_tokens = n_docs = 0
    with (
        atomic_open(bin_path) as f_bin,
        atomic_open(meta_path, "w") as f_meta,
        progress_bar(progress, desc="prepare", unit=" docs") as bar,
    ):
        for text in iter_documents(sources, jsonl_key):
            ids = np.asarray(tok.encode_document(text), dtype=dtype)
            f_bin.write(ids.tobytes())
            n_tokens += len(ids)
            n_docs += 1
            bar.update(1)
            if n_docs % 256 == 0:
                bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
        bar.set_postfix(tokens=f"{n_tokens:,}")
        if n_docs == 0:
            raise DataError(f"inputs {[str(p) for p in inputs]} contain no non-empty documents")
        meta = dict(
            format=FORMAT,
            version=1,
            encoding=encoding,
            vocab_size=tok.vocab_size,
            dtype=dtype.name,
            n_tokens=n_tokens,
            n_documents=n_docs,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            sources=[str(p) for p in inputs],
        )
        f_meta.write(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenData:
    """A prepared token file, memory-mapped. `encoding` given: refuse a dataset made with another tokenizer."""

    def __init__(self, path, encoding: str | None = None):
        self.bin_path, self.meta_path = data_paths(path)
        if not self.meta_path.is_file():
            raise DataError(f"data {path}: metadata file {self.meta_path} not found (make it with `ltm prepare`)")
        try:
            self.meta = json.loads(self.meta_path.read_text())
            if self.meta.get("format") != FORMAT:
                raise ValueError(f"format is {self.meta.get('format')!r}, not {FORMAT!r}")
            self.encoding, n_tokens, dtype = self.meta["encoding"], self.meta["n_tokens"], np.dtype(self.meta["dtype"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"data {path}: {self.meta_path} is not ltm token metadata: {err}") from None
        if encoding is not None:
            check_encoding(encoding, self.encoding, f"the model (data {self.bin_path} is tokenized otherwise)")
        if not self.bin_path.is_file():
            raise DataError(f"data {path}: token file {self.bin_path} not found")
        size = self.bin_path.stat().st_size
        if size == 0 or n_tokens == 0:
            raise DataError(f"data file {self.bin_path} is empty (no tokens)")
        if size != n_tokens * dtype.itemsize:
            raise DataError(
                f"data file {self.bin_path} has {size} bytes but its metadata says {n_tokens} "
                f"{dtype.name} tokens ({n_tokens * dtype.itemsize} bytes): truncated or overwritten"
            )
        self.tokens = np.memmap(self.bin_path, dtype=dtype, mode="r", shape=(n_tokens,))

    def __len__(self) -> int:
        return len(self.tokens)


def as_token_array(data) -> np.ndarray:
    """A 1-D integer token array from a TokenData, numpy array, list or 1-D tensor; refuses empty data."""
    if isinstance(data, TokenData):
        return data.tokens
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy()
    arr = np.asarray(data)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"data must be a 1-D array of token ids, got shape {arr.shape} dtype {arr.dtype}")
    if len(arr) == 0:
        raise DataError("data is empty (no tokens)")
    return arr


# ---------------------------------------------------------------- batches
def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts]))


class WindowSampler:
    """Deterministic training batches of `seq_len + 1`-token windows (inputs = w[:-1], targets = w[1:]).

    `sampling`: "random" starts anywhere; "blocks" cuts the data into consecutive non-overlapping windows
    and visits them in a fresh seeded order each epoch. The global batch of a step holds
    `batch_size * world_size * grad_accum` windows; micro-step m of rank r takes slice `m * world_size + r`.
    """

    def __init__(
        self,
        data,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        sampling: str = "random",
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ):
        self.tokens = as_token_array(data)
        for name, value in (
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("world_size", world_size),
            ("grad_accum", grad_accum),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if len(self.tokens) < seq_len + 1:
            raise DataError(f"data has {len(self.tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.seq_len, self.batch_size, self.seed, self.sampling = seq_len, batch_size, seed, sampling
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.global_batch = batch_size * world_size * grad_accum
        self._perm = (None, None)  # (epoch, permutation) of the last "blocks" epoch used

    def _block_order(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            n_blocks = len(self.tokens) // (self.seq_len + 1)
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(n_blocks))
        return self._perm[1]

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of every window of the global batch of `step`."""
        length = self.seq_len + 1
        if self.sampling == "random":
            return np.random.default_rng([self.seed, step]).integers(
                0, len(self.tokens) - length + 1, size=self.global_batch
            )
        n_blocks = len(self.tokens) // length
        index = step * self.global_batch + np.arange(self.global_batch)
        blocks = np.array([self._block_order(int(i // n_blocks))[i % n_blocks] for i in index])
        return blocks * length

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(inputs, targets) int64 of shape (batch_size, seq_len), and the windows' indices in the global batch."""
        first = (micro * self.world_size + self.rank) * self.batch_size
        index = np.arange(first, first + self.batch_size)
        w = _windows(self.tokens, self.global_starts(step)[index], self.seq_len + 1)
        return w[:, :-1], w[:, 1:], index


def eval_blocks(data, seq_len: int) -> list[torch.Tensor]:
    """The data cut into consecutive non-overlapping windows of `seq_len + 1` tokens (int64, one row each);
    a last shorter window (>= 2 tokens) is kept. The first token of every window is context, never scored."""
    tokens = as_token_array(data)
    length = seq_len + 1
    out = [torch.from_numpy(np.asarray(tokens[s : s + length], dtype=np.int64)) for s in range(0, len(tokens), length)]
    if len(out[-1]) < 2:
        out.pop()
    if not out:
        raise DataError(f"data has {len(tokens)} token(s): nothing to score")
    return out


def encode_texts(paths, encoding: str, jsonl_key: str = "text") -> np.ndarray:
    """Token ids of text files / folders / JSONL (as `prepare` would write them), in memory."""
    tok = Tokenizer(encoding)
    ids = [i for text in iter_documents(paths, jsonl_key) for i in tok.encode_document(text)]
    if not ids:
        raise DataError(f"inputs {[str(p) for p in paths]} contain no non-empty documents")
    return np.asarray(ids, dtype=token_dtype(tok.vocab_size))

"""Where user input enters: the allowed range of every number, output paths, device names.

The same `Range` checks an argument of the Python API (`Range.check("batch_size", value)`) and parses it on
the command line (`type=Range.parse`), so both refuse a value with the same words: the argument's name and
its range. Ranges that depend on other values (seq_len <= the model's max_seq_len, shots < the number of
examples) are checked where both are known, with the same kind of message.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Range:
    """An int or a finite float within [low, high] (either bound open or absent); `optional`: None allowed."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self, none_too: bool = True) -> str:
        what = "an int" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            what += f" {'<' if self.high_open else '<='} {self.high}"
        return what + (" or None" if self.optional and none_too else "")

    def _ok(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, name: str, value):
        """`value` if it is in range, else ValueError naming `name` and the range."""
        if value is None and self.optional:
            return None
        if not self._ok(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str):
        """argparse `type=`: the number in `text`, or an error argparse prints with the option's name."""
        try:
            value = self.kind(text)
        except ValueError:
            value = text
        if not self._ok(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe(none_too=False)}, got {text!r}")
        return value


# Ranges shared by the API and the CLI.
COUNT = Range(int, 1)  # sizes and counts that must be at least 1
STEPS = Range(int, 0)  # inner-loop steps T (0: the initial posterior as it is)
SEED = Range(int, 0, 2**63 - 1)  # numpy's SeedSequence takes non-negative seeds
NON_NEGATIVE = Range(float, 0)  # learning rates of the inner loop, weight decay, scales
POSITIVE = Range(float, 0, low_open=True)


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# ---------------------------------------------------------------- paths
def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(name: str, path, inputs) -> Path:
    """Refuse to write `path` (argument `name`) over an input (a dict {argument: path}, or (argument, path)
    pairs) or onto a folder; called before any work is done, so a bad output path never wastes a run."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; give a file name")
    for input_name, input_path in inputs.items() if isinstance(inputs, dict) else inputs:
        if input_path is not None and _same_file(path, Path(input_path)):
            raise ValueError(
                f"{name} {path} is the input {input_name} {input_path}: refusing to write over an "
                "input; choose another output name"
            )
    return path


# ---------------------------------------------------------------- devices
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" (the local rank's GPU when CUDA is available, else the CPU), "cpu", "cuda" or "cuda:N"; a CUDA
    device that this torch or this machine cannot provide is an error saying which."""
    if not isinstance(name, str) or not (
        name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())
    ):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (
            "this torch is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        )
        raise ValueError(f"device {name!r} is not available: {why}; use device 'cpu' or 'auto'")
    index = int(name[5:]) if name.startswith("cuda:") else local_rank
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r}: CUDA device {index} does not exist here ({torch.cuda.device_count()} visible)"
        )
    return torch.device("cuda", index)

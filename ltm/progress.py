"""Progress bars (tqdm) on stderr for prepare, train, eval and fewshot.

A bar is drawn only when progress is on (`--no-progress` turns it off) and stderr is a terminal: logs,
pipes and CI output stay free of carriage-return noise. `note` prints a line without breaking a bar.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr (kwargs: total, desc, unit, initial, ...); disabled unless `enabled` and stderr
    is a terminal (tqdm's disable=None)."""
    return tqdm(file=sys.stderr, disable=None if enabled else True, dynamic_ncols=True, **kwargs)


def note(message: str) -> None:
    """A message on stderr that does not tear an active bar."""
    tqdm.write(message, file=sys.stderr)

"""Progress of long jobs: a live bar on a terminal, one whole line per update anywhere else.

A bar redraws itself with carriage returns, which a log file, CI or a batch job's output shows as
one unreadable line. There `progress_bar` writes plain lines instead, at most one per
`LOG_INTERVAL_S` seconds, plus the last one.
"""
from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 20.0


class LineProgress(tqdm):
  """tqdm writing newline-terminated status lines, never carriage returns or cursor moves."""

  def __init__(self, *args: Any, **kwargs: Any):
    self._printed_n = None  # the count shown by the last line: refreshes with no progress are silent
    # smoothing=0: the rate over the whole run. tqdm samples its rate only every `mininterval`,
    # so a moving average would show the first sample (a compiling step) for minutes.
    kwargs.update(dynamic_ncols=False, ascii=True, smoothing=0,
                  mininterval=max(kwargs.get("mininterval", 0), LOG_INTERVAL_S))
    super().__init__(*args, **kwargs)

  def clear(self, nolock: bool = False) -> None:
    """Nothing to erase: lines already written stay (tqdm.write calls this around a message)."""

  def display(self, msg: str | None = None, pos: int | None = None) -> bool:
    if msg is not None or self.n == self._printed_n:  # msg='' is tqdm erasing the bar
      return False
    self._printed_n = self.n
    self.fp.write(f"{self}\n")
    self.fp.flush()
    return True

  def close(self) -> None:
    if not self.disable:
      self.display()  # the final count, whenever the last line was written
      self.leave = False  # tqdm would end a kept bar with a newline of its own
    super().close()


def progress_bar(iterable=None, **kwargs: Any) -> tqdm:
  """`tqdm(iterable, **kwargs)` on a terminal, `LineProgress` when the output is a file or pipe."""
  stream = kwargs.get("file") or sys.stderr
  on_terminal = hasattr(stream, "isatty") and stream.isatty()
  return (tqdm if on_terminal else LineProgress)(iterable, **kwargs)

"""Progress output: a bar on a terminal, whole lines (no carriage returns) in logs and CI."""
from __future__ import annotations

import io
import re

import pytest
from tqdm import tqdm

from hubert_ecg_jax import progress


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def test_log_output_is_whole_lines(monkeypatch):
  monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line for every update
  log = io.StringIO()
  bar = progress.progress_bar(total=4, desc="records", unit="ECG", file=log)
  assert isinstance(bar, progress.LineProgress)
  for step in range(4):
    bar.update(1)
    bar.set_postfix(loss=f"{step:.1f}")  # no progress: no new line
    if step == 1:
      tqdm.write("a message", file=log)
  bar.close()
  text = log.getvalue()
  assert "\r" not in text and "\x1b" not in text
  lines = text.splitlines()
  counts = [re.search(r" (\d/4) ", line).group(1) for line in lines if line.startswith("records:")]
  assert counts == ["0/4", "1/4", "2/4", "3/4", "4/4"]  # one line per count, the last one included
  assert lines[3] == "a message"


def test_log_lines_are_rate_limited(monkeypatch):
  monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)
  log = io.StringIO()
  with progress.progress_bar(total=1000, desc="steps", file=log) as bar:
    for _ in range(1000):
      bar.update(1)
  lines = log.getvalue().splitlines()
  assert len(lines) == 2 and "0/1000" in lines[0] and "1000/1000" in lines[1]


@pytest.mark.parametrize("disable", [False, True])
def test_terminal_gets_the_live_bar(disable):
  terminal = _Terminal()
  bar = progress.progress_bar(range(3), desc="x", file=terminal, disable=disable)
  assert type(bar) is tqdm
  assert list(bar) == [0, 1, 2]
  assert ("\r" in terminal.getvalue()) is not disable

"""Metrics out of a training run: a line on stdout and TensorBoard event files (tensorboardX).

Only process 0 writes, so a multi-host run logs once.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax

from hubert_ecg_jax.files import AnyPath, UrlPath, as_path


def format_metrics(step: int, metrics: Mapping[str, float], prefix: str) -> str:
  """`[train] step 120: loss 4.6021, masked_accuracy 0.0311, ...` (keys sorted, 4 significant digits)."""
  parts = [f"{name} {value:.4g}" for name, value in sorted(metrics.items())]
  return f"[{prefix}] step {step}: " + ", ".join(parts)


class _UrlEventFiles:
  """tensorboardX's writer factory for event files at URLs: streams through `UrlPath.open`."""

  def open(self, path: str) -> Any:
    return as_path(path).open("wb")

  def directory_check(self, path: str) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


class MetricsWriter:
  """Writes scalar metrics under `train/...` and `val/...` tags to stdout and TensorBoard."""

  def __init__(self, log_dir: str | os.PathLike | AnyPath | None, print_fn: Callable[[str], None] = print):
    self._active = jax.process_index() == 0
    self._print = print_fn
    self._writer = None
    if self._active and log_dir is not None:
      from tensorboardX import SummaryWriter, record_writer

      log_dir = as_path(log_dir)
      if isinstance(log_dir, UrlPath):  # event files through the path layer, not tensorboardX's own
        record_writer.register_writer_factory(log_dir.scheme, _UrlEventFiles())
      log_dir.mkdir(parents=True, exist_ok=True)
      self._writer = SummaryWriter(str(log_dir))

  def write(self, step: int, metrics: Mapping[str, float], prefix: str) -> None:
    if not self._active:
      return
    values = {name: float(value) for name, value in metrics.items()}
    self._print(format_metrics(step, values, prefix))
    if self._writer is not None:
      for name, value in values.items():
        self._writer.add_scalar(f"{prefix}/{name}", value, step)
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

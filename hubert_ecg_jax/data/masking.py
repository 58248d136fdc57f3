"""Span masks for masked prediction, sampled on the host with numpy (more: docs/modules.md)."""
from __future__ import annotations

import numpy as np

RandomSource = np.random.Generator | np.random.RandomState


def _num_spans(length: int, sequence_length: int, mask_prob: float, span: int, min_masks: int,
               epsilon: float) -> int:
  """Number of spans to mask in an example of `length` usable frames."""
  num_spans = max(int(mask_prob * length / span + epsilon), min_masks)
  num_spans = min(num_spans, sequence_length // span)
  return min(num_spans, max(length - (span - 1), 0))


def _span_starts(valid: np.ndarray, span: int) -> np.ndarray:
  """Frames where a span of `span` frames lies wholly on valid frames."""
  windows = np.lib.stride_tricks.sliding_window_view(valid, span)  # (frames - span + 1, span)
  return np.flatnonzero(windows.all(axis=-1))


def sample_span_mask(rng: RandomSource, batch_size: int, num_frames: int, mask_prob: float = 0.33,
                     span: int = 1, min_masks: int = 2, frame_mask: np.ndarray | None = None,
                     honour_padding: bool = True) -> np.ndarray:
  """Samples which frames to replace by the mask embedding.

  Args:
    rng: numpy random source (a `RandomState` reproduces `transformers`' draws exactly).
    batch_size: number of examples.
    num_frames: frames per example (93 for 6000 input samples).
    mask_prob: fraction of frames to mask, before overlaps (`mask_time_prob`).
    span: frames per masked span (`mask_time_length`).
    min_masks: minimum number of spans per example (`mask_time_min_masks`).
    frame_mask: optional (batch, frames) bool, True on frames that are not padding.
    honour_padding: with a `frame_mask`, mask only non-padding frames and count spans from the
      number of non-padding frames. False reproduces the original HuBERT-ECG, which sampled over
      all frames whatever the padding.

  Returns:
    (batch, frames) bool, True on masked frames.
  """
  if span < 1:
    raise ValueError(f"span must be at least 1 frame, got {span}")
  if span > num_frames:
    raise ValueError(f"span must be at most num_frames={num_frames}, got {span}")
  if not 0.0 <= mask_prob <= 1.0:
    raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
  if min_masks < 0:
    raise ValueError(f"min_masks must be >= 0, got {min_masks}")
  if frame_mask is None or not honour_padding:
    valid = np.ones((batch_size, num_frames), dtype=bool)
  else:
    valid = np.asarray(frame_mask)
    if valid.shape != (batch_size, num_frames):
      raise ValueError(f"frame_mask must have shape {(batch_size, num_frames)}, got {valid.shape}")
    if valid.dtype != np.bool_:
      raise ValueError(f"frame_mask must be bool, got {valid.dtype}")

  epsilon = float(rng.random())  # one rounding draw for the whole batch, as transformers
  mask = np.zeros((batch_size, num_frames), dtype=bool)
  if _num_spans(num_frames, num_frames, mask_prob, span, min_masks, epsilon) == 0:
    return mask
  for row in range(batch_size):
    starts = _span_starts(valid[row], span)
    length = int(valid[row].sum())
    num_spans = min(_num_spans(length, num_frames, mask_prob, span, min_masks, epsilon), len(starts))
    chosen = rng.choice(starts, num_spans, replace=False)  # (spans,)
    frames = (chosen[:, None] + np.arange(span)[None, :]).reshape(-1)  # (spans * span,)
    mask[row, frames] = True
  return mask

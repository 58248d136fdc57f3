"""Span masking against transformers' own `_compute_mask_indices`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.hubert.modeling_hubert import _compute_mask_indices

from hubert_ecg_jax.data.masking import sample_span_mask


def _right_padded_mask(lengths: list[int], frames: int) -> np.ndarray:
  return np.arange(frames)[None, :] < np.asarray(lengths)[:, None]  # (batch, frames)


@pytest.mark.parametrize("span,min_masks", [(1, 2), (3, 2), (10, 1)])
def test_same_draws_as_transformers_without_padding(span: int, min_masks: int) -> None:
  for seed in range(20):
    np.random.seed(seed)
    expected = _compute_mask_indices((6, 93), 0.33, span, min_masks=min_masks)
    got = sample_span_mask(np.random.RandomState(seed), 6, 93, 0.33, span, min_masks)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("span", [1, 4])
def test_same_draws_as_transformers_with_right_padding(span: int) -> None:
  lengths = [93, 60, 31, 12]
  frame_mask = _right_padded_mask(lengths, 93)
  for seed in range(20):
    np.random.seed(seed)
    expected = _compute_mask_indices((4, 93), 0.33, span, attention_mask=torch.tensor(frame_mask),
                                     min_masks=2)
    got = sample_span_mask(np.random.RandomState(seed), 4, 93, 0.33, span, 2, frame_mask=frame_mask)
    np.testing.assert_array_equal(got, expected)


def test_count_distribution_matches_transformers() -> None:
  rng = np.random.default_rng(0)
  ours = np.array([sample_span_mask(rng, 8, 93).sum(axis=1) for _ in range(2000)])  # (draws, batch)
  np.random.seed(0)
  theirs = np.array([_compute_mask_indices((8, 93), 0.33, 1, min_masks=2).sum(axis=1)
                     for _ in range(2000)])
  # Every example of a batch gets the same count (one epsilon per batch): 30 or 31 of 93.
  assert (ours == ours[:, :1]).all() and (theirs == theirs[:, :1]).all()
  assert set(np.unique(ours)) == set(np.unique(theirs)) == {30, 31}
  # P(31) = frac(0.33 * 93) = 0.69; both within 4 standard errors (0.0103) of it.
  assert abs((ours[:, 0] == 31).mean() - 0.69) < 0.042
  assert abs((theirs[:, 0] == 31).mean() - 0.69) < 0.042


def test_spans_are_contiguous_runs_of_span_frames() -> None:
  rng = np.random.default_rng(1)
  mask = sample_span_mask(rng, 64, 93, mask_prob=0.1, span=5, min_masks=1)
  for row in mask:
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0])))[::2]  # run lengths
    assert (runs >= 5).all() and row.sum() >= 5


def test_padding_frames_are_never_masked_when_honoured() -> None:
  rng = np.random.default_rng(2)
  frame_mask = np.ones((6, 93), dtype=bool)
  frame_mask[0, 50:] = False          # right padding
  frame_mask[1, :20] = False          # left padding (the original assumed right padding only)
  frame_mask[2, 30:40] = False        # a hole
  for _ in range(200):
    mask = sample_span_mask(rng, 6, 93, span=2, frame_mask=frame_mask)
    assert not (mask & ~frame_mask).any()
  counts = sample_span_mask(rng, 6, 93, frame_mask=frame_mask).sum(axis=1)
  assert counts[0] in (16, 17)        # int(0.33 * 50 + eps)
  assert counts[3] in (30, 31)


def test_padding_ignored_when_not_honoured_like_the_original() -> None:
  frame_mask = _right_padded_mask([40, 40], 93)
  hits = np.zeros(93, dtype=int)
  rng = np.random.default_rng(3)
  for _ in range(100):
    mask = sample_span_mask(rng, 2, 93, frame_mask=frame_mask, honour_padding=False)
    assert mask.sum(axis=1).tolist() in ([30, 30], [31, 31])
    hits += mask.sum(axis=0)
  assert hits[40:].sum() > 0


def test_bad_arguments_raise_clear_errors() -> None:
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="span must be at least 1"):
    sample_span_mask(rng, 2, 93, span=0)
  with pytest.raises(ValueError, match="at most num_frames"):
    sample_span_mask(rng, 2, 93, span=94)
  with pytest.raises(ValueError, match=r"frame_mask must have shape \(2, 93\)"):
    sample_span_mask(rng, 2, 93, frame_mask=np.ones((2, 92), dtype=bool))
  with pytest.raises(ValueError, match="frame_mask must be bool"):
    sample_span_mask(rng, 2, 93, frame_mask=np.ones((2, 93), dtype=np.int32))
  with pytest.raises(ValueError, match="mask_prob"):
    sample_span_mask(rng, 2, 93, mask_prob=1.5)

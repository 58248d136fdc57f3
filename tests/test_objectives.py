"""The masked-prediction objective against torch.nn.functional.cross_entropy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hubert_ecg_jax.train.objectives import (perplexity, prediction_sums, pretraining_loss,
                                             pretraining_metrics, validation_metrics)

VOCABS = (17, 40)


def masked_prediction_loss(logits, targets, mask_time_indices, frame_mask, alpha=1.0):
  """Loss and metrics of one batch on one device, as the train step computes them."""
  metrics = pretraining_metrics(prediction_sums(logits, targets, mask_time_indices, frame_mask), alpha)
  return metrics["loss"], metrics


def _batch(seed: int = 0, batch: int = 5, frames: int = 93):
  rng = np.random.default_rng(seed)
  logits = tuple(rng.normal(0, 3, (batch, frames, v)).astype(np.float32) for v in VOCABS)
  targets = np.stack([rng.integers(0, v, (batch, frames)) for v in VOCABS], axis=1)  # (b, c, t)
  mask = rng.random((batch, frames)) < 0.33
  frame_mask = np.ones((batch, frames), dtype=bool)
  frame_mask[1, 60:] = False
  frame_mask[3, 10:] = False
  return logits, targets.astype(np.int32), mask, frame_mask


def _torch_loss(logits, targets, select, logits_grad=False):
  total = 0.0
  tensors = [torch.tensor(l, requires_grad=logits_grad) for l in logits]
  for index, tensor in enumerate(tensors):
    labels = torch.tensor(targets[:, index, :]).long()
    keep = torch.tensor(select)
    total = total + F.cross_entropy(tensor[keep], labels[keep])
  return total, tensors


@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.0])
def test_loss_matches_torch_cross_entropy(alpha: float) -> None:
  logits, targets, mask, frame_mask = _batch()
  masked_ref, tensors_m = _torch_loss(logits, targets, mask & frame_mask, logits_grad=True)
  unmasked_ref, tensors_u = _torch_loss(logits, targets, ~mask & frame_mask, logits_grad=True)
  expected = alpha * masked_ref + (1 - alpha) * unmasked_ref
  loss, metrics = masked_prediction_loss(tuple(map(jnp.asarray, logits)), jnp.asarray(targets),
                                         jnp.asarray(mask), jnp.asarray(frame_mask), alpha)
  np.testing.assert_allclose(loss, expected.item(), rtol=1e-6)
  np.testing.assert_allclose(metrics["masked_loss"], masked_ref.item(), rtol=1e-6)
  np.testing.assert_allclose(metrics["unmasked_loss"], unmasked_ref.item(), rtol=1e-6)

  # Gradients with respect to the logits agree too.
  expected.backward()
  grads = jax.grad(lambda ls: masked_prediction_loss(ls, jnp.asarray(targets), jnp.asarray(mask),
                                                     jnp.asarray(frame_mask), alpha)[0])(
                                                         tuple(map(jnp.asarray, logits)))
  for index in range(len(VOCABS)):
    reference = tensors_m[index].grad.numpy() + tensors_u[index].grad.numpy()
    np.testing.assert_allclose(grads[index], reference, atol=1e-7)


def test_accuracy_and_perplexity_against_numpy() -> None:
  logits, targets, mask, frame_mask = _batch(1)
  _, metrics = masked_prediction_loss(tuple(map(jnp.asarray, logits)), jnp.asarray(targets),
                                      jnp.asarray(mask), jnp.asarray(frame_mask))
  predicted = [l.argmax(-1) for l in logits]
  for name, select in (("masked", mask & frame_mask), ("unmasked", ~mask & frame_mask)):
    correct = sum((p == targets[:, i, :])[select].sum() for i, p in enumerate(predicted))
    np.testing.assert_allclose(metrics[f"{name}_accuracy"], correct / (select.sum() * 2), rtol=1e-6)
  for index, p in enumerate(predicted):
    counts = np.bincount(p[frame_mask], minlength=VOCABS[index]) / frame_mask.sum()
    nonzero = counts[counts > 0]
    np.testing.assert_allclose(metrics[f"perplexity_{index}"], np.exp(-(nonzero * np.log(nonzero)).sum()),
                               rtol=1e-5)


def test_perplexity_of_uniform_and_collapsed_usage() -> None:
  np.testing.assert_allclose(perplexity(jnp.ones(50)), 50.0, rtol=1e-5)
  np.testing.assert_allclose(perplexity(jnp.zeros(50).at[3].set(7.0)), 1.0)


def test_sums_split_over_pieces_add_up_to_the_whole_batch_loss() -> None:
  logits, targets, mask, frame_mask = _batch(2, batch=8)
  whole = prediction_sums(logits, targets, mask, frame_mask)
  pieces = [prediction_sums(tuple(l[i:i + 2] for l in logits), targets[i:i + 2], mask[i:i + 2],
                            frame_mask[i:i + 2]) for i in range(0, 8, 2)]
  split = sum(pretraining_loss(p, whole["masked_frames"], whole["unmasked_frames"], 0.6) for p in pieces)
  np.testing.assert_allclose(
      split, pretraining_loss(whole, whole["masked_frames"], whole["unmasked_frames"], 0.6), rtol=1e-6)


def test_validation_is_cross_entropy_over_all_non_padding_frames() -> None:
  logits, targets, _, frame_mask = _batch(3)
  no_mask = np.zeros_like(frame_mask)
  metrics = validation_metrics(prediction_sums(logits, targets, no_mask, frame_mask))
  expected, _ = _torch_loss(logits, targets, frame_mask)
  np.testing.assert_allclose(metrics["loss"], expected.item(), rtol=1e-6)
  predicted = [l.argmax(-1) for l in logits]
  correct = sum((p == targets[:, i, :])[frame_mask].sum() for i, p in enumerate(predicted))
  np.testing.assert_allclose(metrics["accuracy"], correct / (frame_mask.sum() * 2), rtol=1e-6)


def test_codebook_count_mismatch_is_an_error() -> None:
  logits, targets, mask, frame_mask = _batch()
  with pytest.raises(ValueError, match="targets have 2 codebooks but there are 1 logits"):
    prediction_sums(logits[:1], targets, mask, frame_mask)

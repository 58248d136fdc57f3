"""The masked-prediction objective of HuBERT-ECG and its metrics (more: docs/modules.md)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]


def prediction_sums(logits: Sequence[jax.Array], targets: jax.Array, mask_time_indices: jax.Array,
                    frame_mask: jax.Array | None) -> Sums:
  """Sums of cross-entropy, correct predictions and frame counts over a batch.

  Args:
    logits: one (batch, frames, vocab_i) array per codebook.
    targets: (batch, codebooks, frames) int units.
    mask_time_indices: (batch, frames) bool, frames that were replaced by the mask embedding.
    frame_mask: (batch, frames) bool, frames that are not padding, or None for no padding.

  Returns:
    masked_ce / unmasked_ce: cross-entropy summed over selected frames and codebooks;
    masked_correct / unmasked_correct: correct predictions summed likewise;
    masked_frames / unmasked_frames: number of selected frames (each counted once);
    unit_counts_{i}: (vocab_i,) how often each unit of codebook i was predicted on non-padding frames.
  """
  if targets.shape[1] != len(logits):
    raise ValueError(f"targets have {targets.shape[1]} codebooks but there are {len(logits)} logits")
  valid = jnp.ones(mask_time_indices.shape, bool) if frame_mask is None else frame_mask
  masked = mask_time_indices & valid  # (batch, frames)
  unmasked = ~mask_time_indices & valid  # (batch, frames)
  sums: Sums = {
      "masked_ce": jnp.zeros((), jnp.float32), "unmasked_ce": jnp.zeros((), jnp.float32),
      "masked_correct": jnp.zeros((), jnp.float32), "unmasked_correct": jnp.zeros((), jnp.float32),
      "masked_frames": masked.sum().astype(jnp.float32),
      "unmasked_frames": unmasked.sum().astype(jnp.float32),
  }
  for index, codebook_logits in enumerate(logits):
    codebook_logits = codebook_logits.astype(jnp.float32)  # (batch, frames, vocab)
    units = targets[:, index, :]  # (batch, frames)
    log_probs = jax.nn.log_softmax(codebook_logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, units[..., None], axis=-1)[..., 0]  # (batch, frames)
    predicted = jnp.argmax(codebook_logits, axis=-1)  # (batch, frames)
    correct = (predicted == units).astype(jnp.float32)
    sums["masked_ce"] += jnp.where(masked, ce, 0.0).sum()
    sums["unmasked_ce"] += jnp.where(unmasked, ce, 0.0).sum()
    sums["masked_correct"] += jnp.where(masked, correct, 0.0).sum()
    sums["unmasked_correct"] += jnp.where(unmasked, correct, 0.0).sum()
    one_hot = jax.nn.one_hot(predicted, codebook_logits.shape[-1], dtype=jnp.float32)
    sums[f"unit_counts_{index}"] = jnp.where(valid[..., None], one_hot, 0.0).sum(axis=(0, 1))
  return sums


def pretraining_loss(sums: Sums, masked_frames: jax.Array, unmasked_frames: jax.Array,
                     alpha: float) -> jax.Array:
  """alpha * masked CE mean + (1 - alpha) * unmasked CE mean, given the frame counts to divide by.

  The counts are passed apart from `sums` so that a micro-batch on one device can be divided by
  the counts of the whole global batch (then the pieces add up to the global loss). A selection
  with no frames contributes 0.
  """
  loss = jnp.zeros((), jnp.float32)
  if alpha != 0.0:
    loss += alpha * sums["masked_ce"] / jnp.maximum(masked_frames, 1.0)
  if alpha != 1.0:
    loss += (1.0 - alpha) * sums["unmasked_ce"] / jnp.maximum(unmasked_frames, 1.0)
  return loss


def perplexity(unit_counts: jax.Array) -> jax.Array:
  """exp(entropy) of the predicted-unit histogram: how many units the model effectively uses."""
  probs = unit_counts / jnp.maximum(unit_counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return jnp.exp(entropy)


def _codebook_count(sums: Sums) -> int:
  return sum(1 for key in sums if key.startswith("unit_counts_"))


def pretraining_metrics(sums: Sums, alpha: float) -> dict[str, jax.Array]:
  """Loss, its masked and unmasked parts, accuracies and predicted-unit perplexity per codebook."""
  codebooks = _codebook_count(sums)
  masked_frames = jnp.maximum(sums["masked_frames"], 1.0)
  unmasked_frames = jnp.maximum(sums["unmasked_frames"], 1.0)
  metrics = {
      "loss": pretraining_loss(sums, sums["masked_frames"], sums["unmasked_frames"], alpha),
      "masked_loss": sums["masked_ce"] / masked_frames,
      "unmasked_loss": sums["unmasked_ce"] / unmasked_frames,
      "masked_accuracy": sums["masked_correct"] / (masked_frames * codebooks),
      "unmasked_accuracy": sums["unmasked_correct"] / (unmasked_frames * codebooks),
  }
  for index in range(codebooks):
    metrics[f"perplexity_{index}"] = perplexity(sums[f"unit_counts_{index}"])
  return metrics


def validation_metrics(sums: Sums) -> dict[str, jax.Array]:
  """Validation as the original: no masking, CE (summed over codebooks) and accuracy on all frames.

  `sums` come from `prediction_sums` with an all-False mask, so every non-padding frame is unmasked.
  """
  codebooks = _codebook_count(sums)
  frames = jnp.maximum(sums["unmasked_frames"], 1.0)
  metrics = {
      "loss": sums["unmasked_ce"] / frames,
      "accuracy": sums["unmasked_correct"] / (frames * codebooks),
  }
  for index in range(codebooks):
    metrics[f"perplexity_{index}"] = perplexity(sums[f"unit_counts_{index}"])
  return metrics

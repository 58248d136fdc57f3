"""Fine-tuning losses and the loss weights the original computes on the training set.

More in docs/modules.md."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.tasks import check_task

POS_WEIGHT_EPS = 1e-9


def positive_weights(labels: np.ndarray) -> np.ndarray:
  """(N, L) 0/1 training labels -> (L,) float32 w_j = (N - n_j) / (n_j + 1e-9)."""
  labels = np.asarray(labels, dtype=np.float64)
  if labels.ndim != 2 or labels.shape[0] == 0:
    raise ValueError(f"expected training labels of shape (records, labels), found {labels.shape}")
  positives = labels.sum(axis=0)
  return ((labels.shape[0] - positives) / (positives + POS_WEIGHT_EPS)).astype(np.float32)


def class_weights(class_ids: np.ndarray, num_classes: int) -> np.ndarray:
  """(N,) training class indices -> (C,) float32 w_c = C / n_c, indexed by class."""
  class_ids = np.asarray(class_ids)
  if class_ids.ndim != 1 or class_ids.size == 0 or not np.issubdtype(class_ids.dtype, np.integer):
    raise ValueError(f"expected integer class indices of shape (records,), found {class_ids.dtype} "
                     f"{class_ids.shape}")
  if class_ids.min() < 0 or class_ids.max() >= num_classes:
    raise ValueError(f"class indices must lie in [0, {num_classes}), found [{class_ids.min()}, "
                     f"{class_ids.max()}]")
  counts = np.bincount(class_ids, minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training record: "
                     "their weight C / n_c is undefined; drop them or add records")
  return (num_classes / counts).astype(np.float32)


def bce_with_logits_sums(logits: jax.Array, labels: jax.Array, pos_weight: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Sum of torch's BCEWithLogitsLoss(pos_weight) terms over (batch, labels), and their count.

  Per entry: (1 - y) x + (1 + (w - 1) y) softplus(-x), the stable form of
  -[w y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))].
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  log_weight = 1.0 + (pos_weight[None, :] - 1.0) * labels
  terms = (1.0 - labels) * logits + log_weight * jax.nn.softplus(-logits)
  return jnp.sum(terms), jnp.asarray(terms.size, jnp.float32)


def weighted_cross_entropy_sums(logits: jax.Array, class_ids: jax.Array, weights: jax.Array
                                ) -> tuple[jax.Array, jax.Array]:
  """sum_i w_{y_i} (-log softmax(x_i)[y_i]) and sum_i w_{y_i}, as torch's weighted CrossEntropyLoss."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (batch, classes)
  picked = jnp.take_along_axis(log_probs, class_ids[:, None].astype(jnp.int32), axis=-1)[:, 0]
  sample_weights = weights[class_ids]
  return -jnp.sum(sample_weights * picked), jnp.sum(sample_weights)


def squared_error_sums(predictions: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of squared errors over (batch, targets) and the number of entries."""
  errors = predictions.astype(jnp.float32) - targets.astype(jnp.float32)
  return jnp.sum(errors * errors), jnp.asarray(errors.size, jnp.float32)


def loss_sums(task: str, logits: jax.Array, targets: jax.Array, weights: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of the task's loss; loss = numerator / denominator.

  targets: multi_label (batch, labels) 0/1; multi_class (batch,) int; regression (batch, targets).
  weights: pos_weight (labels,) or class weights (classes,); ignored for regression.
  """
  if task == "multi_label":
    return bce_with_logits_sums(logits, targets, weights)
  if task == "multi_class":
    return weighted_cross_entropy_sums(logits, targets, weights)
  check_task(task)
  return squared_error_sums(logits, targets)


def mean_loss(task: str, logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """The task's loss over a whole batch (what torch's loss modules return with mean reduction)."""
  numerator, denominator = loss_sums(task, logits, targets, weights)
  return numerator / denominator

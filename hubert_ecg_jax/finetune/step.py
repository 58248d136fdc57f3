"""The fine-tuning train step: per device, run data-parallel by a launcher of `parallel.py`.

More in docs/modules.md."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.finetune.losses import loss_sums
from hubert_ecg_jax.parallel import AXIS
from hubert_ecg_jax.train.state import TrainState
from hubert_ecg_jax.train.step import apply_update, dropout_key

Batch = dict[str, jax.Array]


def make_train_step(model: HubertECGForClassification, optimizer: optax.GradientTransformation,
                    task: str, loss_weights: np.ndarray, trainable: Any,
                    learning_rate: optax.Schedule | None = None, axis_name: str = AXIS
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The per-device step `(state, local batch) -> (state, metrics)`.

  loss_weights: pos_weight (labels,) or class weights (classes,), ones for no weighting.
  trainable: a tree of Python bools like the params (`freezing.trainable_mask`).
  """
  weights = jnp.asarray(loss_weights, jnp.float32)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    key = dropout_key(state.rng, state.step, axis_name)
    targets = batch["targets"]
    # The global batch's denominator: summed class weights (weighted CE) or the number of entries.
    local_denominator = (jnp.sum(weights[targets]) if task == "multi_class"
                         else jnp.asarray(targets.size, jnp.float32))
    denominator = lax.psum(local_denominator, axis_name)

    def loss_fn(params: Any) -> jax.Array:
      logits = model.apply({"params": params}, batch["x"], attention_mask=batch["attention_mask"],
                           deterministic=False, rngs={"dropout": key})
      return loss_sums(task, logits, targets, weights)[0] / denominator

    local_loss, grads = jax.value_and_grad(loss_fn)(state.params)
    # Frozen gradients are never used: zeros let XLA drop their computation (and the CNN backward).
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    loss = lax.psum(local_loss, axis_name)
    grads = lax.psum(grads, axis_name)
    new_state, metrics = apply_update(state, grads, loss, optimizer, learning_rate, trainable)
    return new_state, {"loss": loss, **metrics}

  return train_step

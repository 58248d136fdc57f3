"""The fine-tuning train step: per device, data-parallel over a ("data",) mesh with `jax.shard_map`.

Each device computes the loss sums of its share of the batch; numerators and denominators are summed
over devices (`lax.psum`) so the gradient is the one of the whole global batch, whatever the number of
devices. Frozen leaves (see `freezing`) are returned untouched, bit for bit; a step with a non-finite
loss or gradient keeps params and optimizer state (and counts itself in the state), as pre-training.

A batch: x (batch, 6000) float32, attention_mask (batch, 6000) int32, targets (see `losses.loss_sums`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.finetune.losses import loss_sums
from hubert_ecg_jax.train.state import TrainState
from hubert_ecg_jax.train.step import AXIS, dropout_key

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
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = jax.tree.map(lambda p, u, t: p + u if t else p, state.params, updates, trainable)
    keep_new = lambda new, old: jnp.where(finite, new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": optax.tree.norm(updates),
               "finite": finite.astype(jnp.float32)}
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate(state.step - state.skipped_steps)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    return state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep_new, new_params, state.params),
        opt_state=jax.tree.map(keep_new, new_opt_state, state.opt_state),
        nonfinite_streak=streak.astype(jnp.int32),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32)), metrics

  return train_step


class DataParallelTrainer:
  """Runs a per-device step with `jax.jit(jax.shard_map(...))` over this host's devices.

  The state is replicated, the batch split along its first axis (its size must be a multiple of
  the device count). Fine-tuning runs on one host (every local device).
  """

  def __init__(self, train_step: Callable, devices: list[jax.Device] | None = None):
    if jax.process_count() > 1:
      raise ValueError(f"fine-tuning runs on one host; this job has {jax.process_count()} "
                       "processes: run it as a single process (it uses every local device)")
    self.mesh = Mesh(np.asarray(devices or jax.local_devices()), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    self._step = jax.jit(
        jax.shard_map(train_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                      check_vma=False),
        donate_argnums=0)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def place_state(self, state: Any) -> Any:
    """The state replicated on the devices, always a copy (the step donates its input)."""
    return jax.device_put(state, self.replicated, may_alias=False)

  def place_batch(self, batch: dict[str, np.ndarray]) -> Batch:
    sizes = {name: np.shape(value)[0] for name, value in batch.items()}
    size = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1 or size % self.num_devices:
      raise ValueError(f"the batch ({sizes}) must have one size, a multiple of the "
                       f"{self.num_devices} devices")
    return jax.device_put(batch, self.batch_sharding)

  def step(self, state: Any, batch: dict[str, np.ndarray]) -> tuple[Any, dict[str, jax.Array]]:
    """One update; metrics stay on the device (read them only when logging)."""
    return self._step(state, self.place_batch(batch))

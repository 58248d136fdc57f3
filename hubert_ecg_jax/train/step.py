"""One per-device masked-prediction train step and an eval step, both with named-axis collectives.

More in docs/modules.md."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from hubert_ecg_jax.model import HubertECG, frame_mask_from_attention_mask
from hubert_ecg_jax.parallel import AXIS
from hubert_ecg_jax.train.objectives import (Sums, prediction_sums, pretraining_loss,
                                             pretraining_metrics)
from hubert_ecg_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _frame_mask(model: HubertECG, batch: Batch) -> jax.Array:
  frames = batch["targets"].shape[-1]
  return frame_mask_from_attention_mask(model.config, batch["attention_mask"], frames)  # (b, frames)


def _forward_sums(model: HubertECG, params: Any, batch: Batch, mask_time_indices: jax.Array,
                  deterministic: bool, rng: jax.Array | None) -> Sums:
  """Encoder, cosine logits and the objective's sums for one (micro-)batch."""
  out = model.apply({"params": params}, batch["x"], attention_mask=batch["attention_mask"],
                    mask_time_indices=mask_time_indices, deterministic=deterministic,
                    rngs=None if rng is None else {"dropout": rng})
  logits = model.apply({"params": params}, out.last_hidden_state, method=HubertECG.logits)
  return prediction_sums(logits, batch["targets"], mask_time_indices, out.frame_mask)


def dropout_key(rng: jax.Array, step: jax.Array, axis_name: str = AXIS) -> jax.Array:
  """This device's dropout key for `step`: differs per step and per device."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(axis_name))


def micro_batch_count(batch: int, devices: int, per_device_batch: int | None) -> int:
  """Micro-batches each device runs (gradient accumulation) for `batch` split over `devices`,
  `per_device_batch` examples at a time; None: the device's whole share at once (1)."""
  if per_device_batch is None:
    return 1
  if per_device_batch < 1:
    raise ValueError(f"per_device_batch must be >= 1 (or None), found {per_device_batch}")
  if batch % (devices * per_device_batch):
    raise ValueError(f"a batch of {batch} over {devices} device(s) does not split into micro-batches "
                     f"of per_device_batch={per_device_batch}: expected a multiple of devices x "
                     f"per_device_batch = {devices * per_device_batch}, found {batch}")
  return batch // (devices * per_device_batch)


def make_train_step(model: HubertECG, optimizer: optax.GradientTransformation, alpha: float = 1.0,
                    per_device_batch: int | None = None,
                    learning_rate: optax.Schedule | None = None,
                    axis_name: str = AXIS) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The per-device train step: `(state, local batch) -> (state, metrics)`.

  Args:
    model: the HuBERT-ECG module (its config sets dropout, layerdrop and the compute dtype).
    optimizer: the optax transformation whose state is `state.opt_state`.
    alpha: weight of the masked-frame loss; 1 - alpha weighs the unmasked frames.
    per_device_batch: examples a device runs at once: its share of the batch is split into
      micro-batches of this size, run one after another (`lax.scan`), and one update applies their
      summed gradients. None: the whole share at once.
    learning_rate: the schedule, to report the rate of this update in the metrics.
    axis_name: the device axis to sum over.

  Non-finite steps are skipped (`apply_update`).
  """

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    local_batch = batch["x"].shape[0]  # this device's share
    micro_batches = micro_batch_count(local_batch, 1, per_device_batch)
    frame_mask = _frame_mask(model, batch)
    masked = batch["mask_time_indices"]
    # Frame counts of the whole global batch: every piece's loss is divided by them.
    masked_frames = lax.psum((masked & frame_mask).sum().astype(jnp.float32), axis_name)
    unmasked_frames = lax.psum((~masked & frame_mask).sum().astype(jnp.float32), axis_name)
    step_key = dropout_key(state.rng, state.step, axis_name)  # micro-batches fold in their index

    def loss_fn(params: Any, piece: Batch, key: jax.Array) -> tuple[jax.Array, Sums]:
      sums = _forward_sums(model, params, piece, piece["mask_time_indices"], False, key)
      return pretraining_loss(sums, masked_frames, unmasked_frames, alpha), sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
      (_, sums), grads = grad_fn(state.params, batch, step_key)
    else:
      pieces = jax.tree.map(
          lambda a: a.reshape(micro_batches, local_batch // micro_batches, *a.shape[1:]), batch)

      def accumulate(carry: tuple[Any, Sums], inputs: tuple[jax.Array, Batch]):
        grads_sum, sums_sum = carry
        index, piece = inputs
        (_, sums), grads = grad_fn(state.params, piece, jax.random.fold_in(step_key, index))
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, sums_sum, sums)), None

      zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, jax.tree.map(lambda a: a[0], pieces), step_key)[0][1]))
      zero_grads = jax.tree.map(jnp.zeros_like, state.params)
      (grads, sums), _ = lax.scan(accumulate, (zero_grads, zero_sums),
                                  (jnp.arange(micro_batches), pieces))
    grads = lax.psum(grads, axis_name)
    sums = lax.psum(sums, axis_name)

    metrics = pretraining_metrics(sums, alpha)
    new_state, update_metrics = apply_update(state, grads, metrics["loss"], optimizer, learning_rate)
    return new_state, {**metrics, **update_metrics, "param_norm": optax.tree.norm(state.params)}

  return train_step


def apply_update(state: TrainState, grads: Any, loss: jax.Array,
                 optimizer: optax.GradientTransformation, learning_rate: optax.Schedule | None,
                 trainable: Any = None) -> tuple[TrainState, Metrics]:
  """The update tail of every train step: the optimizer update, kept only when finite.

  A step whose loss or gradients are not all finite keeps params and optimizer state, increments
  `nonfinite_streak` and `skipped_steps`; a finite step resets the streak. `step` always advances.
  trainable: a tree of Python bools like the params (None: all); frozen leaves stay bit for bit.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  trainable = jax.tree.map(lambda _: True, state.params) if trainable is None else trainable
  new_params = jax.tree.map(lambda p, u, t: p + u if t else p, state.params, updates, trainable)
  keep_new = lambda new, old: jnp.where(finite, new, old)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
  metrics = {"grad_norm": grad_norm, "update_norm": optax.tree.norm(updates),
             "finite": finite.astype(jnp.float32), "nonfinite_streak": streak.astype(jnp.float32)}
  if learning_rate is not None:
    # Skipped steps applied no update: the schedule has advanced by the others only.
    metrics["learning_rate"] = learning_rate(state.step - state.skipped_steps)
  return state.replace(
      step=state.step + 1,
      params=jax.tree.map(keep_new, new_params, state.params),
      opt_state=jax.tree.map(keep_new, new_opt_state, state.opt_state),
      nonfinite_streak=streak,
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32)), metrics


def make_eval_step(model: HubertECG, axis_name: str = AXIS) -> Callable[[Any, Batch], Sums]:
  """The per-device validation step: `(params, local batch) -> sums` over the global batch.

  No masking and no dropout; the sums of several batches add up, and
  `objectives.validation_metrics` turns the total into CE and accuracy over all frames.
  """

  def eval_step(params: Any, batch: Batch) -> Sums:
    targets = batch["targets"]  # (batch, codebooks, frames)
    no_mask = jnp.zeros((targets.shape[0], targets.shape[-1]), bool)
    sums = _forward_sums(model, params, batch, no_mask, True, None)
    return lax.psum(sums, axis_name)

  return eval_step

"""Which parts of an ECG a fine-tuned classifier's finding rests on: per-sample input attributions.

f(x) is the chosen finding's logit (the output before the sigmoid or softmax: monotone in its
probability and not flattened by saturation) on the model input x (batch, 6000), the attention mask
held fixed. Two methods, both batched and jitted:

- "integrated_gradients" (default): (x - x0) * integral_0^1 grad f(x0 + a (x - x0)) da from the
  baseline x0: zeros by default, the input of an ECG whose every lead sits at the middle of its
  [-1, 1] range. Complete: the attributions of a sample sum to f(x) - f(x0), up to the integration
  error. The integral is taken over a = t**3 with the midpoint rule in t (`steps` points, default
  128; weight 3 t**2 / steps each), which puts the points close to the baseline: the feature
  encoder's first layer normalises each channel over time (GroupNorm, no conv bias), so f is nearly
  invariant to the scale of x and changes mostly for a < 0.1; equal steps in a would miss that.
- "gradient_x_input": x * grad f(x), one backward pass (the cheap option; no completeness).

Leads. The model input is a 5-s window of the 12 prepared leads at 500 Hz (12, 2500), flattened
lead-major to 30000 samples and decimated by 5 over the flattened vector (`data.preprocess`), so
input sample i belongs to lead i // 500 at time (i % 500) / 100 s into the window: `lead_attributions`
reshapes (batch, 6000) to (batch, 12, 500), and `record_heat` lays the windows of a record on its
time axis at 100 Hz. (The decimation filter crosses lead boundaries, so the first and last few
samples of a lead's block carry a little of its neighbours too.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.data.preprocess import DECIMATION_FACTOR, MODEL_FS, STANDARD_LEADS
from hubert_ecg_jax.evaluate.snomed import resolve_label
from hubert_ecg_jax.lead_subsets import SAMPLES_PER_LEAD

METHODS = ("integrated_gradients", "gradient_x_input")
DEFAULT_STEPS = 128
PATH_POWER = 3  # integration points a = t**3 at the midpoints t of `steps` equal parts of [0, 1]
HEAT_FS = MODEL_FS  # the rate of `record_heat`'s time axis


def attribution_fn(model: Any, output_index: int, method: str = "integrated_gradients",
                   steps: int = DEFAULT_STEPS) -> Callable:
  """(params, x (B, 6000), mask (B, 6000), baseline (B, 6000)) -> attributions (B, 6000), jitted."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, found {method!r}")
  if steps < 1:
    raise ValueError(f"steps must be at least 1, found {steps}")

  def finding_logit_sum(params: Any, x: jax.Array, mask: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, x, attention_mask=mask, deterministic=True)
    return logits[:, output_index].astype(jnp.float32).sum()  # samples are independent

  gradient = jax.grad(finding_logit_sum, argnums=1)

  def attribute(params: Any, x: jax.Array, mask: jax.Array, baseline: jax.Array) -> jax.Array:
    if method == "gradient_x_input":
      return x * gradient(params, x, mask)
    t = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps  # midpoints of [0, 1]
    alphas = t ** PATH_POWER  # (steps,) denser near the baseline
    weights = PATH_POWER * t ** (PATH_POWER - 1) / steps  # d alpha / dt, times dt

    def accumulate(total: jax.Array, step: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
      alpha, weight = step
      return total + weight * gradient(params, baseline + alpha * (x - baseline), mask), None

    total, _ = jax.lax.scan(accumulate, jnp.zeros_like(x), (alphas, weights))
    return (x - baseline) * total

  return jax.jit(attribute)


@dataclasses.dataclass
class Attributions:
  """Attributions of one finding for a batch of model inputs."""
  finding: str
  output_index: int
  method: str
  steps: int
  values: np.ndarray  # (batch, 6000) per input sample
  logit: np.ndarray  # (batch,) f(x)
  baseline_logit: np.ndarray  # (batch,) f(baseline)

  @property
  def per_lead(self) -> np.ndarray:
    """(batch, 12, 500): the values by lead and 100-Hz time step (see the module docstring)."""
    return lead_attributions(self.values)


def attribute(classifier: Any, x: Any, mask: Any, finding: str | int,
              method: str = "integrated_gradients", steps: int = DEFAULT_STEPS,
              baseline: Any = None, batch_size: int = 16) -> Attributions:
  """Attributions of `finding` (an output name, its SNOMED abbreviation or name, or an index) of a
  `inference.Classifier` for model inputs x, mask (B, 6000) (`preprocess_ecg` / `model_inputs`);
  `baseline` (B, 6000) or (6000,) defaults to zeros."""
  names = list(classifier.task.output_names)
  descriptions = classifier.metadata.get("label_descriptions")
  index = finding if isinstance(finding, int) else resolve_label(finding, names, descriptions)
  x = np.atleast_2d(np.asarray(x, np.float32))
  mask = np.atleast_2d(np.asarray(mask, np.int32))
  baseline = np.zeros_like(x) if baseline is None else np.broadcast_to(
      np.asarray(baseline, np.float32), x.shape)
  model = classifier.model
  attribute_batch = attribution_fn(model, index, method, steps)
  logits = jax.jit(lambda p, v, m: model.apply({"params": p}, v, attention_mask=m,
                                               deterministic=True)[:, index])
  values, logit, baseline_logit = [], [], []
  for start in range(0, len(x), batch_size):
    part = slice(start, start + batch_size)
    values.append(np.asarray(attribute_batch(classifier.params, x[part], mask[part], baseline[part])))
    logit.append(np.asarray(logits(classifier.params, x[part], mask[part])))
    baseline_logit.append(np.asarray(logits(classifier.params, baseline[part], mask[part])))
  return Attributions(names[index], index, method, steps, np.concatenate(values),
                      np.concatenate(logit), np.concatenate(baseline_logit))


def lead_attributions(values: Any) -> np.ndarray:
  """(batch, 6000) model-input attributions -> (batch, 12, 500): lead i // 500, time step i % 500."""
  values = np.asarray(values)
  if values.ndim != 2 or values.shape[1] != len(STANDARD_LEADS) * SAMPLES_PER_LEAD:
    raise ValueError(f"expected attributions of shape (batch, {len(STANDARD_LEADS) * SAMPLES_PER_LEAD})"
                     f", found {values.shape}")
  return values.reshape(len(values), len(STANDARD_LEADS), SAMPLES_PER_LEAD)


def lead_shares(values: Any) -> np.ndarray:
  """(batch, 6000) -> (batch, 12): each lead's share of the sample's total absolute attribution."""
  magnitude = np.abs(lead_attributions(values)).sum(axis=2)  # (batch, 12)
  return magnitude / np.maximum(magnitude.sum(axis=1, keepdims=True), 1e-30)


def record_heat(values: Any, offsets_500hz: Any, num_samples_500hz: int) -> np.ndarray:
  """Absolute attributions of a record's windows (k, 6000) at their 500-Hz start offsets (k,) ->
  (12, ceil(n / 5)) on the record's 100-Hz time axis, averaged where windows overlap."""
  per_lead = np.abs(lead_attributions(values))  # (k, 12, 500)
  length = -(-int(num_samples_500hz) // DECIMATION_FACTOR)
  heat = np.zeros((len(STANDARD_LEADS), length))
  count = np.zeros(length)
  for window, offset in zip(per_lead, np.asarray(offsets_500hz)):
    start = int(offset) // DECIMATION_FACTOR
    stop = min(start + SAMPLES_PER_LEAD, length)
    heat[:, start:stop] += window[:, :stop - start]
    count[start:stop] += 1
  return heat / np.maximum(count, 1)

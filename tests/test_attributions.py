"""Attributions of a finding: completeness of integrated gradients, gradient x input, lead mapping,
and the heat drawn under the 12-lead plot."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from hubert_ecg_jax import plots
from hubert_ecg_jax.attributions import attribute, lead_attributions, lead_shares, record_heat
from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, model_inputs, prepare_record, crop_window
from hubert_ecg_jax.data.readers import read_record
from hubert_ecg_jax.tasks import Task
from hubert_ecg_jax.inference import Classifier

NAMES = ("164889003", "426783006", "59118001")  # AF, sinus rhythm, RBBB


@pytest.fixture(scope="module")
def classifier() -> Classifier:
  """A tiny classifier whose every parameter, biases and norm offsets included, is perturbed as
  training leaves them (at initialisation they are zeros, and f(a x) then jumps from f(0) within
  a < 1e-14: stacked LayerNorms amplify tiny inputs by 1/sqrt(eps) each)."""
  config = HubertECGConfig.preset("tiny")
  model = HubertECGForClassification(config, len(NAMES))
  params = jax.jit(lambda key: model.init({"params": key}, jnp.zeros((1, 400))))(jax.random.key(3))
  leaves, tree = jax.tree.flatten(params["params"])
  keys = jax.random.split(jax.random.key(11), len(leaves))
  params = jax.tree.unflatten(tree, [leaf + 0.1 * jax.random.normal(key, leaf.shape)
                                     for leaf, key in zip(leaves, keys)])
  return Classifier(config, params, Task("multi_label", NAMES, NAMES), None, None, {})


@pytest.fixture(scope="module")
def inputs(sample_data_dir) -> tuple[np.ndarray, np.ndarray]:
  """Model inputs (3, 6000) of the first 5 s of three real records."""
  windows = []
  for header in sorted(sample_data_dir.glob("*.hea"))[:3]:
    record = read_record(header)
    windows.append(crop_window(prepare_record(record.signal, record.fs, record.lead_names), 0))
  return model_inputs(np.stack(windows))


def test_integrated_gradients_are_complete_at_128_steps(classifier, inputs):
  x, mask = inputs
  result = attribute(classifier, x, mask, "RBBB", steps=128, batch_size=2)  # two batches
  assert result.finding == "59118001" and result.values.shape == (3, 6000)
  difference = result.logit - result.baseline_logit  # f(x) - f(0)
  assert (np.abs(difference) > 1e-3).all()
  np.testing.assert_allclose(result.values.sum(axis=1), difference, rtol=0.02)
  # The logits are the model's own outputs for the finding.
  logits = classifier.model.apply({"params": classifier.params}, x, attention_mask=mask,
                                  deterministic=True)
  np.testing.assert_allclose(result.logit, np.asarray(logits)[:, 2], rtol=1e-5, atol=1e-5)


def test_gradient_x_input_and_a_custom_baseline(classifier, inputs):
  x, mask = inputs
  cheap = attribute(classifier, x[:1], mask[:1], "atrial fibrillation", method="gradient_x_input")
  grad = jax.grad(lambda v: classifier.model.apply({"params": classifier.params}, v,
                                                   attention_mask=mask[:1], deterministic=True)[0, 0])
  np.testing.assert_allclose(cheap.values, x[:1] * np.asarray(grad(jnp.asarray(x[:1]))),
                             rtol=1e-4, atol=1e-7)
  baseline = np.full(6000, 0.1, np.float32)
  shifted = attribute(classifier, x[:1], mask[:1], 0, steps=128, baseline=baseline)
  np.testing.assert_allclose(shifted.values.sum(), shifted.logit[0] - shifted.baseline_logit[0],
                             rtol=0.02)
  with pytest.raises(ValueError, match="method must be one of"):
    attribute(classifier, x[:1], mask[:1], 0, method="saliency")


def test_attributions_map_to_leads_in_blocks_of_500():
  values = np.zeros((2, 6000))
  values[0, 500 * STANDARD_LEADS.index("V1") + 7] = -3.0  # V1, 70 ms into the window
  values[1, :] = 1.0
  per_lead = lead_attributions(values)
  assert per_lead.shape == (2, 12, 500) and per_lead[0, 6, 7] == -3.0
  shares = lead_shares(values)
  np.testing.assert_allclose(shares[0], np.eye(12)[6])
  np.testing.assert_allclose(shares[1], np.full(12, 1 / 12))
  # Two windows of a 7-s record (3500 samples at 500 Hz) at offsets 0 and 1000: 100-Hz heat of
  # 700 steps, the overlap (steps 200-499) averaged.
  heat = record_heat(np.stack([np.ones(6000), 3 * np.ones(6000)]), [0, 1000], 3500)
  assert heat.shape == (12, 700)
  np.testing.assert_allclose(heat[:, [0, 199, 200, 499, 500, 699]], [[1, 1, 2, 2, 3, 3]] * 12)


def test_heat_is_drawn_under_the_traces(sample_data_dir, tmp_path):
  record = read_record(sorted(sample_data_dir.glob("*.hea"))[0])
  heat = np.zeros((12, 1000))
  heat[STANDARD_LEADS.index("II"), 100:200] = 1.0
  plain = plots.plot_ecg(record.signal, record.fs, tmp_path / "plain.png", record.lead_names)
  heated = plots.plot_ecg(record.signal, record.fs, tmp_path / "heat.png", record.lead_names,
                          heat=heat, heat_label="heat: |attribution| of AF")
  cold = plots.plot_ecg(record.signal, record.fs, tmp_path / "cold.png", record.lead_names,
                        heat=np.zeros((12, 1000)))
  plain_pixels, heated_pixels = mpimg.imread(plain), mpimg.imread(heated)
  assert plain_pixels.shape == heated_pixels.shape
  # 1 s of lead II in the grid and in the rhythm strip: two bands of about 150 x 140 pixels at
  # 150 dpi, where the paper turns red (less green and blue than red).
  changed = np.abs(heated_pixels - plain_pixels)[..., :3].max(axis=2) > 0.1
  redness = lambda image: image[..., 0] - image[..., 1]  # noqa: E731
  redder = redness(heated_pixels) - redness(plain_pixels)
  assert changed.sum() > 20_000 and (redder[changed] > 0).mean() > 0.9
  np.testing.assert_array_equal(mpimg.imread(cold), plain_pixels)  # no heat, nothing drawn
  with pytest.raises(ValueError, match="expected heat of shape"):
    plots.plot_ecg(record.signal, record.fs, tmp_path / "bad.png", record.lead_names,
                   heat=-np.ones((12, 10)))

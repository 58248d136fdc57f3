"""One whole training step against PyTorch autograd: the loss and every gradient leaf.

The reference is transformers' HubertModel with HuBERT-ECG's heads (`torch_reference`), the same
random weights (weight-norm g and v, norms and the mask embedding included), the same span masks
and a padded record, and torch's cross-entropy on the cosine logits: alpha-weighted means over the
masked and the unmasked non-padding frames, summed over two codebooks. Our side is the real train
step, run by the launcher, with an "optimizer" that keeps the gradients it receives as its state,
so the gradients read are exactly those the step hands to AdamW, after the sum over devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.convert import flax_to_state_dict
from hubert_ecg_jax.devtools.torch_reference import ecg_like_batch, make_reference
from hubert_ecg_jax.model import HubertECG, frame_mask_from_attention_mask
from hubert_ecg_jax.parallel import MeshLauncher
from hubert_ecg_jax.pretrained import params_from_state_dict
from hubert_ecg_jax.data.masking import sample_span_mask
from hubert_ecg_jax.train.state import create_train_state
from hubert_ecg_jax.train.step import make_eval_step, make_train_step

CONFIG = HubertECGConfig.preset("tiny", vocab_sizes=(20, 30), ensemble_length=2, hidden_dropout=0.0,
                                attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
ALPHA = 0.7  # both terms of the loss carry weight
BATCH = 16
GRAD_ATOL = 1e-5  # relative to each leaf's largest gradient


def keep_gradients() -> optax.GradientTransformation:
  """Applies no update and keeps the last gradients as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(5)
  x = ecg_like_batch(BATCH, seed=5)
  attention_mask = np.ones_like(x, np.int32)
  attention_mask[1, 4000:] = 0  # a padded record: its last frames count nowhere
  frame_mask = np.asarray(frame_mask_from_attention_mask(CONFIG, jnp.asarray(attention_mask), 93))
  targets = np.stack([rng.integers(0, v, (BATCH, 93)) for v in CONFIG.vocab_sizes], 1)
  return {"x": x, "attention_mask": attention_mask, "targets": targets.astype(np.int32),
          "mask_time_indices": sample_span_mask(rng, BATCH, 93, frame_mask=frame_mask)}


@pytest.fixture(scope="module")
def torch_side(batch):
  """(reference model, loss, {parameter name: gradient}) from PyTorch autograd."""
  reference = make_reference(CONFIG, seed=11).train()
  out = reference.hubert(torch.from_numpy(batch["x"]),
                         attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                         mask_time_indices=torch.from_numpy(batch["mask_time_indices"]))
  valid = torch.from_numpy(np.array(frame_mask_from_attention_mask(
      CONFIG, jnp.asarray(batch["attention_mask"]), 93)))
  masked = torch.from_numpy(batch["mask_time_indices"]) & valid
  unmasked = ~torch.from_numpy(batch["mask_time_indices"]) & valid
  targets = torch.from_numpy(batch["targets"]).long()
  loss = 0.0
  for index, logits in enumerate(reference.logits(out.last_hidden_state)):
    units = targets[:, index]
    loss = loss + ALPHA * F.cross_entropy(logits[masked], units[masked])
    loss = loss + (1 - ALPHA) * F.cross_entropy(logits[unmasked], units[unmasked])
  loss.backward()
  gradients = {name.removeprefix("hubert."): p.grad.numpy() for name, p in reference.named_parameters()}
  return reference, loss.item(), gradients


# 4 devices x 2 micro-batches of 2 (a share of 4 each)
@pytest.mark.parametrize("devices, per_device_batch", [(1, None), (4, 2)])
def test_step_loss_and_every_gradient_match_torch(batch, torch_side, devices, per_device_batch):
  reference, torch_loss, torch_gradients = torch_side
  params, _ = params_from_state_dict(CONFIG, reference.state_dict_like_original())
  model = HubertECG(CONFIG)
  optimizer = keep_gradients()
  step = make_train_step(model, optimizer, alpha=ALPHA, per_device_batch=per_device_batch)
  launcher = MeshLauncher(step, make_eval_step(model), jax.devices()[:devices])
  state = launcher.place_state(create_train_state(params, optimizer, jax.random.PRNGKey(0)))
  state, metrics = launcher.train_step(state, launcher.place_batch(batch))
  assert abs(float(launcher.to_host(metrics)["loss"]) - torch_loss) <= 1e-5 * abs(torch_loss)
  ours = flax_to_state_dict(jax.tree.map(np.asarray, launcher.to_host(state.opt_state)))
  assert sorted(ours) == sorted(torch_gradients)
  assert "masked_spec_embed" in ours and any("original0" in name for name in ours)
  largest = max(np.abs(g).max() for g in torch_gradients.values())
  for name, theirs in torch_gradients.items():
    if name.endswith("k_proj.bias"):
      # Exactly zero in exact arithmetic (a key bias shifts every score of a query alike, and the
      # softmax ignores that): both sides hold rounding noise only.
      assert max(np.abs(ours[name]).max(), np.abs(theirs).max()) <= 1e-7 * largest, name
      continue
    scale = np.abs(theirs).max()
    assert scale > 1e-3 * largest, f"{name}: no real gradient in the reference"
    np.testing.assert_allclose(ours[name], theirs, rtol=0, atol=GRAD_ATOL * scale, err_msg=name)

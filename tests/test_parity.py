"""Numeric parity with `transformers.HubertModel` (float32, eval mode): every hidden state and the
pretraining logits within 1e-4, for the tiny config and the released sizes, with and without padding."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from hubert_ecg_jax import HubertECG, HubertECGConfig
from hubert_ecg_jax.devtools.torch_reference import ecg_like_batch, make_reference
from hubert_ecg_jax.pretrained import params_from_state_dict

TOLERANCE = 1e-4


def _padding_mask(batch: int, length: int) -> np.ndarray:
  mask = np.ones((batch, length), np.int32)
  mask[0, length - 1700:] = 0  # first record padded at the end; the others are whole
  return mask


def assert_parity(config: HubertECGConfig, batch: int, seed: int) -> None:
  reference = make_reference(config, seed)
  params, _ = params_from_state_dict(config, reference.state_dict_like_original())
  model = HubertECG(config)
  x = ecg_like_batch(batch, seed=seed)
  for attention_mask in (None, _padding_mask(batch, x.shape[1])):
    torch_hidden, torch_logits = reference.forward_all(x, attention_mask)
    out = model.apply({"params": params}, jnp.asarray(x),
                      attention_mask=None if attention_mask is None else jnp.asarray(attention_mask),
                      output_hidden_states=True)
    logits = model.apply({"params": params}, out.last_hidden_state, method=HubertECG.logits)
    assert len(out.hidden_states) == config.num_hidden_layers + 1 == len(torch_hidden)
    # Padded frames are compared too: both sides compute the same values there.
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, torch_hidden)):
      diff = np.abs(np.asarray(ours) - theirs)
      assert diff.max() <= TOLERANCE, f"hidden state {i}: max |diff| {diff.max():.2e}"
    for ours, theirs in zip(logits, torch_logits):
      diff = np.abs(np.asarray(ours) - theirs)
      assert diff.max() <= TOLERANCE, f"logits: max |diff| {diff.max():.2e}"


def test_parity_tiny():
  assert_parity(HubertECGConfig.preset("tiny", vocab_sizes=(20, 30), ensemble_length=2), batch=3, seed=1)


def test_parity_tiny_variants():
  """Layer-norm conv encoder, conv bias, pre-LN ("stable") encoder, other downsampling."""
  config = HubertECGConfig.preset("tiny", downsampling="x10", feat_extract_norm="layer",
                                  conv_bias=True, do_stable_layer_norm=True)
  assert_parity(config, batch=2, seed=2)


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_parity_released_sizes(size):
  assert_parity(HubertECGConfig.preset(size), batch=2, seed=3)

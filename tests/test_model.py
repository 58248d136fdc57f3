"""Model behaviour beyond eval-mode parity: span-mask embedding, dropout, layerdrop under jit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hubert_ecg_jax import HubertECG, HubertECGConfig
from hubert_ecg_jax.devtools.torch_reference import ecg_like_batch, make_reference
from hubert_ecg_jax.pretrained import params_from_state_dict

CONFIG = HubertECGConfig.preset("tiny")


def test_mask_time_indices_match_transformers():
  reference = make_reference(CONFIG, seed=5)
  params, _ = params_from_state_dict(CONFIG, reference.state_dict_like_original())
  x = ecg_like_batch(2, seed=5)
  mask = np.zeros((2, 93), bool)
  mask[0, [3, 4, 50]] = True
  mask[1, 10:40] = True
  with torch.no_grad():
    theirs = reference.hubert(torch.from_numpy(x), mask_time_indices=torch.from_numpy(mask))
  ours = HubertECG(CONFIG).apply({"params": params}, jnp.asarray(x),
                                 mask_time_indices=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(ours.last_hidden_state), theirs.last_hidden_state.numpy(),
                             atol=1e-4, rtol=0)


def _init(config):
  model = HubertECG(config)
  return model, model.init({"params": jax.random.key(0)}, jnp.zeros((1, 6000)))["params"]


def test_dropout_is_random_per_key_and_off_when_deterministic():
  model, params = _init(CONFIG.replace(hidden_dropout=0.3, layerdrop=0.0))
  x = jnp.asarray(ecg_like_batch(2))
  run = jax.jit(lambda key: model.apply({"params": params}, x, deterministic=False,
                                        rngs={"dropout": key}).last_hidden_state)
  a, b, a_again = run(jax.random.key(1)), run(jax.random.key(2)), run(jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a_again)
  eval_a = model.apply({"params": params}, x).last_hidden_state
  eval_b = model.apply({"params": params}, x, deterministic=True).last_hidden_state
  np.testing.assert_array_equal(eval_a, eval_b)


def test_layerdrop_under_jit_skips_whole_layers():
  config = CONFIG.replace(layerdrop=1.0, hidden_dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0)
  model, params = _init(config)
  x = jnp.asarray(ecg_like_batch(2))
  out = jax.jit(lambda key: model.apply({"params": params}, x, deterministic=False,
                                        output_hidden_states=True, rngs={"dropout": key}))(
                                            jax.random.key(0))
  # Every layer dropped: the output is the encoder input (after positional conv and LayerNorm).
  np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[0])
  kept = model.apply({"params": params}, x, output_hidden_states=True)  # eval: no layerdrop
  assert not np.allclose(kept.last_hidden_state, kept.hidden_states[0])


def test_num_frames_and_receptive_field():
  config = HubertECGConfig.preset("base")
  assert config.num_frames(6000) == 93 and config.num_frames(12000) == 187
  assert config.receptive_field == 82 and config.frame_hop == 64 and config.min_input_length == 82


def test_remat_recomputes_layers_with_the_same_gradients():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 6000)).astype(np.float32))
  gradients, jaxprs = {}, {}
  for remat in (False, True):
    config = HubertECGConfig.preset("tiny", remat=remat, layerdrop=0.0)
    model = HubertECG(config)
    params = model.init({"params": jax.random.key(0)}, x[:1])["params"]

    def loss(p):
      out = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
      return (out.last_hidden_state ** 2).mean()

    gradients[remat] = jax.jit(jax.grad(loss))(params)
    jaxprs[remat] = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert "remat" in jaxprs[True] and "remat" not in jaxprs[False]  # jax.checkpoint's primitive
  for ours, theirs in zip(jax.tree.leaves(gradients[True]), jax.tree.leaves(gradients[False])):
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
  assert "remat" not in HubertECGConfig.preset("tiny", remat=True).to_hf_dict()

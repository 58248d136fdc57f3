"""The per-device train step: 1 device == pmap over 8 == shard_map over 8 == micro-batches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.parallel import data_mesh, make_launcher
from hubert_ecg_jax.data.masking import sample_span_mask
from hubert_ecg_jax.train.optimizer import OptimizerConfig, make_optimizer
from hubert_ecg_jax.train.state import create_train_state, init_params, next_iteration_params
from hubert_ecg_jax.train.step import dropout_key, make_eval_step, make_train_step

BATCH = 16
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)


def _batch(seed: int, batch: int = BATCH) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  attention_mask = np.ones((batch, 6000), np.int32)
  attention_mask[3, 4000:] = 0  # one padded example: its last frames count nowhere
  return {"x": rng.normal(size=(batch, 6000)).astype(np.float32),
          "attention_mask": attention_mask,
          "targets": rng.integers(0, 100, (batch, 1, 93)).astype(np.int32),
          "mask_time_indices": sample_span_mask(rng, batch, 93)}


def _host(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


@pytest.fixture(scope="module")
def setup():
  config = HubertECGConfig.preset("tiny", num_hidden_layers=1, **NO_DROPOUT)
  optimizer_config = OptimizerConfig(total_steps=10, learning_rate=1e-4, grad_clip_norm=1.0)
  optimizer = make_optimizer(optimizer_config)
  init_key, dropout = jax.random.split(jax.random.PRNGKey(0))  # a state from scratch, seed 0
  state = jax.tree.map(np.asarray, create_train_state(init_params(config, init_key), optimizer, dropout))
  return config, optimizer_config, optimizer, state


def _run(setup, kind: str, devices, per_device_batch: int | None, batches):
  config, optimizer_config, optimizer, state = setup
  model = HubertECG(config)
  train_step = make_train_step(model, optimizer, per_device_batch=per_device_batch,
                               learning_rate=optimizer_config.schedule())
  launcher = make_launcher(kind, train_step, make_eval_step(model), devices)
  state = launcher.place_state(state)
  history = []
  for batch in batches:
    state, metrics = launcher.train_step(state, launcher.place_batch(batch))
    history.append(launcher.to_host(metrics))
  return launcher, _host(launcher.checkpoint_view(state)), history


@pytest.fixture(scope="module")
def single_device(setup):
  return _run(setup, "mesh", jax.devices()[:1], None, [_batch(i) for i in range(3)])


# per_device_batch 1: each of 8 devices runs its share of 2 as 2 micro-batches of 1.
@pytest.mark.parametrize("kind,devices,per_device_batch", [
    ("mesh", 8, None), ("pmap", 8, None), ("mesh", 8, 1)],
    ids=["shard_map-8", "pmap-8", "shard_map-8-accumulate-2"])
def test_same_params_as_one_device(setup, single_device, kind: str, devices: int,
                                   per_device_batch: int | None) -> None:
  _, reference, reference_history = single_device
  _, state, history = _run(setup, kind, jax.devices()[:devices], per_device_batch,
                           [_batch(i) for i in range(3)])
  for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  # Relative to each leaf's scale: Adam's second moments are ~1e-7, so an absolute 1e-5 says nothing.
  # The floor (1e-6 of the largest moment) is for the key biases, whose gradient is zero but for
  # rounding (the softmax ignores them).
  moments = jax.tree.leaves(reference.opt_state)
  floor = 1e-6 * max(np.abs(m).max() for m in moments)
  for ours, theirs in zip(jax.tree.leaves(state.opt_state), moments):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * max(np.abs(theirs).max(), floor))
  assert int(state.step) == 3
  # The gradients themselves agree (AdamW would hide a scale error in them).
  for ours, theirs in zip(history, reference_history):
    for name in ("loss", "grad_norm", "masked_accuracy", "perplexity_0", "learning_rate"):
      np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-5)


def test_metrics_are_those_of_the_whole_batch(single_device) -> None:
  _, _, history = single_device
  first = history[0]
  assert first["finite"] == 1.0 and first["learning_rate"] == 0.0  # warmup starts at 0, as torch
  assert history[1]["learning_rate"] == pytest.approx(1e-4)
  assert 0.0 < first["grad_norm"] and 0.0 < first["param_norm"]
  assert np.isclose(first["loss"], first["masked_loss"])  # alpha = 1: masked frames only


def test_non_finite_step_changes_nothing_and_is_counted(setup, single_device) -> None:
  launcher, trained, _ = single_device
  state = launcher.place_state(trained)
  bad = _batch(5)
  bad["x"][2, 100] = np.nan
  for expected_streak in (1, 2):
    state, metrics = launcher.train_step(state, launcher.place_batch(bad))
    host = _host(launcher.checkpoint_view(state))
    assert launcher.to_host(metrics)["finite"] == 0.0
    assert int(host.nonfinite_streak) == expected_streak and int(host.skipped_steps) == expected_streak
    for ours, theirs in zip(jax.tree.leaves((host.params, host.opt_state)),
                            jax.tree.leaves((trained.params, trained.opt_state))):
      np.testing.assert_array_equal(ours, theirs)
  state, metrics = launcher.train_step(state, launcher.place_batch(_batch(6)))
  host = _host(launcher.checkpoint_view(state))
  assert int(host.nonfinite_streak) == 0 and int(host.skipped_steps) == 2 and int(host.step) == 6
  assert not np.array_equal(host.params["masked_spec_embed"], trained.params["masked_spec_embed"])


def test_eval_step_sums_over_all_non_padding_frames(single_device) -> None:
  launcher, trained, _ = single_device
  sums = launcher.to_host(launcher.eval_step(launcher.place_state(trained),
                                             launcher.place_batch(_batch(7))))
  assert sums["unmasked_frames"] == BATCH * 93 - (93 - 62)  # example 3: 4000 samples -> 62 frames
  assert sums["masked_frames"] == 0


def test_dropout_keys_differ_per_device_and_step() -> None:
  rng = jax.random.PRNGKey(0)
  keys = jax.jit(jax.shard_map(lambda step: dropout_key(rng, step)[None], mesh=data_mesh(),
                               in_specs=P(), out_specs=P("data"), check_vma=False))
  step_3, step_4 = np.asarray(keys(jnp.int32(3))), np.asarray(keys(jnp.int32(4)))
  assert len({tuple(k) for k in np.concatenate([step_3, step_4])}) == 16


def test_per_device_batch_must_divide_the_device_batch(setup) -> None:
  config, _, optimizer, state = setup
  launcher = make_launcher("mesh", make_train_step(HubertECG(config), optimizer, per_device_batch=3),
                           make_eval_step(HubertECG(config)), jax.devices()[:1])
  with pytest.raises(ValueError, match=r"a batch of 8 over 1 device\(s\) does not split into "
                                       r"micro-batches of per_device_batch=3: expected a multiple "
                                       r"of devices x per_device_batch = 3, found 8"):
    launcher.train_step(launcher.place_state(state), launcher.place_batch(_batch(0, batch=8)))


def test_local_batch_must_split_over_devices(single_device) -> None:
  launcher = make_launcher("mesh", lambda s, b: (s, {}), lambda p, b: {}, jax.devices())
  with pytest.raises(ValueError, match="does not split over this process's 8 devices"):
    launcher.place_batch(_batch(0, batch=12))


def test_iteration_switch_keeps_backbone_and_projection(setup) -> None:
  config, _, _, state = setup
  new_config = config.replace(vocab_sizes=(500,))
  params = next_iteration_params(state.params, new_config, jax.random.PRNGKey(1))
  assert params["label_embedding_0"]["embedding"].shape == (500, config.classifier_proj_size)
  for name in state.params:
    if not name.startswith("label_embedding_"):
      for ours, theirs in zip(jax.tree.leaves(params[name]), jax.tree.leaves(state.params[name])):
        np.testing.assert_array_equal(ours, theirs)
  model = HubertECG(new_config)
  hidden = jax.ShapeDtypeStruct((2, 93, config.hidden_size), jnp.float32)
  logits = jax.eval_shape(lambda p, h: model.apply({"params": p}, h, method=HubertECG.logits),
                          params, hidden)
  assert logits[0].shape == (2, 93, 500)
  with pytest.raises(ValueError, match=r"do not fit the new iteration's architecture .*'final_proj_0'"):
    next_iteration_params(state.params, new_config.replace(classifier_proj_size=8),
                          jax.random.PRNGKey(1))


@pytest.mark.parametrize("kind,devices", [("mesh", 1), ("mesh", 8), ("pmap", 8)])
def test_placed_state_is_a_copy_the_donating_step_may_consume(kind: str, devices: int) -> None:
  launcher = make_launcher(kind, lambda s, b: (jax.tree.map(lambda x: x + 1, s), {}),
                           lambda p, b: {}, jax.devices()[:devices])
  mine = {"w": jnp.ones(3)}
  placed = launcher.place_state(mine)
  new, _ = launcher.train_step(placed, launcher.place_batch({"x": np.zeros((8, 2))}))
  assert not mine["w"].is_deleted() and placed["w"].is_deleted()  # donated, as intended
  np.testing.assert_array_equal(jax.tree.map(np.asarray, launcher.checkpoint_view(new))["w"], 2.0)

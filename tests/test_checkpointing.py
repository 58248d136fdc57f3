"""Orbax training checkpoints: layouts across device counts, retention, data position, export."""
from __future__ import annotations

import pathlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data.pipeline import DataPositionMismatch
from hubert_ecg_jax.model_dir import load_model
from hubert_ecg_jax.train.checkpointing import (CheckpointManager, DataPosition, abstract_like,
                                                export_model)
from hubert_ecg_jax.parallel import PmapLauncher, data_mesh, host_copy
from hubert_ecg_jax.train.state import create_train_state

from conftest import Counter, assert_same_tree


def _state(seed: int = 0):
  rng = np.random.default_rng(seed)
  params = {"encoder": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "label_embedding_0": {"embedding": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}}
  optimizer = optax.adamw(1e-3)
  state = create_train_state(params, optimizer, jax.random.PRNGKey(seed))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  return state.replace(params=optax.apply_updates(params, updates), opt_state=opt_state,
                       step=jnp.asarray(7, jnp.int32))


@pytest.mark.parametrize("saved_on,restored_on", [(8, 1), (1, 8)])
def test_restore_into_another_device_count(tmp_path, saved_on: int, restored_on: int) -> None:
  state = _state()
  saving = NamedSharding(data_mesh(jax.devices()[:saved_on]), P())
  manager = CheckpointManager(tmp_path)
  assert manager.save(7, jax.device_put(state, saving), DataPosition(Counter(41)))
  manager.close()

  restoring = NamedSharding(data_mesh(jax.devices()[:restored_on]), P())
  counter = Counter()
  manager = CheckpointManager(tmp_path)
  assert manager.latest_step == 7
  restored = manager.restore(abstract_like(state, restoring), DataPosition(counter))
  assert_same_tree(restored, state)
  assert counter.position == 41
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == restoring


def test_pmap_layout_round_trips_through_a_checkpoint(tmp_path) -> None:
  state = _state(1)
  launcher = PmapLauncher(lambda s, b: (s, {}), lambda p, b: {}, jax.devices())
  stacked = launcher.place_state(state)
  assert jax.tree.leaves(stacked)[0].shape[0] == 8
  manager = CheckpointManager(tmp_path)
  manager.save(3, launcher.checkpoint_view(stacked))
  restored = manager.restore(abstract_like(state, launcher.state_sharding))
  assert_same_tree(restored, state)
  # Back into the pmap layout on 2 devices: every device holds the same copy.
  small = PmapLauncher(lambda s, b: (s, {}), lambda p, b: {}, jax.devices()[:2])
  again = small.place_state(restored)
  assert_same_tree(jax.tree.map(lambda x: np.asarray(x)[1], again), state)


def test_keeps_last_n_and_the_best_by_validation_loss(tmp_path) -> None:
  state = jax.device_put(_state(), NamedSharding(data_mesh(jax.devices()[:1]), P()))
  manager = CheckpointManager(tmp_path, keep_last=2, keep_best=1)
  for step, val_loss in [(1, 3.0), (2, None), (3, 1.5), (4, None), (5, 2.0), (6, None), (7, None)]:
    manager.save(step, state, val_loss=val_loss)
  assert manager.steps == [3, 6, 7]
  assert manager.best_step == 3
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 6, 7]
  assert not manager.save(7, state)  # an existing step is not saved twice


def test_tf_data_iterator_position(tmp_path) -> None:
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  dataset = tf.data.Dataset.range(100).shuffle(100, seed=3).batch(4)
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  checkpoint = tf.train.Checkpoint(iterator=iterator)
  position = DataPosition(SimpleNamespace(save=checkpoint.write, restore=checkpoint.read))
  state = jax.device_put(_state(), NamedSharding(data_mesh(jax.devices()[:1]), P()))
  manager = CheckpointManager(tmp_path)
  manager.save(5, state, position)
  expected = [next(iterator).numpy() for _ in range(3)]

  resumed = iter(dataset)
  resumed_checkpoint = tf.train.Checkpoint(iterator=resumed)
  manager.restore(abstract_like(_state(), state.step.sharding),
                  DataPosition(SimpleNamespace(save=resumed_checkpoint.write, restore=resumed_checkpoint.read)))
  np.testing.assert_array_equal([next(resumed).numpy() for _ in range(3)], expected)


def test_data_position_of_another_process_count_is_skipped_with_a_warning(tmp_path) -> None:
  """A run saved by 2 processes resumes in 1: state restored, data stream restarted, and said so."""
  import shutil

  restored_into = []
  position = DataPosition(SimpleNamespace(save=lambda path: pathlib.Path(path).write_text("p"),
                                          restore=restored_into.append))
  state = jax.device_put(_state(), NamedSharding(data_mesh(jax.devices()[:1]), P()))
  manager = CheckpointManager(tmp_path)
  manager.save(4, state, position)
  data_dir = next(p for p in (tmp_path / "4").iterdir() if (p / "process_0").is_dir())
  shutil.copytree(data_dir / "process_0", data_dir / "process_1")  # as a second host would write
  with pytest.warns(UserWarning, match="saved by 2 process.*this run has 1.*restarts from its seed"):
    restored = manager.restore(abstract_like(_state(), state.step.sharding), position)
  assert_same_tree(restored, state)
  assert restored_into == [] and manager.restored_step == 4


def test_data_position_of_another_pipeline_stops_the_resume(tmp_path) -> None:
  """A position the input pipeline cannot take is not damage: no older checkpoint is tried."""
  def refuse(path: str) -> None:
    raise DataPositionMismatch(f"the data position at {path} was saved by another input pipeline")

  state = jax.device_put(_state(), NamedSharding(data_mesh(jax.devices()[:1]), P()))
  manager = CheckpointManager(tmp_path)
  for step in (3, 4):
    manager.save(step, state, DataPosition(Counter(step)))
  position = DataPosition(SimpleNamespace(save=Counter().save, restore=refuse))
  with pytest.raises(DataPositionMismatch, match="another input pipeline"):
    manager.restore(abstract_like(_state(), state.step.sharding), position)
  assert manager.restored_step is None and manager.steps == [3, 4]


def test_bad_settings_and_sources_raise(tmp_path) -> None:
  with pytest.raises(ValueError, match="save\\(path\\) and restore\\(path\\)"):
    DataPosition(object())
  with pytest.raises(ValueError, match="keep_last must be >= 1"):
    CheckpointManager(tmp_path, keep_last=0)


def test_export_model_for_fine_tuning(tmp_path) -> None:
  config = HubertECGConfig.preset("tiny")
  params = jax.device_put(_state().params, NamedSharding(data_mesh(), P()))
  out = export_model(tmp_path / "model", config, params, metadata={"step": 7})
  loaded_config, loaded, metadata = load_model(out)
  assert loaded_config == config and metadata == {"step": 7}
  assert_same_tree(loaded, host_copy(params))

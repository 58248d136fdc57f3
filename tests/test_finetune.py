"""Fine-tuning pieces: loss weights and losses against hand references and torch, tasks, freezing,
layer-wise LR decay, and the data-parallel step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.finetune import freezing, losses
from hubert_ecg_jax.finetune.step import DataParallelTrainer, make_train_step
from hubert_ecg_jax.finetune.tasks import Task, task_from_dataset
from hubert_ecg_jax.train.optimizer import OptimizerConfig, make_optimizer
from hubert_ecg_jax.train.state import create_train_state

torch = pytest.importorskip("torch")


def test_positive_weights_match_hand_reference():
  labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
  # N = 4; n = (3, 1, 0): w = (1/3, 3, 4/1e-9)
  expected = np.array([(4 - 3) / (3 + 1e-9), (4 - 1) / (1 + 1e-9), 4 / 1e-9], np.float32)
  np.testing.assert_allclose(losses.positive_weights(labels), expected, rtol=1e-6)


def test_class_weights_are_aligned_by_class_index():
  class_ids = np.array([2, 2, 2, 0, 1, 1])  # counts by index: 1, 2, 3
  np.testing.assert_allclose(losses.class_weights(class_ids, 3), [3 / 1, 3 / 2, 3 / 3])
  # The original's value_counts() order (most frequent first) would give [1, 1.5, 3]: misaligned.
  with pytest.raises(ValueError, match=r"classes \[3\] have no training record"):
    losses.class_weights(class_ids, 4)


def test_bce_with_pos_weight_matches_torch():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 4, (16, 5)).astype(np.float32)
  labels = (rng.random((16, 5)) < 0.3).astype(np.float32)
  pos_weight = losses.positive_weights(labels[:12] + 0.0)
  pos_weight[pos_weight > 1e6] = 7.0
  expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))(
      torch.tensor(logits), torch.tensor(labels)).item()
  ours = float(losses.mean_loss("multi_label", jnp.asarray(logits), jnp.asarray(labels),
                                jnp.asarray(pos_weight)))
  np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_weighted_cross_entropy_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (20, 4)).astype(np.float32)
  classes = rng.integers(0, 4, 20)
  weights = losses.class_weights(np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3]), 4)
  expected = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))(
      torch.tensor(logits), torch.tensor(classes)).item()
  ours = float(losses.mean_loss("multi_class", jnp.asarray(logits), jnp.asarray(classes),
                                jnp.asarray(weights)))
  np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_mse_matches_torch():
  rng = np.random.default_rng(2)
  predictions, targets = rng.normal(size=(2, 8, 3)).astype(np.float32)
  expected = torch.nn.MSELoss()(torch.tensor(predictions), torch.tensor(targets)).item()
  ours = float(losses.mean_loss("regression", jnp.asarray(predictions), jnp.asarray(targets),
                                jnp.ones(3)))
  np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_task_targets_by_column_name_and_class_index():
  columns = ["age", "AF", "NSR"]
  labels = np.array([[60, 1, 0], [70, 0, 1], [50, 0, 1]], np.float32)
  task = task_from_dataset("multi_label", columns, labels, columns=["NSR", "AF"])
  np.testing.assert_array_equal(task.targets(labels, columns), [[0, 1], [1, 0], [1, 0]])
  reordered = task.targets(labels[:, [2, 0, 1]], ["NSR", "age", "AF"])
  np.testing.assert_array_equal(reordered, [[0, 1], [1, 0], [1, 0]])
  with pytest.raises(ValueError, match="lacks the label columns"):
    task.targets(labels[:, :2], ["age", "AF"])
  np.testing.assert_array_equal(task.targets(labels[:, :2], ["age", "AF"], allow_missing=True),
                                [[0, 1], [0, 0], [0, 0]])
  death = task_from_dataset("multi_class", ["death"], np.array([[0], [1], [1]], np.float32))
  assert death.output_names == ("death=0", "death=1")
  np.testing.assert_array_equal(death.targets(np.array([[1], [0]]), ["death"]), [1, 0])
  one_hot = Task("multi_class", ("AF", "NSR"), ("AF", "NSR"))
  np.testing.assert_array_equal(one_hot.targets(labels, columns), [0, 1, 1])
  with pytest.raises(ValueError, match="exactly one 1"):
    one_hot.targets(np.array([[1, 1]]), ["AF", "NSR"])
  probabilities = one_hot.probabilities(np.array([[0.0, np.log(3.0)]]))
  np.testing.assert_allclose(probabilities, [[0.25, 0.75]])


def _tiny_classifier(num_labels: int = 3, layers: int = 2):
  """A tiny classifier without dropout (so 1 and 2 devices see the same computation)."""
  config = HubertECGConfig.preset("tiny", num_hidden_layers=layers, hidden_dropout=0.0,
                                  activation_dropout=0.0, attention_dropout=0.0)
  model = HubertECGForClassification(config, num_labels, classifier_dropout=0.0)
  params = jax.jit(lambda key: model.init({"params": key}, jnp.zeros((1, 6000))))(jax.random.key(0))
  params = params["params"]
  return config, model, params


def _groups(mask) -> dict[str, bool]:
  flat = {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
  pick = lambda fragment: {v for k, v in flat.items() if fragment in k}
  return {name: pick(fragment) for name, fragment in (
      ("conv", "feature_extractor"), ("projection", "'feature_projection'"),
      ("mask_embed", "masked_spec_embed"), ("pos_conv", "pos_conv_embed"),
      ("encoder_norm", "['encoder']['layer_norm']"), ("layer0", "['layers_0']"), ("layer1", "['layers_1']"),
      ("layer2", "['layers_2']"), ("head", "classifier"))}


def test_trainable_mask_groups_and_original_quirk():
  _, _, params = _tiny_classifier(layers=3)
  default = _groups(freezing.trainable_mask(params, 3, freezing.FreezeConfig()))
  assert default == {"conv": {False}, "projection": {True}, "mask_embed": {False}, "pos_conv": {True},
                     "encoder_norm": {True}, "layer0": {True}, "layer1": {True}, "layer2": {True},
                     "head": {True}}
  quirk = _groups(freezing.trainable_mask(params, 3, freezing.FreezeConfig(original_freeze_quirk=True)))
  assert quirk["pos_conv"] == quirk["encoder_norm"] == {False} and quirk["layer0"] == {True}
  last_one = _groups(freezing.trainable_mask(
      params, 3, freezing.FreezeConfig(freeze_feature_encoder=False, trainable_layers=1)))
  assert last_one["conv"] == {True} and last_one["layer2"] == {True}
  assert last_one["layer0"] == last_one["layer1"] == last_one["pos_conv"] == {False}
  with pytest.raises(ValueError, match="has 3 blocks"):
    freezing.trainable_mask(params, 3, freezing.FreezeConfig(trainable_layers=4))


def test_layer_lr_multipliers_follow_depth():
  _, _, params = _tiny_classifier(layers=2)
  multipliers = freezing.layer_lr_multipliers(params, 2, 0.5)
  assert float(multipliers["classifier"]["kernel"]) == 1.0
  assert float(multipliers["hubert_ecg"]["encoder"]["layers_1"]["attention"]["q_proj"]["kernel"]) == 0.5
  assert float(multipliers["hubert_ecg"]["encoder"]["layers_0"]["final_layer_norm"]["scale"]) == 0.25
  assert float(multipliers["hubert_ecg"]["feature_projection"]["kernel"]) == 0.125
  assert float(multipliers["hubert_ecg"]["encoder"]["pos_conv_embed"]["bias"]) == 0.125


def test_layer_lr_decay_scales_adamw_updates_exactly():
  _, _, params = _tiny_classifier(layers=2)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3) + 0.01 * p, params)
  base = make_optimizer(OptimizerConfig(total_steps=10, learning_rate=1e-3, warmup_fraction=0.0))
  plain, mask = freezing.finetune_optimizer(base, params, 2, freezing.FreezeConfig())
  decayed, _ = freezing.finetune_optimizer(base, params, 2, freezing.FreezeConfig(layer_lr_decay=0.7))
  plain_updates, _ = plain.update(grads, plain.init(params), params)
  decayed_updates, _ = decayed.update(grads, decayed.init(params), params)
  multipliers = freezing.layer_lr_multipliers(params, 2, 0.7)
  jax.tree.map(lambda d, p, m: np.testing.assert_allclose(d, p * m, rtol=1e-6),
               decayed_updates, plain_updates, multipliers)
  # Frozen leaves (the CNN) get exactly zero updates and keep no optimizer moments.
  assert not np.any(np.asarray(plain_updates["hubert_ecg"]["feature_extractor"]["conv_layers_1"]["kernel"]))
  assert not mask["hubert_ecg"]["feature_extractor"]["conv_layers_1"]["kernel"]


def _random_batch(rng: np.random.Generator, size: int, num_labels: int) -> dict[str, np.ndarray]:
  return {"x": rng.normal(0, 0.3, (size, 6000)).astype(np.float32),
          "attention_mask": np.ones((size, 6000), np.int32),
          "targets": (rng.random((size, num_labels)) < 0.4).astype(np.float32)}


def _trainer(model, params, devices, freeze: freezing.FreezeConfig, lr: float = 1e-3):
  base = make_optimizer(OptimizerConfig(total_steps=10, learning_rate=lr, warmup_fraction=0.0))
  optimizer, mask = freezing.finetune_optimizer(base, params, model.config.num_hidden_layers, freeze)
  step = make_train_step(model, optimizer, "multi_label", np.full(model.num_labels, 2.0, np.float32), mask)
  trainer = DataParallelTrainer(step, devices)
  state = trainer.place_state(create_train_state(params, optimizer, jax.random.PRNGKey(1)))
  return trainer, state


def test_frozen_params_stay_bitwise_unchanged_and_trainable_ones_move():
  _, model, params = _tiny_classifier()
  host = jax.tree.map(np.array, params)
  trainer, state = _trainer(model, params, jax.devices()[:2],
                            freezing.FreezeConfig(trainable_layers=1, original_freeze_quirk=True))
  rng = np.random.default_rng(0)
  for _ in range(3):
    state, metrics = trainer.step(state, _random_batch(rng, 4, 3))
  assert float(metrics["finite"]) == 1.0 and int(state.step) == 3
  after = jax.tree.map(np.asarray, state.params)
  backbone, before = after["hubert_ecg"], host["hubert_ecg"]
  pairs = [(backbone["feature_extractor"], before["feature_extractor"]),
           (backbone["encoder"]["layers_0"], before["encoder"]["layers_0"]),
           (backbone["encoder"]["pos_conv_embed"], before["encoder"]["pos_conv_embed"]),
           (backbone["encoder"]["layer_norm"], before["encoder"]["layer_norm"]),
           (backbone["masked_spec_embed"], before["masked_spec_embed"])]
  for new, old in pairs:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32)), new, old)
  moved = [(after["classifier"]["kernel"], host["classifier"]["kernel"]),
           (backbone["encoder"]["layers_1"]["attention"]["q_proj"]["kernel"],
            before["encoder"]["layers_1"]["attention"]["q_proj"]["kernel"]),
           (backbone["feature_projection"]["kernel"], before["feature_projection"]["kernel"])]
  for new, old in moved:
    assert np.abs(new - old).max() > 0


def test_two_devices_give_the_single_device_update():
  _, model, params = _tiny_classifier()
  batch = _random_batch(np.random.default_rng(3), 4, 3)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    trainer, state = _trainer(model, params, devices, freezing.FreezeConfig())
    state, metrics = trainer.step(state, batch)
    results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), results[0][1], results[1][1])

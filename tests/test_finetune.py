"""Fine-tuning pieces: loss weights and losses against hand references and torch, tasks, freezing,
layer-wise LR decay, and the data-parallel step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.finetune import freezing, losses
from hubert_ecg_jax.finetune.step import make_train_step
from hubert_ecg_jax.tasks import Task, task_from_dataset
from hubert_ecg_jax.parallel import make_launcher
from hubert_ecg_jax.train.optimizer import OptimizerConfig, make_optimizer
from hubert_ecg_jax.train.state import create_train_state



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


def _tiny_classifier(num_labels: int = 3, layers: int = 2, shapes_only: bool = False):
  """A tiny classifier without dropout (so 1 and 2 devices see the same computation)."""
  config = HubertECGConfig.preset("tiny", num_hidden_layers=layers, hidden_dropout=0.0,
                                  activation_dropout=0.0, attention_dropout=0.0)
  model = HubertECGForClassification(config, num_labels, classifier_dropout=0.0)
  init = lambda key: model.init({"params": key}, jnp.zeros((1, config.min_input_length)))["params"]
  params = jax.eval_shape(init, jax.random.key(0)) if shapes_only else jax.jit(init)(jax.random.key(0))
  return config, model, params


@pytest.fixture(scope="module")
def tiny():
  return _tiny_classifier()


def _groups(mask) -> dict[str, bool]:
  flat = {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
  pick = lambda fragment: {v for k, v in flat.items() if fragment in k}
  return {name: pick(fragment) for name, fragment in (
      ("conv", "feature_extractor"), ("projection", "'feature_projection'"),
      ("mask_embed", "masked_spec_embed"), ("pos_conv", "pos_conv_embed"),
      ("encoder_norm", "['encoder']['layer_norm']"), ("layer0", "['layers_0']"), ("layer1", "['layers_1']"),
      ("layer2", "['layers_2']"), ("head", "classifier"))}


def test_trainable_mask_groups_and_original_quirk():
  _, _, params = _tiny_classifier(layers=3, shapes_only=True)
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


def test_layer_lr_multipliers_follow_depth(tiny):
  _, _, params = tiny
  multipliers = freezing.layer_lr_multipliers(params, 2, 0.5)
  assert float(multipliers["classifier"]["kernel"]) == 1.0
  assert float(multipliers["hubert_ecg"]["encoder"]["layers_1"]["attention"]["q_proj"]["kernel"]) == 0.5
  assert float(multipliers["hubert_ecg"]["encoder"]["layers_0"]["final_layer_norm"]["scale"]) == 0.25
  assert float(multipliers["hubert_ecg"]["feature_projection"]["kernel"]) == 0.125
  assert float(multipliers["hubert_ecg"]["encoder"]["pos_conv_embed"]["bias"]) == 0.125


def test_layer_lr_decay_scales_adamw_updates_exactly(tiny):
  _, _, params = tiny
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
  trainer = make_launcher("mesh", step, devices=devices)
  state = trainer.place_state(create_train_state(params, optimizer, jax.random.PRNGKey(1)))
  return trainer, state


def test_step_freezes_bitwise_and_two_devices_give_the_single_device_update(tiny):
  _, model, params = tiny
  host = jax.tree.map(np.array, params)
  freeze = freezing.FreezeConfig(trainable_layers=1, original_freeze_quirk=True)
  rng = np.random.default_rng(0)
  batches = [_random_batch(rng, 4, 3) for _ in range(3)]
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    trainer, state = _trainer(model, params, devices, freeze)
    for batch in batches:
      state, metrics = trainer.train_step(state, trainer.place_batch(batch))
    assert float(metrics["finite"]) == 1.0 and int(state.step) == 3
    results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), results[0][1], results[1][1])
  after = results[1][1]
  backbone, before = after["hubert_ecg"], host["hubert_ecg"]
  frozen = [(backbone["feature_extractor"], before["feature_extractor"]),
            (backbone["encoder"]["layers_0"], before["encoder"]["layers_0"]),
            (backbone["encoder"]["pos_conv_embed"], before["encoder"]["pos_conv_embed"]),
            (backbone["encoder"]["layer_norm"], before["encoder"]["layer_norm"]),
            (backbone["masked_spec_embed"], before["masked_spec_embed"])]
  for new, old in frozen:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32)), new, old)
  moved = [(after["classifier"]["kernel"], host["classifier"]["kernel"]),
           (backbone["encoder"]["layers_1"]["attention"]["q_proj"]["kernel"],
            before["encoder"]["layers_1"]["attention"]["q_proj"]["kernel"]),
           (backbone["feature_projection"]["kernel"], before["feature_projection"]["kernel"])]
  for new, old in moved:
    assert np.abs(new - old).max() > 0


SYNTHETIC_CLASSES = ("SB", "STach", "RBBB", "STE")


def write_synthetic_split(directory, n: int, seed: int, classes=SYNTHETIC_CLASSES, one_hot: bool = True):
  """n labelled synthetic 10-s ECGs (classes in turn), prepared and written as a records directory."""
  from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, prepare_record
  from hubert_ecg_jax.data.records import StoredRecord, write_records
  from hubert_ecg_jax.data.synthetic import generate_dataset

  signals, labels = generate_dataset(n, seed, classes=classes)
  records = []
  for index, (signal, label) in enumerate(zip(signals, labels)):
    target = np.eye(len(classes), dtype=np.float32)[classes.index(label)]
    records.append(StoredRecord(f"syn{seed}_{index}", "synthetic", prepare_record(signal, 500, STANDARD_LEADS),
                                target if one_hot else target[1:], 500.0))
  write_records(directory, records, classes if one_hot else classes[1:])
  return directory


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  return {split: write_synthetic_split(root / split, n, seed)
          for split, n, seed in (("train", 80, 1), ("val", 24, 2), ("test", 24, 3))}


def test_from_scratch_model_learns_synthetic_labels_and_resumes_exactly(synthetic, tmp_path):
  """A tiny random-init model reaches macro AUROC > 0.9 on held-out synthetic ECGs in 60 steps; the
  run resumed from its step-30 checkpoint (state, early-stopping counters, data position), without
  batches placed ahead (device_prefetch 0 against the default 2), ends with the very same model."""
  import shutil

  from hubert_ecg_jax.evaluate.classifier import evaluate_classifier
  from hubert_ecg_jax.experiment import load_config
  from hubert_ecg_jax.finetune.config import settings_from_config
  from hubert_ecg_jax.finetune.loop import BEST_MODEL, finetune
  from hubert_ecg_jax.inference import load_classifier

  def settings(*overrides: str):
    return settings_from_config(load_config("configs/finetune_demo.py", [
        f"data.train={synthetic['train']}", f"data.val={synthetic['val']}", "train.steps=60",
        "train.eval_every=30", "train.learning_rate=0.002", "train.early_stopping_metric=loss",
        "train.devices=1", "train.progress=false", *overrides]))

  straight = tmp_path / "straight"
  result = finetune(settings(), straight)
  assert result.stop_reason == "finished" and result.step == 60 and result.best_step == 60
  summary = evaluate_classifier(result.best_model, synthetic["test"], tmp_path / "report", n_boot=0,
                                progress=False)
  macro = summary["evaluation"]["metrics"]["macro"]["auroc"]
  assert macro > 0.9, summary["table"]

  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "60")
  shutil.rmtree(resumed / BEST_MODEL)
  with pytest.raises(ValueError, match="device_prefetch must be >= 0, got -1"):
    finetune(settings("train.device_prefetch=-1"), resumed)
  again = finetune(settings("train.device_prefetch=0"), resumed)
  assert again.stop_reason == "finished" and again.best_step == 60
  first, second = load_classifier(result.best_model), load_classifier(again.best_model)
  jax.tree.map(np.testing.assert_array_equal, first.params, second.params)
  np.testing.assert_array_equal(first.thresholds, second.thresholds)


def test_ptbxl_configs_carry_the_original_recipe():
  from hubert_ecg_jax.experiment import load_config
  from hubert_ecg_jax.finetune.config import settings_from_config

  config = load_config("configs/finetune_ptbxl_superdiag.py:base", ["model.pretrained=weights"])
  s = settings_from_config(config)
  o = s.optimizer
  assert (o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_fraction, o.total_steps) == (
      1e-5, 0.9, 0.98, 1e-9, 0.01, 0.08, 70_000)
  assert o.decay_all_params and o.grad_clip_norm is None
  t = s.train
  assert (t.batch_size, t.eval_every, t.patience, t.use_loss_weights, t.random_crop) == (64, 500, 8, True, True)
  assert s.freeze == freezing.FreezeConfig(freeze_feature_encoder=True, trainable_layers=None)
  assert s.model.dropouts == {"hidden_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
                              "attention_dropout": 0.1, "layerdrop": 0.1}
  assert s.model.classifier_dropout == 0.1 and s.model.classifier_hidden_size is None
  assert (s.data.source, s.data.tfds_name, s.data.val) == ("tfds", "ptb_xl/superdiag", "validation")
  small = settings_from_config(load_config("finetune_ptbxl_rhythm", ["model.pretrained=w"]))
  assert small.model.dropouts["layerdrop"] == 0.0 and small.data.tfds_name == "ptb_xl/rhythm"
  with pytest.raises(ValueError, match="--config.model.pretrained=PATH"):
    settings_from_config(load_config("configs/finetune_ptbxl_all.py"))
  with pytest.raises(ValueError, match="model size"):
    load_config("configs/finetune_ptbxl_all.py:huge")


def test_tfds_split_becomes_a_records_directory_once(tmp_path):
  """The TFDS source copies a split of a builder (here the generic folder builder) into records."""
  from hubert_ecg_jax.data.preprocess import prepare_record
  from hubert_ecg_jax.data.readers import read_record
  from hubert_ecg_jax.data.records import iterate_records
  from hubert_ecg_jax.data.synthetic import write_wfdb_folder
  from hubert_ecg_jax.finetune.data import DataConfig, read_labels, resolve_splits

  manual = tmp_path / "manual"
  paths = write_wfdb_folder(manual, 5, seed=3, duration_s=6.0, classes=["SB", "RBBB"])
  rows = ["record,fs,split,SB,RBBB"] + [
      f"{p.name},,{'validation' if i == 4 else 'train'},{int(i % 2 == 0)},{int(i % 2 == 1)}"
      for i, p in enumerate(paths)]
  (manual / "labels.csv").write_text("\n".join(rows) + "\n")
  config = DataConfig(source="tfds", tfds_name="ecg_folder", train="train", val="validation",
                      tfds_data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  splits = resolve_splits(config, tmp_path / "work", progress=False)
  ids, labels, names = read_labels(splits["train"])
  assert names == ["SB", "RBBB"] and sorted(ids) == [p.name for p in paths[:4]]
  np.testing.assert_array_equal(labels[np.argsort(ids)], [[1, 0], [0, 1], [1, 0], [0, 1]])
  stored = {r.record_id: r for r in iterate_records(splits["val"])}
  record = read_record(paths[4])
  np.testing.assert_array_equal(stored[paths[4].name].signal,
                                prepare_record(record.signal, record.fs, record.lead_names))
  manifest_time = (splits["train"] / "manifest.json").stat().st_mtime_ns
  assert resolve_splits(config, tmp_path / "work", progress=False) == splits
  assert (splits["train"] / "manifest.json").stat().st_mtime_ns == manifest_time  # reused


def test_early_stopping_counts_validations_without_progress():
  from hubert_ecg_jax.finetune.loop import EarlyStopping

  stopping = EarlyStopping(patience=2)
  assert stopping.update(float("nan"), 10)  # the first validation is always the best so far
  assert stopping.update(0.6, 20) and stopping.best_step == 20  # any number beats NaN
  assert not stopping.update(float("nan"), 30) and not stopping.update(0.6, 40)  # equal is no progress
  assert stopping.done and stopping.bad_evals == 2 and stopping.best_score == pytest.approx(0.6)
  restored = EarlyStopping.from_tree(2, stopping.to_tree())
  assert restored == stopping
  fresh = EarlyStopping(patience=3)
  for step, score in enumerate([0.5, 0.7, 0.65, 0.71, 0.7, 0.7]):
    fresh.update(score, step)
  assert (fresh.best_step, fresh.bad_evals, fresh.done) == (3, 2, False)

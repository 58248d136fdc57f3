"""Data, run directories and models at URLs, on TensorFlow's in-memory file system (ram://): what
tf.io.gfile and tf.data read natively, offline, with no atomic commit by rename in our path layer
(files.UrlPath commits by copy, as on gs://). Orbax writes its arrays through tensorstore, which
does not reach ram://: model directories there are written locally and committed by copy, run
checkpoints go through a local mirror committed step by step (README: "Data, checkpoints and
models in a bucket"). ram:// lives in this process: a kill is an exception raised part-way through
a copy, and "another machine" is a fresh, empty mirror folder."""
from __future__ import annotations

import csv
import io
import json
import re
import tempfile
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from jax.sharding import SingleDeviceSharding

from hubert_ecg_jax import files
from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.cli import main
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data import records
from hubert_ecg_jax.data.synthetic import write_wfdb_folder
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.model_dir import is_model_dir, load_model, save_model
from hubert_ecg_jax.pretrained import export_hf_directory, load_pretrained
from hubert_ecg_jax.train.checkpointing import (COMMITTED, MIRRORS_ENV, CheckpointManager,
                                                DataPosition, abstract_like)
from hubert_ecg_jax.train.logging import MetricsWriter
from hubert_ecg_jax.train.state import create_train_state

from conftest import Counter, assert_same_tree

K = 8
LABELS = ("426783006", "164889003", "59118001")  # sinus rhythm, atrial fibrillation, RBBB


@pytest.fixture
def bucket() -> files.UrlPath:
  """A fresh ram:// 'bucket' (the in-memory file system lives as long as the test process)."""
  return files.UrlPath(f"ram://bucket-{uuid.uuid4().hex[:8]}")


def _tree(root: files.AnyPath) -> dict[str, bytes]:
  """Relative path -> bytes of every file under `root`."""
  return {str(path)[len(str(root)) + 1:]: path.read_bytes() for path in root.rglob("*")
          if path.is_file()}


def _layout(root: files.AnyPath) -> list[str]:
  """The files under `root`, Orbax's data files (named and split at random) as `d/*`."""
  return sorted({re.sub(r"(^|/)d/[0-9a-f]{32}$", r"\1d/*", name) for name in _tree(root)})


def _random_params(model: HubertECGForClassification) -> dict:
  """Random params of the shapes `model.init` gives, without running it (it takes seconds)."""
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 400))))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype), shapes["params"])


def _npy(path: files.AnyPath) -> np.ndarray:
  return np.load(io.BytesIO(path.read_bytes()))


def test_pretraining_and_inference_on_object_storage_give_the_outputs_of_local_disk(
    tmp_path, sample_data_dir, bucket, capsys, monkeypatch):
  """preprocess -> features -> cluster -> targets -> pretrain (resumed on another machine) ->
  export -> embed and predict, with every directory the commands name at a URL, and the same on
  local disk: the same bytes, checkpoint steps, model, embeddings and predictions. No temporary
  object is left behind."""
  raw = tmp_path / "raw"
  write_wfdb_folder(raw, 10, seed=1)
  roots = {"disk": tmp_path / "disk", "url": bucket / "data"}
  for root in roots.values():
    assert main(["preprocess", str(raw), str(root / "records"), "--shards", "2", "--workers", "1",
                 "--quiet"]) == 0
  url = roots["url"]
  assert main(["features", str(url / "records"), str(url / "f1"), "--feature-set", "stats"]) == 0
  assert main(["cluster", "--features", str(url / "f1"), "--k", str(K), "--out", str(url / "km")]) == 0
  kmeans = url / "km" / f"kmeans_k{K}.npz"
  for root in roots.values():
    assert main(["targets", str(root / "records"), str(root / "units"), "--kmeans", str(kmeans),
                 "--feature-set", "stats", "--workers", "1"]) == 0
  assert _tree(roots["disk"] / "records") == _tree(url / "records")
  units = [_tree(root / "units") for root in roots.values()]
  assert [{k: v for k, v in tree.items() if k.endswith(".tfrecord")} for tree in units] == [
      {k: v for k, v in units[1].items() if k.endswith(".tfrecord")}] * 2

  # Pre-training reads records and units from the bucket. On local disk the run goes straight to
  # step 3; on the bucket (checkpoints through a local mirror) it stops at step 2 and resumes from
  # an empty mirror, as on another machine: the same checkpoints and model (resumes are exact).
  runs = {"disk": tmp_path / "run", "url": bucket / "run"}
  args = [f"--config.data.train_dir={url / 'records'}",
          f"--config.data.train_units={url / 'units'}", f"--config.model.vocab_sizes={K}",
          "--config.data.batch_size=8", "--config.train.log_every=1",
          "--config.train.checkpoint_every=1", "--config.train.progress=false"]
  assert main(["pretrain", "demo_pretrain", str(runs["disk"]), *args,
               "--config.train.total_steps=3"]) == 0
  monkeypatch.setenv(MIRRORS_ENV, str(tmp_path / "machine-1"))
  assert main(["pretrain", "demo_pretrain", str(runs["url"]), *args,
               "--config.train.total_steps=2"]) == 0
  monkeypatch.setenv(MIRRORS_ENV, str(tmp_path / "machine-2"))
  capsys.readouterr()
  assert main(["pretrain", "demo_pretrain", str(runs["url"]), *args,
               "--config.train.total_steps=3"]) == 0
  assert f"resumed from step 2 in {runs['url'] / 'checkpoints'}" in capsys.readouterr().out
  mirrored = tmp_path / "machine-2" / "ram" / bucket.key / "run" / "checkpoints"
  steps = [sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
           for run in runs.values()]
  assert steps == [["1", "2", "3"]] * 2
  assert {k: v for k, v in _tree(mirrored).items() if not k.startswith(".")} == _tree(
      runs["url"] / "checkpoints")
  models = [load_model(run / "model") for run in runs.values()]
  assert models[0][0] == models[1][0]
  assert_same_tree(models[0][1], models[1][1])

  config = HubertECGConfig.preset("tiny")
  classifier = _random_params(HubertECGForClassification(config, len(LABELS)))
  record = sorted(sample_data_dir.glob("*.hea"))[0]
  for root, run in zip(roots.values(), runs.values()):
    assert main(["export", str(run / "model"), str(root / "hf")]) == 0
    assert main(["embed", str(root / "hf"), str(root / "records"), "--out", str(root / "emb.npy"),
                 "--quiet"]) == 0
    export_hf_directory(config, classifier, root / "classifier")
    assert main(["predict", str(root / "classifier"), str(record), "--out", str(root / "pred"),
                 "--quiet"]) == 0
  assert _tree(roots["disk"] / "hf") == _tree(url / "hf")
  np.testing.assert_array_equal(_npy(roots["disk"] / "emb.npy"), _npy(url / "emb.npy"))
  predictions = [json.loads((root / "pred" / "predictions.json").read_text())["records"]
                 for root in roots.values()]
  assert predictions[0] == predictions[1]
  leftovers = [path for path in bucket.rglob(".*")]  # staging objects are named .NAME.*
  assert not leftovers


def test_a_commit_cut_short_on_object_storage_leaves_nothing_a_reader_takes(bucket, monkeypatch):
  """A folder is committed file by file, its JSON documents last: a copy cut short (a kill) leaves
  shards without manifest.json, which readers refuse, and the rerun replaces them. A failed file
  write leaves the previous version. An export cut short leaves no config.json, and is refused."""
  stored = [records.StoredRecord(record_id=f"r{i}", source=f"r{i}.hea", source_fs=500.0,
                                 labels=np.zeros(1, np.float32),
                                 signal=np.full((12, 2500), i, np.float32)) for i in range(4)]
  real_copy = tf.io.gfile.copy

  def copy_but_not_json(source: str, target: str, overwrite: bool = False) -> None:
    """Dies (a kill) when a JSON document is copied out of a staged folder into its place."""
    if target.endswith(".json") and "/." in source and "/." not in target:
      raise KeyboardInterrupt("killed")
    real_copy(source, target, overwrite)

  directory = bucket / "records"
  with monkeypatch.context() as patch:
    patch.setattr(tf.io.gfile, "copy", copy_but_not_json)
    with pytest.raises(KeyboardInterrupt):
      records.write_records(directory, stored, ["none"], num_shards=2)
  assert sorted(path.name for path in directory.iterdir()) == [
      "records-00000-of-00002.tfrecord", "records-00001-of-00002.tfrecord"]
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    records.shard_paths(directory)
  records.write_records(directory, stored, ["none"], num_shards=2)  # the rerun
  assert [r.record_id for r in records.iterate_records(directory)] == ["r0", "r1", "r2", "r3"]

  note = bucket / "note.json"
  files.write_json_atomic(note, {"version": 1})
  with pytest.raises(RuntimeError), files.atomic_path(note) as staging:
    staging.write_text('{"version": ')
    raise RuntimeError("the disk is full")
  assert files.read_json(note, "a note") == {"version": 1}

  params = _random_params(HubertECGForClassification(HubertECGConfig.preset("tiny"), 2))
  with monkeypatch.context() as patch:
    patch.setattr(tf.io.gfile, "copy", copy_but_not_json)
    with pytest.raises(KeyboardInterrupt):
      export_hf_directory(HubertECGConfig.preset("tiny"), params, bucket / "hf")
  assert [path.name for path in (bucket / "hf").iterdir()] == ["model.safetensors"]
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(bucket / "hf")
  assert not list(bucket.rglob(".*"))  # the failed writes removed their staging objects


def test_the_data_position_a_killed_save_left_is_replaced(tmp_path) -> None:
  """The data position is staged in checkpoints/.data-position-process_0, not TMPDIR: what a kill
  left there (here a partly written one) is replaced by the next save, which moves it in place."""
  manager = CheckpointManager(tmp_path / "checkpoints")
  leftover = tmp_path / "checkpoints" / ".data-position-process_0"
  leftover.mkdir(parents=True)
  (leftover / "position").write_text("4")  # from a save that was killed
  state = {"w": jnp.ones(3)}
  assert manager.save(5, state, DataPosition(Counter(41)))
  assert not leftover.exists()
  restored = Counter(0)
  manager.restore(abstract_like(state, SingleDeviceSharding(jax.devices()[0])),
                  DataPosition(restored))
  assert restored.position == 41
  manager.close()


def test_tensorboard_events_at_a_url_and_checkpoints_at_a_mirrored_url_refuse_several_processes(
    bucket, monkeypatch, tmp_path) -> None:
  """Event files go through the path layer (tensorboardX's own writers need google-cloud-storage
  or boto3). Checkpoints at a URL Orbax cannot write go through a local mirror, which serves one
  process: a multi-process run is refused by name (gs:// is Orbax's own, and stays multi-host);
  Orbax itself is never handed such a URL, where it would write to a local folder called `ram:`."""
  writer = MetricsWriter(bucket / "run" / "tensorboard", print_fn=lambda line: None)
  writer.write(3, {"loss": 1.5}, "train")
  writer.close()
  [events] = (bucket / "run" / "tensorboard").glob("events.out.tfevents.*")
  values = [(value.tag, event.step, value.simple_value)
            for event in tf.compat.v1.train.summary_iterator(str(events))
            for value in event.summary.value]
  assert values == [("train/loss", 3, 1.5)]

  assert str(files.orbax_path("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
  assert files.orbax_native("gs://bucket/run") and files.orbax_native(tmp_path)
  assert not files.orbax_native(bucket / "run")
  with pytest.raises(ValueError, match="a local path or a gs:// URL itself, found ram://"):
    files.orbax_path(bucket / "run" / "checkpoints")
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"checkpoints at ram://.* go through a local mirror folder, "
                                       r"which serves one process, found 2 processes"):
    CheckpointManager(bucket / "run" / "checkpoints", mirror=tmp_path / "mirror")
  assert not (tmp_path / "mirror").exists() and not (bucket / "run" / "checkpoints").exists()


def _train_states(count: int) -> list:
  """A real training state and the states `count - 1` optimizer steps after it, deterministic."""
  rng = np.random.default_rng(0)
  params = {"encoder": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
            "label_embedding_0": {"embedding": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}}
  optimizer = optax.adamw(1e-2)
  states = [create_train_state(params, optimizer, jax.random.PRNGKey(0))]
  for _ in range(count - 1):
    state = states[-1]
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    states.append(state.replace(params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state, step=state.step + 1))
  return states


def test_a_kill_during_a_checkpoint_upload_resumes_from_the_previous_committed_step(
    tmp_path, bucket, monkeypatch) -> None:
  """A kill while step 2 is copied to the URL leaves part of it there, without its marker: another
  machine (an empty mirror), and this one (whose mirror holds all of step 2), restore step 1 and
  its data position, never the partial step; the resumed run saves step 2 again, replacing what
  the kill left, and the URL then holds what a run that was not killed wrote."""
  states = _train_states(4)
  target = abstract_like(states[0], SingleDeviceSharding(jax.devices()[0]))

  def manager(name: str, mirror: str) -> CheckpointManager:
    return CheckpointManager(bucket / name, keep_last=2, mirror=tmp_path / mirror)

  clean = manager("clean", "clean")
  for step in (1, 2):
    assert clean.save(step, states[step], DataPosition(Counter(10 * step)))
  clean.close()

  killed = manager("killed", "machine-1")
  assert killed.save(1, states[1], DataPosition(Counter(10)))
  real_copy, copied = tf.io.gfile.copy, []

  def copy_then_die(source: str, target: str, overwrite: bool = False) -> None:
    if target.startswith(f"{bucket}/killed/2/"):
      if len(copied) == 3:
        raise KeyboardInterrupt("killed")
      copied.append(target)
    real_copy(source, target, overwrite)

  with monkeypatch.context() as patch:
    patch.setattr(tf.io.gfile, "copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
      killed.save(2, states[2], DataPosition(Counter(20)))
  killed.close()
  partial = bucket / "killed" / "2"
  assert sorted(str(path) for path in partial.rglob("*")) == sorted(copied) and len(copied) == 3
  assert not (partial / COMMITTED).exists() and (bucket / "killed" / "1" / COMMITTED).is_file()
  assert (tmp_path / "machine-1" / "2" / "state").is_dir()  # complete locally, never committed

  for mirror in ("machine-2", "machine-1"):
    resumed = manager("killed", mirror)
    assert resumed.steps == [1] and resumed.latest_step == 1 and resumed.has_data_position(1)
    position = Counter(0)
    restored = resumed.restore(target, DataPosition(position))
    assert resumed.restored_step == 1 and position.position == 10
    assert_same_tree(restored, states[1])
    resumed.close()
  assert sorted(path.name for path in (tmp_path / "machine-1").iterdir()) == ["1"]

  resumed = manager("killed", "machine-2")
  state = resumed.restore(target, DataPosition(Counter(0)))
  grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, state.params)
  updates, opt_state = optax.adamw(1e-2).update(grads, state.opt_state, state.params)
  state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                        step=state.step + 1)  # the training step of `_train_states`
  assert resumed.save(2, state, DataPosition(Counter(20)))
  resumed.close()
  assert (partial / COMMITTED).is_file()

  for name in ("clean", "killed"):  # read on a third machine
    reader = manager(name, f"reader-{name}")
    assert reader.steps == [1, 2]
    position = Counter(0)
    assert_same_tree(reader.restore(target, DataPosition(position)), states[2])
    assert reader.restored_step == 2 and position.position == 20
    reader.close()
  assert _layout(bucket / "clean" / "2") == _layout(partial) and COMMITTED in _layout(partial)

  # The URL keeps what Orbax keeps (keep_last=2): step 1 goes, its marker first.
  resumed = manager("killed", "machine-2")
  assert resumed.save(3, states[3], DataPosition(Counter(30)))
  resumed.close()
  assert sorted(path.name for path in (bucket / "killed").iterdir()) == ["2", "3"]
  assert sorted(path.name for path in (tmp_path / "machine-2").iterdir()) == ["2", "3"]


def test_a_model_directory_at_a_url_round_trips_and_a_commit_cut_short_is_refused(
    bucket, tmp_path, monkeypatch) -> None:
  """save_model at a URL Orbax cannot write: Orbax writes in a local temporary folder, copied to
  the URL with config.json last; load_model reads through a local copy. Both temporary folders are
  removed. A copy cut short before config.json is refused as not a model directory."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  config = HubertECGConfig.preset("tiny")
  params = _random_params(HubertECGForClassification(config, 2))
  metadata = {"labels": ["a", "b"]}
  for directory in (tmp_path / "model", bucket / "model"):
    assert save_model(directory, config, params, metadata) == directory
  assert _layout(bucket / "model") == _layout(tmp_path / "model")
  for directory in (tmp_path / "model", bucket / "model"):
    loaded_config, loaded, loaded_metadata = load_model(directory)
    assert loaded_config == config and loaded_metadata == metadata
    assert_same_tree(loaded, params)
  assert list((tmp_path / "tmp").iterdir()) == []
  with pytest.raises(FileExistsError, match="already exists"):
    save_model(bucket / "model", config, params)

  real_copy = tf.io.gfile.copy

  def copy_until_config(source: str, target: str, overwrite: bool = False) -> None:
    if target.endswith("/config.json"):
      raise KeyboardInterrupt("killed")
    real_copy(source, target, overwrite)

  with monkeypatch.context() as patch:
    patch.setattr(tf.io.gfile, "copy", copy_until_config)
    with pytest.raises(KeyboardInterrupt):
      save_model(bucket / "model", config, params, overwrite=True)
  assert (bucket / "model" / "params").is_dir() and not (bucket / "model" / "config.json").exists()
  assert not is_model_dir(bucket / "model")
  with pytest.raises(FileNotFoundError, match="not a hubert-ecg-jax model directory"):
    load_model(bucket / "model")
  assert list((tmp_path / "tmp").iterdir()) == []
  save_model(bucket / "model", config, params, overwrite=True)  # the rerun
  assert_same_tree(load_model(bucket / "model")[1], params)


def test_finetune_and_evaluate_with_the_run_and_models_on_object_storage(
    tmp_path, sample_data_dir, bucket, monkeypatch, capsys) -> None:
  """finetune (from a pretrained model directory, run directory and checkpoints at the URL) and
  evaluate (model and report at the URL) give the classifier and report of local disk."""
  monkeypatch.setenv(MIRRORS_ENV, str(tmp_path / "mirrors"))
  headers = sorted(sample_data_dir.glob("*.hea"))[:15]
  splits = {}
  for split, chosen in (("train", headers[:10]), ("val", headers[10:])):
    for header in chosen:
      for part in sample_data_dir.glob(f"{header.stem}.*"):
        (tmp_path / "links" / split).mkdir(parents=True, exist_ok=True)
        (tmp_path / "links" / split / part.name).symlink_to(part)
    splits[split] = tmp_path / "records" / split
    assert main(["preprocess", str(tmp_path / "links" / split), str(splits[split]),
                 "--workers", "1", "--quiet"]) == 0
  config = HubertECGConfig.preset("tiny")
  pretrained = _random_params(HubertECG(config))
  roots = {"disk": tmp_path / "disk", "url": bucket}
  for root in roots.values():
    save_model(root / "pretrained", config, pretrained)
    assert main(["finetune", "configs/finetune_demo.py", str(root / "run"), "--no-test",
                 "--config.model.init=pretrained",
                 f"--config.model.pretrained={root / 'pretrained'}",
                 f"--config.data.train={splits['train']}", f"--config.data.val={splits['val']}",
                 "--config.train.steps=2", "--config.train.batch_size=4",
                 "--config.train.eval_every=2", "--config.train.log_every=1",
                 "--config.train.devices=1", "--config.train.progress=false"]) == 0
    assert main(["evaluate", str(root / "run" / "best_model"), str(splits["val"]), "--out",
                 str(root / "evaluation"), "--n-boot", "10", "--quiet"]) == 0
  capsys.readouterr()
  models = [load_model(root / "run" / "best_model") for root in roots.values()]
  assert models[0][0] == models[1][0]
  assert_same_tree(models[0][1], models[1][1])
  assert models[0][2]["validation"] == models[1][2]["validation"]
  assert (bucket / "run" / "checkpoints" / "2" / COMMITTED).is_file()
  reports = [root / "evaluation" for root in roots.values()]
  assert sorted(_tree(reports[0])) == sorted(_tree(reports[1]))
  for name in ("predictions.csv", "metrics.csv"):
    assert (reports[0] / name).read_bytes() == (reports[1] / name).read_bytes()
  summaries = [json.loads((report / "metrics.json").read_text()) for report in reports]
  assert summaries[0]["evaluation"] == summaries[1]["evaluation"]
  assert len(list(csv.DictReader(io.StringIO((reports[1] / "predictions.csv").read_text())))) == 5

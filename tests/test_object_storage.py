"""Data, run directories and models at URLs, on TensorFlow's in-memory file system (ram://): what
tf.io.gfile and tf.data read natively, offline, with no atomic commit by rename in our path layer
(files.UrlPath commits by copy, as on gs://). Orbax writes its arrays through tensorstore, which
does not reach ram://: the pre-training run directory stays local here (README: "Data, checkpoints
and models in a bucket")."""
from __future__ import annotations

import io
import json
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import SingleDeviceSharding

from hubert_ecg_jax import files
from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.cli import main
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data import records
from hubert_ecg_jax.data.synthetic import write_wfdb_folder
from hubert_ecg_jax.pretrained import export_hf_directory, load_pretrained
from hubert_ecg_jax.train.checkpointing import CheckpointManager, DataPosition, abstract_like
from hubert_ecg_jax.train.logging import MetricsWriter

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


def _random_params(model: HubertECGForClassification) -> dict:
  """Random params of the shapes `model.init` gives, without running it (it takes seconds)."""
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 400))))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype), shapes["params"])


def _npy(path: files.AnyPath) -> np.ndarray:
  return np.load(io.BytesIO(path.read_bytes()))


def test_pretraining_and_inference_on_object_storage_give_the_outputs_of_local_disk(
    tmp_path, sample_data_dir, bucket, capsys):
  """preprocess -> features -> cluster -> targets -> pretrain (resumed) -> export -> embed and
  predict, with every directory the commands name at a URL, and the same on local disk: the same
  bytes, the same embeddings and predictions. No temporary object is left behind."""
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

  # Pre-training reads records and units from the bucket (its run directory is local: Orbax).
  run = tmp_path / "run"
  args = ["pretrain", "demo_pretrain", str(run), f"--config.data.train_dir={url / 'records'}",
          f"--config.data.train_units={url / 'units'}", f"--config.model.vocab_sizes={K}",
          "--config.data.batch_size=8", "--config.train.log_every=1",
          "--config.train.checkpoint_every=1", "--config.train.progress=false"]
  assert main([*args, "--config.train.total_steps=2"]) == 0
  assert main([*args, "--config.train.total_steps=3"]) == 0
  assert "resumed from step 2" in capsys.readouterr().out

  config = HubertECGConfig.preset("tiny")
  classifier = _random_params(HubertECGForClassification(config, len(LABELS)))
  record = sorted(sample_data_dir.glob("*.hea"))[0]
  for root in roots.values():
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

  class Position:
    def __init__(self, value: int):
      self.value = value

    def save(self, path: str) -> None:
      files.as_path(path).write_text(str(self.value))

    def restore(self, path: str) -> None:
      self.value = int(files.as_path(path).read_text())

  manager = CheckpointManager(tmp_path / "checkpoints")
  leftover = tmp_path / "checkpoints" / ".data-position-process_0"
  leftover.mkdir(parents=True)
  (leftover / "position").write_text("4")  # from a save that was killed
  state = {"w": jnp.ones(3)}
  assert manager.save(5, state, DataPosition(Position(41)))
  assert not leftover.exists()
  restored = Position(0)
  manager.restore(abstract_like(state, SingleDeviceSharding(jax.devices()[0])),
                  DataPosition(restored))
  assert restored.value == 41
  manager.close()


def test_tensorboard_events_at_a_url_and_orbax_refuses_what_it_cannot_write(bucket) -> None:
  """Event files go through the path layer (tensorboardX's own writers need google-cloud-storage
  or boto3); Orbax takes local paths and gs://, and refuses another URL by name instead of writing
  to a local folder called `ram:`."""
  writer = MetricsWriter(bucket / "run" / "tensorboard", print_fn=lambda line: None)
  writer.write(3, {"loss": 1.5}, "train")
  writer.close()
  [events] = (bucket / "run" / "tensorboard").glob("events.out.tfevents.*")
  values = [(value.tag, event.step, value.simple_value)
            for event in tf.compat.v1.train.summary_iterator(str(events))
            for value in event.summary.value]
  assert values == [("train/loss", 3, 1.5)]

  assert str(files.orbax_path("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
  with pytest.raises(ValueError, match="need a local path or a gs:// URL, found ram://"):
    CheckpointManager(bucket / "run" / "checkpoints")

"""TFRecord schema: exact round trips, atomic shard writes, manifests."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hubert_ecg_jax.data import records as R


def _record(rng: np.random.Generator, index: int, num_samples: int, num_labels: int = 3
            ) -> R.StoredRecord:
  signal = rng.uniform(-1, 1, (12, num_samples)).astype(np.float32)
  signal[3, 7] = np.float32(np.nextafter(np.float32(0.5), np.float32(1)))  # a value that must survive
  return R.StoredRecord(
      record_id=f"rec{index:03d}", source=f"/data/rec{index:03d}.hea", signal=signal,
      labels=(rng.random(num_labels) < 0.5).astype(np.float32), source_fs=[500.0, 257.0][index % 2],
      age=math.nan if index % 3 == 0 else 40.0 + index, sex=[R.SEX_MALE, R.SEX_FEMALE, R.SEX_UNKNOWN][index % 3])


def _assert_same(a: R.StoredRecord, b: R.StoredRecord) -> None:
  assert a.record_id == b.record_id and a.source == b.source
  assert a.signal.dtype == b.signal.dtype == np.float32
  assert a.signal.tobytes() == b.signal.tobytes() and a.signal.shape == b.signal.shape
  np.testing.assert_array_equal(a.labels, b.labels)
  assert a.source_fs == b.source_fs and a.sex == b.sex
  assert (math.isnan(a.age) and math.isnan(b.age)) or a.age == b.age


def test_example_round_trip_is_exact():
  rng = np.random.default_rng(0)
  for index, length in enumerate([2500, 5000, 1234, 9001]):
    record = _record(rng, index, length)
    _assert_same(record, R.decode_example(R.encode_example(record)))
  no_labels = _record(rng, 9, 3000, num_labels=0)
  assert R.decode_example(R.encode_example(no_labels)).labels.shape == (0,)


def test_directory_round_trip_numpy_and_tf_data(tmp_path):
  rng = np.random.default_rng(1)
  originals = [_record(rng, i, int(rng.integers(1000, 8000))) for i in range(7)]
  manifest = R.write_records(tmp_path, originals, ["a", "b", "c"], num_shards=3)
  assert [s.num_records for s in manifest.shards] == [2, 2, 3]
  assert manifest.source_sampling_rates == {"500": 4, "257": 3}
  read = list(R.iterate_records(tmp_path))
  for a, b in zip(originals, read, strict=True):
    _assert_same(a, b)

  tf = R.import_tensorflow()
  dataset = tf.data.TFRecordDataset([str(p) for p in R.shard_paths(tmp_path)])
  parsed = list(dataset.map(lambda s: R.parse_example(s, 3)).as_numpy_iterator())
  for record, tensors in zip(originals, parsed, strict=True):
    assert tensors["signal"].dtype == np.float32 and tensors["signal"].shape == record.signal.shape
    assert tensors["signal"].tobytes() == record.signal.tobytes()
    assert tensors["num_samples"] == record.signal.shape[1]
    assert tensors["record_id"].decode() == record.record_id
    np.testing.assert_array_equal(tensors["labels"], record.labels)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_shard_write_is_atomic(tmp_path):
  rng = np.random.default_rng(2)
  examples = [R.encode_example(_record(rng, i, 2500)) for i in range(3)]

  def failing():
    yield examples[0]
    raise RuntimeError("killed")

  target = tmp_path / R.shard_file_name(0, 1)
  with pytest.raises(RuntimeError, match="killed"):
    R.write_shard(target, failing())
  assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file
  assert R.write_shard(target, examples) == 3
  assert list(R.iterate_shard(target)) == examples


def test_manifest_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    R.read_manifest(tmp_path)
  (tmp_path / R.MANIFEST_NAME).write_text(json.dumps({"format": "other", "version": 1}))
  with pytest.raises(ValueError, match="expected format 'hubert-ecg-jax/records'"):
    R.read_manifest(tmp_path)
  unfinished = R.RecordsManifest(job={}, label_names=[], shards=[])
  R.write_manifest(tmp_path, unfinished)
  with pytest.raises(ValueError, match="unfinished preprocessing job"):
    R.shard_paths(tmp_path)
  R.write_manifest(tmp_path, R.RecordsManifest(job={}, label_names=[], complete=True,
                                               shards=[R.ShardInfo("records-00000-of-00001.tfrecord", 1)]))
  with pytest.raises(FileNotFoundError, match="missing"):
    R.shard_paths(tmp_path)


def test_bad_records_are_refused():
  with pytest.raises(ValueError, match=r"float32 \(12, n\).*float64 \(12, 10\)"):
    R.StoredRecord("x", "x", np.zeros((12, 10)), np.zeros(2), 500.0)
  with pytest.raises(ValueError, match=r"float32 \(12, n\).*\(8, 10\)"):
    R.StoredRecord("x", "x", np.zeros((8, 10), np.float32), np.zeros(2), 500.0)
  with pytest.raises(ValueError, match="sex must be"):
    R.StoredRecord("x", "x", np.zeros((12, 10), np.float32), np.zeros(2), 500.0, sex=2)

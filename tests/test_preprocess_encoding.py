"""The records writer that `preprocess` workers and its main process use without TensorFlow: the
examples and the TFRecord files are what TensorFlow writes and reads."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hubert_ecg_jax.data import records as R


def _record(rng: np.random.Generator, num_labels: int, **fields) -> R.StoredRecord:
  return R.StoredRecord(
      record_id=fields.pop("record_id", "folder/ÉCG-1"), source=fields.pop("source", "/data/é.hea"),
      signal=rng.standard_normal((12, 1234)).astype(np.float32),
      labels=rng.integers(0, 2, num_labels).astype(np.float32), source_fs=257.0, **fields)


def _tf_example(tf, record: R.StoredRecord):
  """The record as `tf.train.Example`, built with TensorFlow's own classes."""
  def feature(kind: str, values: list) -> object:
    lists = {"bytes_list": tf.train.BytesList, "float_list": tf.train.FloatList,
             "int64_list": tf.train.Int64List}
    return tf.train.Feature(**{kind: lists[kind](value=values)})

  return tf.train.Example(features=tf.train.Features(feature={
      "signal": feature("bytes_list", [record.signal.astype("<f4").tobytes()]),
      "num_samples": feature("int64_list", [record.signal.shape[1]]),
      "record_id": feature("bytes_list", [record.record_id.encode()]),
      "source": feature("bytes_list", [record.source.encode()]),
      "source_fs": feature("float_list", [record.source_fs]),
      "labels": feature("float_list", record.labels.tolist()),
      "age": feature("float_list", [record.age]),
      "sex": feature("int64_list", [record.sex]),
  }))


@pytest.mark.parametrize("num_labels,fields", [
    (3, {"age": math.nan, "sex": R.SEX_UNKNOWN}),
    (0, {"age": 61.5, "sex": R.SEX_FEMALE}),
    (200, {"age": 1e-3, "sex": R.SEX_MALE, "record_id": "", "source": ""}),
])
def test_example_is_the_tensorflow_example(num_labels, fields):
  tf = R.import_tensorflow()
  record = _record(np.random.default_rng(num_labels), num_labels, **fields)
  ours = tf.train.Example.FromString(R.encode_example(record))
  # NaN != NaN in protobuf equality: compare the age's bits, then the rest with a finite age
  assert np.float32(ours.features.feature["age"].float_list.value[0]).tobytes() == \
      np.float32(record.age).tobytes()
  ours.features.feature["age"].float_list.value[0] = 0.0
  expected = _tf_example(tf, record)
  expected.features.feature["age"].float_list.value[0] = 0.0
  assert ours == expected


def test_masked_crc32c():
  crc = (R.masked_crc32c(b"123456789") - 0xA282EAD8) % 2**32  # unmask: subtract, rotate left by 15
  assert (crc >> 17 | crc << 15) % 2**32 == 0xE3069283  # the CRC-32C check value
  assert R.masked_crc32c(b"") == 0xA282EAD8  # CRC 0, masked


def test_shard_bytes_are_what_tensorflow_writes(tmp_path):
  tf = R.import_tensorflow()
  rng = np.random.default_rng(5)
  # lengths of every remainder modulo 8, and a record-sized one
  examples = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in [0, 1, 7, 8, 9, 250, 4099]]
  examples.append(R.encode_example(_record(rng, 5)))
  assert R.write_shard(tmp_path / "ours.tfrecord", iter(examples)) == len(examples)
  with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
    for example in examples:
      writer.write(example)
  assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
  assert list(R.iterate_shard(tmp_path / "ours.tfrecord")) == examples

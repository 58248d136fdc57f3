"""Pre-training targets stored apart from the records: one small units shard per records shard.

A units directory holds `units.json` and, for each records shard, a TFRecord file of one example
per record (record id + int16 units (codebooks, frames)), in the records shard's order. The
pipeline reads the two side by side; the records are written once and never copied.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.files import AnyPath, as_path, read_json, write_json_atomic

UNITS_MANIFEST = "units.json"
UNITS_FORMAT = "hubert-ecg-jax/units"
UNITS_VERSION = 1
MAX_VOCAB = int(np.iinfo(np.int16).max) + 1  # units are stored as int16


@dataclasses.dataclass
class UnitsManifest:
  """What a units directory holds and which records directory it belongs to."""
  records_shards: list[records_lib.ShardInfo]  # the records' shards, in order (the match key)
  vocab_sizes: list[int]  # K of each codebook
  frames: int  # units per record and codebook
  source: dict[str, Any]  # the features and k-means models the units come from

  @property
  def num_records(self) -> int:
    return sum(shard.num_records for shard in self.records_shards)

  @property
  def codebooks(self) -> int:
    return len(self.vocab_sizes)

  def to_dict(self) -> dict[str, Any]:
    return {"format": UNITS_FORMAT, "version": UNITS_VERSION, **dataclasses.asdict(self),
            "num_records": self.num_records}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], where: str) -> UnitsManifest:
    if data.get("format") != UNITS_FORMAT or data.get("version") != UNITS_VERSION:
      raise ValueError(f"{where}: expected format {UNITS_FORMAT!r} version {UNITS_VERSION}, found "
                       f"{data.get('format')!r} version {data.get('version')!r}")
    return cls([records_lib.ShardInfo(**s) for s in data["records_shards"]],
               [int(k) for k in data["vocab_sizes"]], int(data["frames"]), dict(data["source"]))


def units_file_name(records_shard: str) -> str:
  """'records-00003-of-00010.tfrecord' -> 'units-00003-of-00010.tfrecord'."""
  stem = records_shard.removesuffix(".tfrecord").removeprefix("records-")
  return f"units-{stem}.tfrecord"


def write_units_manifest(directory: str | os.PathLike, manifest: UnitsManifest) -> None:
  write_json_atomic(as_path(directory) / UNITS_MANIFEST, manifest.to_dict())


def read_units_manifest(directory: str | os.PathLike) -> UnitsManifest:
  path = as_path(directory) / UNITS_MANIFEST
  data = read_json(path, "a units directory written by `hubert-ecg-jax targets`")
  return UnitsManifest.from_dict(data, str(path))


def matched_units(units_dir: str | os.PathLike, records_dir: str | os.PathLike,
                  records: records_lib.RecordsManifest | None = None
                  ) -> tuple[UnitsManifest, list[AnyPath]]:
  """The units manifest and its shard files, one per records shard, after checking that they
  belong to these records (shard names and record counts) and that every shard is written."""
  records = records or records_lib.read_manifest(records_dir)
  manifest = read_units_manifest(units_dir)
  ours = [(s.file, s.num_records) for s in records.shards]
  theirs = [(s.file, s.num_records) for s in manifest.records_shards]
  if ours != theirs:
    raise ValueError(f"the units in {units_dir} were made for other records ({manifest.num_records} "
                     f"records in {len(theirs)} shards) than {records_dir} ({records.num_records} "
                     f"records in {len(ours)} shards): write units for these records with "
                     "`hubert-ecg-jax targets`")
  paths = [as_path(units_dir) / units_file_name(name) for name, _ in ours]
  missing = [p.name for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"{units_dir} is unfinished: {len(missing)} of {len(paths)} units shards "
                            f"missing (e.g. {missing[:2]}); rerun the same `hubert-ecg-jax targets` "
                            "command to finish it")
  return manifest, paths


def encode_units(record_id: str, units: np.ndarray) -> bytes:
  """One record's units (codebooks, frames) as a serialized `tf.train.Example`."""
  data = np.ascontiguousarray(units, dtype="<i2").tobytes()
  return records_lib.example_bytes({"record_id": records_lib.bytes_feature(record_id.encode()),
                                    "units": records_lib.bytes_feature(data)})


def write_units_shard(path: str | os.PathLike, units: Iterable[tuple[str, np.ndarray]]) -> int:
  """Writes (record id, units (codebooks, frames)) pairs as one units shard, atomically; returns
  how many."""
  return records_lib.write_shard(path, (encode_units(i, u) for i, u in units))


def decode_units(serialized: bytes, shape: tuple[int, int]) -> tuple[str, np.ndarray]:
  """Inverse of `encode_units`, in numpy: (record id, int32 units of `shape`)."""
  tf = records_lib.import_tensorflow()
  feature = tf.train.Example.FromString(serialized).features.feature
  units = np.frombuffer(feature["units"].bytes_list.value[0], "<i2")
  if units.size != shape[0] * shape[1]:
    raise ValueError(f"{units.size} units in an example, expected {shape[0]} x {shape[1]}")
  return feature["record_id"].bytes_list.value[0].decode(), units.reshape(shape).astype(np.int32)


def parse_units(serialized: Any, shape: tuple[int, int]) -> dict[str, Any]:
  """Inside tf.data: {"record_id": string, "targets": int32 (codebooks, frames)}."""
  tf = records_lib.import_tensorflow()
  spec = {"record_id": tf.io.FixedLenFeature([], tf.string),
          "units": tf.io.FixedLenFeature([], tf.string)}
  parsed = tf.io.parse_single_example(serialized, spec)
  units = tf.io.decode_raw(parsed["units"], tf.int16, little_endian=True)
  return {"record_id": parsed["record_id"],
          "targets": tf.reshape(tf.cast(units, tf.int32), list(shape))}

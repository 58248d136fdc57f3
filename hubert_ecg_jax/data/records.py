"""Sharded TFRecord storage of preprocessed ECGs: schema, shard writer/reader and manifest.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from hubert_ecg_jax.config import NUM_LEADS
from hubert_ecg_jax.files import AnyPath, as_path, atomic_path, move, read_json, write_json_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hubert-ecg-jax/records"
MANIFEST_VERSION = 1
RECORDS_PER_SHARD = 512  # streaming writes
SEX_FEMALE, SEX_MALE, SEX_UNKNOWN = 0, 1, -1
_CRC32C_POLYNOMIAL = 0x82F63B78  # reflected
_CRC32C_MASK_DELTA = 0xA282EAD8  # TFRecord's mask: rotate right by 15 bits, add this


@dataclasses.dataclass
class StoredRecord:
  """One preprocessed record as stored in a shard."""
  record_id: str
  source: str
  signal: np.ndarray  # float32 (12, num_samples) at 500 Hz
  labels: np.ndarray  # float32 (num_labels,)
  source_fs: float
  age: float = math.nan
  sex: int = SEX_UNKNOWN

  def __post_init__(self) -> None:
    signal = np.asarray(self.signal)
    if signal.ndim != 2 or signal.shape[0] != NUM_LEADS or signal.dtype != np.float32:
      raise ValueError(f"record {self.record_id!r}: signal must be float32 ({NUM_LEADS}, n), "
                       f"found {signal.dtype} {signal.shape}")
    labels = np.asarray(self.labels)
    if labels.ndim != 1:
      raise ValueError(f"record {self.record_id!r}: labels must be 1-D, found shape {labels.shape}")
    self.labels = labels.astype(np.float32)
    if self.sex not in (SEX_FEMALE, SEX_MALE, SEX_UNKNOWN):
      raise ValueError(f"record {self.record_id!r}: sex must be 0, 1 or -1, found {self.sex!r}")


@dataclasses.dataclass
class ShardInfo:
  file: str
  num_records: int


@dataclasses.dataclass
class RecordsManifest:
  """What a records directory holds; written as `manifest.json` beside the shards."""
  job: dict[str, Any]  # the settings that produced it; a rerun must match them to resume
  label_names: list[str]
  shards: list[ShardInfo]
  num_records: int = 0
  complete: bool = False
  source_sampling_rates: dict[str, int] = dataclasses.field(default_factory=dict)  # Hz -> count
  preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)
  failures: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {"path", "reason"}

  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  def to_dict(self) -> dict[str, Any]:
    out = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
    out.update(dataclasses.asdict(self))
    out["num_failed"] = len(self.failures)
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> RecordsManifest:
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
      raise ValueError(f"{where}: expected format {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}, "
                       f"found {data.get('format')!r} version {data.get('version')!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k in fields}
    values["shards"] = [ShardInfo(**s) for s in data["shards"]]
    return cls(**values)


def shard_file_name(index: int, count: int) -> str:
  return f"records-{index:05d}-of-{count:05d}.tfrecord"


_tensorflow_configured = False


def import_tensorflow() -> Any:
  """TensorFlow, kept off accelerators (it only reads and parses data here; JAX owns them)."""
  global _tensorflow_configured
  import tensorflow as tf
  if not _tensorflow_configured:
    if tf.config.list_physical_devices("GPU"):
      tf.config.set_visible_devices([], "GPU")
    _tensorflow_configured = True
  return tf


def _varint(value: int) -> bytes:
  """Protocol-buffer varint of 0 <= value < 2**64: 7 bits a byte, low bits first."""
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protocol-buffer field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bytes_feature(value: bytes) -> bytes:
  """A `tf.train.Feature` holding one bytes value, serialized."""
  return _field(1, _field(1, value))  # Feature.bytes_list: BytesList.value


def _int_feature(value: int) -> bytes:
  return _field(3, _field(1, _varint(int(value) % 2**64)))  # Feature.int64_list: packed, 2's complement


def _floats_feature(values: Sequence[float] | np.ndarray) -> bytes:
  packed = np.asarray(values, "<f4").tobytes()
  return _field(2, _field(1, packed) if packed else b"")  # Feature.float_list: packed float32


def encode_example(record: StoredRecord) -> bytes:
  """Serialises one record as a `tf.train.Example`.

  The protocol-buffer wire format is written here (features in name order), so that worker
  processes encode without importing TensorFlow and equal records give equal bytes in any process
  (TensorFlow's own serialisation orders the features differently from one process to the next)."""
  signal = np.ascontiguousarray(record.signal, dtype="<f4")
  features = {
      "signal": bytes_feature(signal.tobytes()),
      "num_samples": _int_feature(signal.shape[1]),
      "record_id": bytes_feature(record.record_id.encode()),
      "source": bytes_feature(record.source.encode()),
      "source_fs": _floats_feature([record.source_fs]),
      "labels": _floats_feature(record.labels),
      "age": _floats_feature([record.age]),
      "sex": _int_feature(record.sex),
  }
  return example_bytes(features)


def example_bytes(features: Mapping[str, bytes]) -> bytes:
  """A serialized `tf.train.Example` of serialized features, in name order (the same bytes in
  every process)."""
  # Example.features: Features.feature, a map<string, Feature> (entries: key 1, value 2)
  entries = b"".join(_field(1, _field(1, name.encode()) + _field(2, feature))
                     for name, feature in sorted(features.items()))
  return _field(1, entries)


def decode_example(serialized: bytes) -> StoredRecord:
  """Inverse of `encode_example`, in numpy."""
  tf = import_tensorflow()
  feature = tf.train.Example.FromString(serialized).features.feature
  num_samples = feature["num_samples"].int64_list.value[0]
  signal = np.frombuffer(feature["signal"].bytes_list.value[0], dtype="<f4")
  return StoredRecord(
      record_id=feature["record_id"].bytes_list.value[0].decode(),
      source=feature["source"].bytes_list.value[0].decode(),
      signal=signal.reshape(NUM_LEADS, num_samples).astype(np.float32),
      labels=np.asarray(feature["labels"].float_list.value, np.float32),
      source_fs=float(feature["source_fs"].float_list.value[0]),
      age=float(feature["age"].float_list.value[0]),
      sex=int(feature["sex"].int64_list.value[0]))


def parse_example(serialized: Any, num_labels: int) -> dict[str, Any]:
  """Parses one serialized example inside tf.data.

  Returns tensors: signal float32 (12, n), num_samples int64, record_id string, source string,
  source_fs, age float32, sex int64, labels float32 (num_labels,).
  """
  tf = import_tensorflow()
  spec = {
      "signal": tf.io.FixedLenFeature([], tf.string),
      "num_samples": tf.io.FixedLenFeature([], tf.int64),
      "record_id": tf.io.FixedLenFeature([], tf.string),
      "source": tf.io.FixedLenFeature([], tf.string),
      "source_fs": tf.io.FixedLenFeature([], tf.float32),
      "labels": tf.io.FixedLenFeature([num_labels], tf.float32),
      "age": tf.io.FixedLenFeature([], tf.float32),
      "sex": tf.io.FixedLenFeature([], tf.int64),
  }
  parsed = tf.io.parse_single_example(serialized, spec)
  signal = tf.io.decode_raw(parsed["signal"], tf.float32, little_endian=True)
  parsed["signal"] = tf.reshape(signal, [NUM_LEADS, -1])
  return parsed


@functools.cache
def _crc32c_tables() -> np.ndarray:
  """CRC-32C (Castagnoli, reflected) slicing-by-8 tables: row k is row 0 carried k bytes on.

  int64 (8, 256), as the kernel computes in int64 (values below 2**32)."""
  tables = np.zeros((8, 256), np.int64)
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = crc >> 1 ^ (_CRC32C_POLYNOMIAL if crc & 1 else 0)
    tables[0, byte] = crc
  for k in range(1, 8):
    tables[k] = tables[k - 1] >> 8 ^ tables[0, tables[k - 1] & 0xFF]
  return tables


def _crc32c_loop(words: np.ndarray, tail: np.ndarray, tables: np.ndarray) -> int:
  """CRC-32C of the bytes of `words` (int64, 8 bytes little-endian each), then of `tail` (uint8)."""
  crc = 0xFFFFFFFF
  for word in words:
    x = word ^ crc
    crc = (tables[7, x & 0xFF] ^ tables[6, x >> 8 & 0xFF] ^ tables[5, x >> 16 & 0xFF]
           ^ tables[4, x >> 24 & 0xFF] ^ tables[3, x >> 32 & 0xFF] ^ tables[2, x >> 40 & 0xFF]
           ^ tables[1, x >> 48 & 0xFF] ^ tables[0, x >> 56 & 0xFF])
  for byte in tail:
    crc = tables[0, (crc ^ byte) & 0xFF] ^ crc >> 8
  return crc ^ 0xFFFFFFFF


@functools.cache
def _crc32c_kernel() -> Callable[[np.ndarray, np.ndarray, np.ndarray], int]:
  import numba  # only writers need it, not the worker processes that import this module

  return numba.njit(nogil=True, cache=True)(_crc32c_loop)


def masked_crc32c(data: bytes) -> int:
  """The masked CRC-32C that TFRecord files store beside each length and each record."""
  array = np.frombuffer(data, np.uint8)
  cut = len(array) - len(array) % 8
  crc = int(_crc32c_kernel()(array[:cut].view("<i8"), array[cut:], _crc32c_tables()))
  return ((crc >> 15 | crc << 17) + _CRC32C_MASK_DELTA) & 0xFFFFFFFF


def write_shard(path: str | os.PathLike, serialized_records: Iterable[bytes]) -> int:
  """Writes serialized examples to `path` atomically (temporary file, then rename); returns count.

  TFRecord format, written here without TensorFlow: per record its length (uint64), the length's
  masked CRC-32C (uint32), the data and the data's masked CRC-32C, all little-endian."""
  count = 0
  with atomic_path(path) as temporary, temporary.open("wb") as file:
    for serialized in serialized_records:
      length = struct.pack("<Q", len(serialized))
      file.write(length + struct.pack("<I", masked_crc32c(length)))
      file.write(serialized)
      file.write(struct.pack("<I", masked_crc32c(serialized)))
      count += 1
  return count


def write_manifest(directory: str | os.PathLike, manifest: RecordsManifest) -> None:
  write_json_atomic(as_path(directory) / MANIFEST_NAME, manifest.to_dict())


def read_manifest(directory: str | os.PathLike) -> RecordsManifest:
  """Reads `manifest.json` of a records directory."""
  path = as_path(directory) / MANIFEST_NAME
  data = read_json(path, "a directory written by `hubert-ecg-jax preprocess`")
  return RecordsManifest.from_dict(data, where=str(path))


def shard_paths(directory: str | os.PathLike, manifest: RecordsManifest | None = None
                ) -> list[AnyPath]:
  """Paths of the shard files of a complete records directory, in manifest order."""
  manifest = manifest or read_manifest(directory)
  if not manifest.complete:
    raise ValueError(f"{directory} holds an unfinished preprocessing job: rerun "
                     "`hubert-ecg-jax preprocess` with the same arguments to finish it")
  paths = [as_path(directory) / shard.file for shard in manifest.shards]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"shard files listed in the manifest are missing: {missing[:3]}")
  return paths


class CorruptShardError(ValueError):
  """A shard file that cannot be read to the end the manifest lists (damaged or cut short)."""


def iterate_shard(path: str | os.PathLike) -> Iterator[bytes]:
  """Serialized examples of one shard file, in order; a damaged one raises `CorruptShardError`."""
  tf = import_tensorflow()
  read = 0
  try:
    for serialized in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      yield serialized
      read += 1
  except tf.errors.DataLossError as error:
    raise CorruptShardError(f"{path}: unreadable after {read} record(s), the shard is damaged or cut "
                            f"short ({error.message.splitlines()[0]}); `hubert-ecg-jax verify` "
                            "checks a whole directory") from None


def iterate_records(directory: str | os.PathLike) -> Iterator[StoredRecord]:
  """Every record of a records directory, in shard order, as numpy (fine-tuning fractions, tests)."""
  for path in shard_paths(directory):
    for serialized in iterate_shard(path):
      yield decode_example(serialized)


def write_records(directory: str | os.PathLike, records: Iterable[StoredRecord],
                  label_names: Iterable[str], num_shards: int | None = None,
                  job: Mapping[str, Any] | None = None, failures: Sequence[Mapping[str, str]] = ()
                  ) -> RecordsManifest:
  """Writes records (e.g. synthetic or prepared ones) as a complete records directory, staged and
  renamed into place with its manifest, so a failure leaves nothing behind.

  num_shards: contiguous blocks in the order given; None: streaming, `RECORDS_PER_SHARD` records a
  shard (one shard in memory at a time). All records must have as many labels as `label_names`.
  `failures` ({"path", "reason"}) are kept in the manifest.
  """
  if num_shards is None:
    blocks = _chunks(records, RECORDS_PER_SHARD)
  else:
    records = list(records)
    if num_shards < 1 or num_shards > max(len(records), 1):
      raise ValueError(f"num_shards must be in 1..{max(len(records), 1)}, found {num_shards}")
    bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
    blocks = (records[bounds[i]:bounds[i + 1]] for i in range(num_shards))
  directory = as_path(directory)
  if (directory / MANIFEST_NAME).exists():
    raise FileExistsError(f"{directory} already holds a records manifest; choose an empty directory")
  # Shards without a manifest are an interrupted write of an earlier version: replaced.
  if directory.exists() and any(not p.match("records-*.tfrecord") for p in directory.iterdir()):
    raise FileExistsError(f"{directory} holds other files; choose an empty directory")
  manifest = RecordsManifest(dict(job or {"written_by": "records.write_records"}),
                             [str(name) for name in label_names], [], failures=list(failures))

  def examples(block: Iterable[StoredRecord]) -> Iterator[bytes]:
    for record in block:
      if record.labels.shape != (manifest.num_labels,):
        raise ValueError(f"record {record.record_id!r} does not have {manifest.num_labels} labels")
      rate = f"{record.source_fs:g}"
      manifest.source_sampling_rates[rate] = manifest.source_sampling_rates.get(rate, 0) + 1
      yield encode_example(record)

  with atomic_path(directory, folder=True) as staging:
    counts = [write_shard(staging / f"block-{index}", examples(block))
              for index, block in enumerate(blocks)]
    if not counts:
      raise ValueError(f"no record to write to {directory} ({len(manifest.failures)} failed, e.g. "
                       f"{manifest.failures[:2]})")
    for index, count in enumerate(counts):  # the shard count is known only now
      name = shard_file_name(index, len(counts))
      move(staging / f"block-{index}", staging / name)
      manifest.shards.append(ShardInfo(name, count))
    manifest.num_records = sum(counts)
    manifest.complete = True
    write_manifest(staging, manifest)
  return manifest


def _chunks(records: Iterable[StoredRecord], size: int) -> Iterator[list[StoredRecord]]:
  block: list[StoredRecord] = []
  for record in records:
    block.append(record)
    if len(block) == size:
      yield block
      block = []
  if block:
    yield block

"""Streaming tf.data input pipeline over a records directory (see `records`), for training and evaluation.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, NUM_LEADS, HubertECGConfig
from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data import units as units_lib
from hubert_ecg_jax.data.masking import sample_span_mask
from hubert_ecg_jax.data.online import fast_model_inputs
from hubert_ecg_jax.data.preprocess import WINDOW_SAMPLES
from hubert_ecg_jax.data.records import CorruptShardError
from hubert_ecg_jax.files import as_path

_EPOCH_SEED_STRIDE = 1_000_003
SKIPPED = "skipped_records"  # batch key with `skip_corrupted`: damaged records left out before it
_BLOCK = 8  # records a shard's reader reads per step


class DataPositionMismatch(ValueError):
  """A saved iterator state of another input pipeline (other version, settings or data layout)."""


@dataclasses.dataclass(frozen=True)
class DamagedShard:
  """A shard file whose reading stopped at an unreadable record."""
  path: str
  units: bool  # a units shard (written by `targets`), not a records shard
  read: int  # records read before the first unreadable one
  listed: int  # records the manifest lists for it

  def _check(self) -> str:
    return f"`hubert-ecg-jax verify {as_path(self.path).parent}` lists the damaged shards"

  def error(self, training: bool) -> str:
    """The one-line message that stops a strict run (`training`: a run that resumes)."""
    fix = ("delete it and rerun the `hubert-ecg-jax targets` command that wrote it (it writes "
           "missing shards again)" if self.units else
           "replace it from its source (a copy, or `hubert-ecg-jax preprocess` again)")
    rerun = ("rerun this command: it resumes from the last complete checkpoint. Or pass "
             "--config.data.skip_corrupted=true to skip damaged records" if training else
             "rerun this command")
    return (f"{self.path}: record {self.read + 1} of {self.listed} cannot be read (the shard is "
            f"damaged or cut short). {self._check()}; {fix}, then {rerun}.")

  def note(self) -> str:
    """The line that tells of a skip."""
    return (f"skipped {self.listed - self.read} damaged records of {self.path} (records "
            f"{self.read + 1} to {self.listed} of {self.listed}, in every epoch; counted as "
            f"{SKIPPED}); {self._check()}")


class DamagedShards:
  """The damaged shards a pipeline's readers met, each file once, in order; filled from tf.data's
  threads (every epoch meets them again)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._found: dict[str, DamagedShard] = {}

  def add(self, shard: DamagedShard) -> None:
    with self._lock:
      self._found.setdefault(shard.path, shard)

  def found(self) -> list[DamagedShard]:
    with self._lock:
      return list(self._found.values())


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Settings of the input pipeline (one host's view)."""
  batch_size: int
  seed: int = 0
  train_crop: str = "random"  # "random": uniform aligned 5-s window; "first": the first 5 s
  eval_crop: str = "first"  # "first", "tta" (evenly spaced) or "random" (seeded) windows
  eval_crops: int = 1  # windows per record for "tta" and "random"
  mask_prob: float = 0.33
  mask_span: int = 1
  min_masks: int = 2
  honour_padding: bool = True  # no masks on padding frames (False: as the original)
  shuffle_buffer: int = 256  # windows
  cycle_length: int = 8  # shard files read at once
  parallel_batches: int = 2  # online-stage calls in flight
  prefetch_batches: int = 2
  threads: int | None = None  # tf.data threads (None: TensorFlow's default, all cores)
  # A damaged shard stops training (False) or its unreadable records are skipped and counted (True).
  # Evaluation passes always stop.
  skip_corrupted: bool = False
  process_index: int | None = None  # None: jax.process_index()
  process_count: int | None = None  # None: jax.process_count()
  model_config: HubertECGConfig = dataclasses.field(default_factory=HubertECGConfig)

  def __post_init__(self) -> None:
    problems = []
    if self.seed < 0:
      problems.append(f"seed must be non-negative, found {self.seed}")
    if self.batch_size < 1:
      problems.append(f"batch_size must be at least 1, found {self.batch_size}")
    if self.train_crop not in ("random", "first"):
      problems.append(f"train_crop must be 'random' or 'first', found {self.train_crop!r}")
    if self.eval_crop not in ("first", "tta", "random"):
      problems.append(f"eval_crop must be 'first', 'tta' or 'random', found {self.eval_crop!r}")
    if self.eval_crops < 1 or (self.eval_crop == "first" and self.eval_crops != 1):
      problems.append(f"eval_crops must be 1 for 'first' and at least 1 otherwise, found {self.eval_crops}")
    for name in ("shuffle_buffer", "cycle_length", "parallel_batches", "prefetch_batches"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be at least 1, found {getattr(self, name)}")
    if problems:
      raise ValueError("bad PipelineConfig: " + "; ".join(problems))

  def hosts(self) -> tuple[int, int]:
    """(process_index, process_count), from JAX where not given."""
    index, count = self.process_index, self.process_count
    if index is None or count is None:
      index = jax.process_index() if index is None else index
      count = jax.process_count() if count is None else count
    if not 0 <= index < count:
      raise ValueError(f"process_index must be in 0..{count - 1}, found {index}")
    return index, count

  def resolved(self) -> PipelineConfig:
    """This config with the host index and count filled in."""
    index, count = self.hosts()
    return dataclasses.replace(self, process_index=index, process_count=count)

  @property
  def num_frames(self) -> int:
    return self.model_config.num_frames(MODEL_INPUT_LENGTH)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Iterates a pipeline's batches as numpy dicts; its position can be saved and restored.

  `damaged` are the shards the pipeline's readers found damaged: with `skip` False the first one
  stops the iteration with `CorruptShardError`, with `skip` True each is told once through `log`.
  `training`: the error says how to resume the run, and that skipping is an option.
  """

  def __init__(self, dataset: Any, damaged: DamagedShards | None = None, skip: bool = False,
               training: bool = False, log: Callable[[str], None] = print):
    self.dataset = dataset
    self._iterator = iter(dataset)
    self._damaged = damaged or DamagedShards()
    self._skip, self._training, self._log = skip, training, log
    self._told = 0  # damaged shards told of (skip)

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      element = next(self._iterator)
    except StopIteration:
      self.check_damage()
      raise
    self.check_damage()
    batch = {key: value.numpy() for key, value in element.items()}
    batch["record_id"] = np.array([value.decode() for value in batch["record_id"]])
    skipped = batch.pop(SKIPPED, None)  # training batches: 0 unless damaged records are skipped
    if self._skip and skipped is not None:
      batch[SKIPPED] = int(skipped.sum())
    return batch

  def check_damage(self) -> None:
    """Raises `CorruptShardError` for a damaged shard met (strict), or tells of new ones (skip)."""
    found = self._damaged.found()
    if found and not self._skip:
      raise CorruptShardError(found[0].error(self._training))
    for shard in found[self._told:]:
      self._log(shard.note())
    self._told = len(found)

  def save(self, path: str | os.PathLike) -> str:
    """Writes the iterator state (a TF checkpoint with prefix `path`); returns the written prefix.

    Strict: if the readers met a damaged shard by the end of the write, the state may lie past
    it (a resume would lose the rest of that shard), so it is replaced by a note that `restore`
    refuses: a resume then takes an earlier checkpoint.
    """
    tf = records_lib.import_tensorflow()
    prefix = tf.train.Checkpoint(iterator=self._iterator).write(str(path))
    found = self._damaged.found()
    if found and not self._skip:
      for written in tf.io.gfile.glob(f"{prefix}.*"):
        tf.io.gfile.remove(written)
      with tf.io.gfile.GFile(f"{prefix}.damaged", "w") as note:
        note.write("this data position was saved after the input met a damaged shard: "
                   f"{found[0].error(self._training)}")
    return prefix

  def restore(self, path: str | os.PathLike) -> None:
    """Moves this iterator to the state saved at `path` (from an iterator over the same pipeline)."""
    tf = records_lib.import_tensorflow()
    if tf.io.gfile.exists(f"{path}.damaged"):
      with tf.io.gfile.GFile(f"{path}.damaged") as note:
        raise CorruptShardError(note.read())
    if not tf.io.gfile.exists(f"{path}.index"):
      raise FileNotFoundError(f"no iterator state at {path} (expected {path}.index)")
    try:
      tf.train.Checkpoint(iterator=self._iterator).read(str(path)).assert_consumed()
    except tf.errors.NotFoundError as error:  # TF's words for a state of another dataset graph
      raise DataPositionMismatch(
          f"the data position at {path} was saved by another input pipeline (an earlier version "
          "of hubert-ecg-jax, or other data settings such as units or crops), so this run cannot "
          "continue its stream. Resume with the version and settings that saved it, or train in a "
          f"new run directory. TensorFlow said: {error.message.splitlines()[0]}") from None


@dataclasses.dataclass(frozen=True)
class _HostFiles:
  """What one host reads: its records shards (and their units shards), and whether records, not
  files, are split between the hosts (fewer files than hosts)."""
  manifest: records_lib.RecordsManifest
  records: list[str]
  counts: list[int]  # records the manifest lists for each file
  units: list[str] | None
  units_shape: tuple[int, int] | None  # (codebooks, frames)
  split_records: bool


def _host_files(directory: str | os.PathLike, config: PipelineConfig, units_dir: str | None,
                crop: str) -> _HostFiles:
  manifest = records_lib.read_manifest(directory)
  paths = [str(p) for p in records_lib.shard_paths(directory, manifest)]
  units_paths, units_shape = None, None
  if units_dir is not None:
    if crop != "first":
      raise ValueError(f"units belong to the first 5 s of a record: reading them needs the crop "
                       f"'first', found {crop!r}")
    units, found = units_lib.matched_units(units_dir, directory, manifest)
    if units.frames != config.num_frames:
      raise ValueError(f"the units in {units_dir} have {units.frames} frames per record; the model "
                       f"makes {config.num_frames} of a 5-s input")
    units_paths, units_shape = [str(p) for p in found], (units.codebooks, units.frames)
  index, count = config.hosts()
  split_records = len(paths) < count
  counts = [shard.num_records for shard in manifest.shards]
  host_records = (len(range(index, sum(counts), count)) if split_records
                  else sum(counts[index::count]))
  if host_records == 0:
    raise ValueError(f"host {index} of {count} gets no records from {directory} "
                     f"({manifest.num_records} records in {len(paths)} shard files)")
  if not split_records:
    paths, counts = paths[index::count], counts[index::count]
    units_paths = None if units_paths is None else units_paths[index::count]
  return _HostFiles(manifest, paths, counts, units_paths, units_shape, split_records)


def _options(config: PipelineConfig) -> Any:
  tf = records_lib.import_tensorflow()
  options = tf.data.Options()
  options.deterministic = True
  # The online stage is a pure numpy function; its "state" need not be saved with the iterator.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  if config.threads:
    options.threading.private_threadpool_size = config.threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _crop(tf: Any, signal: Any, offsets: Any, count: int) -> list[Any]:
  """signal (12, n), offsets (count,) -> count windows (12, 2500), zero-padded at the end if n < 2500."""
  short = tf.maximum(WINDOW_SAMPLES - tf.shape(signal)[1], 0)
  signal = tf.cond(short > 0, lambda: tf.pad(signal, [[0, 0], [0, short]]), lambda: signal)
  return [tf.ensure_shape(tf.slice(signal, tf.stack([0, offsets[i]]), [-1, WINDOW_SAMPLES]),
                          [NUM_LEADS, WINDOW_SAMPLES]) for i in range(count)]


def _crop_offsets(tf: Any, num_samples: Any, mode: str, count: int, seed: Any) -> Any:
  """(count,) int32 offsets of 5-s windows; the TensorFlow twin of `preprocess.crop_offsets`."""
  last = tf.maximum(tf.cast(num_samples, tf.int32) - WINDOW_SAMPLES, 0)
  if mode == "first":
    return tf.zeros([count], tf.int32)
  if mode == "random":
    return tf.random.stateless_uniform([count], seed=seed, minval=0, maxval=last + 1, dtype=tf.int32)
  spaced = tf.linspace(tf.constant(0.0, tf.float64), tf.cast(last, tf.float64), count)
  return tf.cast(tf.round(spaced), tf.int32)


def _until_unreadable(tf: Any, path: Any) -> Any:
  """Blocks of `_BLOCK` records of one shard file up to the first unreadable one, then an empty
  block. The block that ends the file (short or empty) reaches `_shard_reader`'s scan in the very
  call that met the end, and nothing runs asynchronously in between: so a saved position past a
  damaged record is one whose damage was reported (see `BatchIterator.save`)."""
  return tf.data.TFRecordDataset(path).ignore_errors().batch(_BLOCK).concatenate(
      tf.data.Dataset.from_tensors(tf.constant([], tf.string)))


def _placeholders(files: _HostFiles) -> list[bytes]:
  """Serialized stand-ins for a damaged shard's marker element (a record, and its units): they
  parse like any record and are dropped before batching."""
  record = records_lib.StoredRecord(
      record_id="", source="", signal=np.zeros((NUM_LEADS, 0), np.float32),
      labels=np.zeros(files.manifest.num_labels, np.float32), source_fs=0.0)
  out = [records_lib.encode_example(record)]
  if files.units is not None:
    out.append(units_lib.encode_units("", np.zeros(files.units_shape, np.int16)))
  return out


def _shard_reader(tf: Any, files: _HostFiles, skip: bool, damaged: DamagedShards | None
                  ) -> Callable[..., Any]:
  """Reads one records shard (beside its units shard) as elements (payload, skipped): payload the
  serialized (example,) or (example, units), skipped 0. A shard that ends before its listed count
  is reported; with `skip` it then yields one marker element: placeholders, skipped = the records
  lost. Records are read and checked in blocks (one scan step per block), then unbatched."""
  placeholders = _placeholders(files)

  def report(path: bytes, units: bool, read: np.int64, listed: np.int64) -> np.int64:
    shard = DamagedShard(path.decode(), bool(units), int(read), int(listed))
    if damaged is None and not skip:
      raise CorruptShardError(shard.error(training=False))  # a bare dataset: stop it here
    if damaged is not None:
      damaged.add(shard)
    return np.int64(listed - read)

  def read(records_path: Any, listed: Any, units_path: Any = None) -> Any:
    paths = [records_path] if units_path is None else [records_path, units_path]
    sides = tf.data.Dataset.zip(tuple(_until_unreadable(tf, path) for path in paths))

    def step(state: tuple[Any, Any], blocks: tuple[Any, ...]) -> tuple[Any, Any]:
      count, ended = state  # records given so far; whether a side has ended
      sizes = tf.stack([tf.size(block, tf.int64) for block in blocks])
      both, side = tf.reduce_min(sizes), tf.argmin(sizes)  # a short block: that side ended
      # Checked with the block that ends a side, in the call that read it (see _until_unreadable).
      lost = tf.cond(~ended & (both < _BLOCK) & (count + both < listed), lambda: tf.numpy_function(
          report, [tf.gather(tf.stack(paths), side), side > 0, count + both, listed], tf.int64,
          stateful=True), lambda: tf.constant(0, tf.int64))
      lost = tf.reshape(lost, [])
      markers = tf.cast(lost > 0, tf.int32) if skip else 0  # skip: a marker element after the block
      payload = tuple(tf.concat([block[:both], tf.fill([markers], placeholder)], 0)
                      for block, placeholder in zip(blocks, placeholders))
      state = (count + both, ended | (both < _BLOCK))
      return state, (payload, tf.concat([tf.zeros([both], tf.int64), tf.fill([markers], lost)], 0))

    initial = (tf.constant(0, tf.int64), tf.constant(False))
    blocks = sides.scan(initial, step)
    return blocks.filter(lambda payload, lost: tf.size(payload[0]) > 0).unbatch()

  return read


def _record_stream(tf: Any, files: _HostFiles, config: PipelineConfig, file_seed: Any | None,
                   skip: bool, damaged: DamagedShards | None) -> Any:
  """This host's part of one pass over the files: (payload, skipped) elements (see
  `_shard_reader`), a records shard read side by side with its units shard when there are units."""
  counts = np.array(files.counts, np.int64)
  if files.units is None:
    shards = tf.data.Dataset.from_tensor_slices((files.records, counts))
  else:
    shards = tf.data.Dataset.from_tensor_slices((files.records, counts, files.units))
  if file_seed is not None:  # the same permutation with or without units
    shards = shards.shuffle(len(files.records), seed=file_seed)
  stream = shards.interleave(_shard_reader(tf, files, skip, damaged),
                             cycle_length=min(config.cycle_length, len(files.records)),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if files.split_records:
    index, count = config.hosts()
    stream = stream.shard(count, index)
  return stream


def _parse(tf: Any, payload: tuple[Any, ...], files: _HostFiles) -> dict[str, Any]:
  """The parsed record of a stream payload, with its units as "targets" when there are units."""
  parsed = records_lib.parse_example(payload[0], files.manifest.num_labels)
  if files.units is None:
    return parsed
  units = units_lib.parse_units(payload[1], files.units_shape)
  in_step = tf.debugging.assert_equal(
      parsed["record_id"], units["record_id"],
      message="a units shard is out of step with its records shard (another records directory's "
      "units?): write the units again with `hubert-ecg-jax targets`")
  with tf.control_dependencies([in_step]):
    parsed["targets"] = tf.identity(units["targets"])
  return parsed


def _element(parsed: dict[str, Any], windows: Any, offsets: Any) -> dict[str, Any]:
  element = {"windows": windows, "labels": parsed["labels"], "record_id": parsed["record_id"],
             "crop_offset": offsets}
  if "targets" in parsed:
    element["targets"] = parsed["targets"]
  return element


def _some_record_readable(tf: Any, files: _HostFiles) -> bool:
  """Whether some shard file of this host (and its units shard) starts with a readable record."""
  for paths in zip(files.records, *([files.units] if files.units else [])):
    try:
      if all(len(list(tf.data.TFRecordDataset(path).take(1))) for path in paths):
        return True
    except tf.errors.OpError:
      continue
  return False


def _carry_skips(tf: Any, dataset: Any) -> Any:
  """Moves the count of each marker element (skipped > 0) onto the next record and drops the
  marker, so every batch counts the damaged records left out before it."""
  def step(pending: Any, element: dict[str, Any]) -> tuple[Any, Any]:
    marker = element[SKIPPED] > 0
    carried = tf.where(marker, tf.constant(-1, tf.int64), pending)  # -1: drop it
    return tf.where(marker, pending + element[SKIPPED], 0), dict(element, **{SKIPPED: carried})

  return dataset.scan(tf.constant(0, tf.int64), step).filter(lambda element: element[SKIPPED] >= 0)


def train_windows_dataset(directory: str | os.PathLike, config: PipelineConfig,
                          units_dir: str | os.PathLike | None = None,
                          damaged: DamagedShards | None = None) -> Any:
  """Endless batches of training windows before the online stage: windows float32 (B, 12, 2500),
  skipped_records int64 (B,) (0 unless `skip_corrupted`), and the records' units as targets int32
  (B, codebooks, frames) when `units_dir` is given. Damaged shards are reported to `damaged`
  (without it, a strict pipeline stops with a TensorFlow error). Strict and skipping pipelines
  have the same structure, so a position saved by one restores into the other."""
  tf = records_lib.import_tensorflow()
  config = config.resolved()
  files = _host_files(directory, config, units_dir, config.train_crop)
  index, count = config.hosts()
  if config.skip_corrupted and not _some_record_readable(tf, files):  # or epochs spin, empty
    raise CorruptShardError(f"no shard file of {directory} that this host reads starts with a "
                            "readable record: nothing to train on, even skipping damaged records; "
                            f"`hubert-ecg-jax verify {directory}` lists the damaged shards")

  def epoch(epoch_index: Any) -> Any:
    epoch_seed = tf.constant(config.seed, tf.int64) * _EPOCH_SEED_STRIDE + epoch_index
    stream = _record_stream(tf, files, config, epoch_seed, config.skip_corrupted,
                            damaged).enumerate()

    def window(position: Any, element: tuple[Any, Any]) -> dict[str, Any]:
      payload, skipped = element
      parsed = _parse(tf, payload, files)
      crop_seed = tf.stack([epoch_seed, position * count + index])
      offsets = _crop_offsets(tf, parsed["num_samples"], config.train_crop, 1, crop_seed)
      out = _element(parsed, _crop(tf, parsed["signal"], offsets, 1)[0], offsets[0])
      return dict(out, **{SKIPPED: skipped})

    windows = stream.map(window, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return windows.shuffle(config.shuffle_buffer, seed=epoch_seed)

  dataset = _carry_skips(tf, tf.data.Dataset.range(np.iinfo(np.int64).max).flat_map(epoch))
  return dataset.batch(config.batch_size, drop_remainder=True).with_options(_options(config))


def eval_windows_dataset(directory: str | os.PathLike, config: PipelineConfig,
                         units_dir: str | os.PathLike | None = None,
                         damaged: DamagedShards | None = None) -> Any:
  """One pass of evaluation windows, batched, before the online stage (last batch may be short).
  A damaged shard is reported to `damaged` whatever `skip_corrupted` says."""
  tf = records_lib.import_tensorflow()
  config = config.resolved()
  files = _host_files(directory, config, units_dir, config.eval_crop)
  index, count = config.hosts()
  stream = _record_stream(tf, files, config, None, False, damaged).enumerate()

  def windows(position: Any, element: tuple[Any, Any]) -> Any:
    parsed = _parse(tf, element[0], files)
    crop_seed = tf.stack([tf.constant(config.seed, tf.int64), position * count + index])
    offsets = _crop_offsets(tf, parsed["num_samples"], config.eval_crop, config.eval_crops, crop_seed)
    windows = tf.stack(_crop(tf, parsed["signal"], offsets, config.eval_crops))  # (k, 12, 2500)
    element = _element(parsed, windows, offsets)
    for key in ("labels", "record_id", "targets"):
      if key in element:
        element[key] = tf.repeat(element[key][None], config.eval_crops, axis=0)
    element["crop_index"] = tf.range(config.eval_crops, dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices(element)

  dataset = stream.flat_map(windows).batch(config.batch_size)
  return dataset.with_options(_options(config))


def online_stage(windows: np.ndarray, step: int, config: PipelineConfig, with_masks: bool
                 ) -> tuple[np.ndarray, ...]:
  """Host numpy stage of one batch: (B, 12, 2500) -> x (B, 6000), attention mask, [span masks (B, 93)].

  Span masks come from a generator seeded by (seed, host, step), so a resumed run draws the same ones.
  """
  x, attention_mask = fast_model_inputs(windows)
  if not with_masks:
    return x, attention_mask
  index, _ = config.hosts()
  frames = config.num_frames
  lengths = np.array([config.model_config.num_frames(n) for n in attention_mask.sum(axis=-1)])
  frame_mask = np.arange(frames)[None, :] < lengths[:, None]  # (B, frames), right padding as the model
  rng = np.random.default_rng([config.seed, index, int(step)])
  masks = sample_span_mask(rng, x.shape[0], frames, mask_prob=config.mask_prob, span=config.mask_span,
                           min_masks=config.min_masks, frame_mask=frame_mask,
                           honour_padding=config.honour_padding)
  return x, attention_mask, masks


def _with_online_stage(windows_dataset: Any, config: PipelineConfig, with_masks: bool) -> Any:
  tf = records_lib.import_tensorflow()
  frames = config.num_frames
  out_types = [tf.float32, tf.int32] + ([tf.bool] if with_masks else [])

  def apply(step: Any, element: dict[str, Any]) -> dict[str, Any]:
    outputs = tf.numpy_function(lambda w, s: online_stage(w, s, config, with_masks),
                                [element.pop("windows"), step], out_types, stateful=False)
    batch = tf.shape(element["record_id"])[0]
    element["x"] = tf.reshape(outputs[0], [batch, MODEL_INPUT_LENGTH])
    element["attention_mask"] = tf.reshape(outputs[1], [batch, MODEL_INPUT_LENGTH])
    if with_masks:
      element["mask_time_indices"] = tf.reshape(outputs[2], [batch, frames])
    return element

  dataset = windows_dataset.enumerate().map(apply, num_parallel_calls=config.parallel_batches,
                                            deterministic=True)
  return dataset.prefetch(config.prefetch_batches).with_options(_options(config))


def train_dataset(directory: str | os.PathLike, config: PipelineConfig,
                  units_dir: str | os.PathLike | None = None,
                  damaged: DamagedShards | None = None) -> Any:
  """The endless training tf.data.Dataset of batch dicts; with `units_dir` (pre-training) each
  batch carries the records' units as targets and span masks."""
  config = config.resolved()
  return _with_online_stage(train_windows_dataset(directory, config, units_dir, damaged), config,
                            with_masks=units_dir is not None)


def eval_dataset(directory: str | os.PathLike, config: PipelineConfig,
                 units_dir: str | os.PathLike | None = None,
                 damaged: DamagedShards | None = None) -> Any:
  """One evaluation pass as a tf.data.Dataset of batch dicts (targets too with `units_dir`)."""
  config = config.resolved()
  return _with_online_stage(eval_windows_dataset(directory, config, units_dir, damaged), config,
                            False)


def make_train_iterator(directory: str | os.PathLike, config: PipelineConfig,
                        units_dir: str | os.PathLike | None = None,
                        log: Callable[[str], None] = print) -> BatchIterator:
  """Endless training batches of this host, as numpy dicts (damaged shards: see `BatchIterator`)."""
  damaged = DamagedShards()
  return BatchIterator(train_dataset(directory, config, units_dir, damaged), damaged,
                       config.skip_corrupted, training=True, log=log)


def make_eval_iterator(directory: str | os.PathLike, config: PipelineConfig,
                       units_dir: str | os.PathLike | None = None) -> BatchIterator:
  """One evaluation pass over this host's records, as numpy dicts; a damaged shard stops it."""
  damaged = DamagedShards()
  return BatchIterator(eval_dataset(directory, config, units_dir, damaged), damaged)


def make_labels_iterator(directory: str | os.PathLike, skip_corrupted: bool = False,
                         log: Callable[[str], None] = print, batch_size: int = 4096) -> BatchIterator:
  """The labels and ids of every record of a records directory, in file order, as numpy batches
  (a training set's labels, read before training); damaged shards as in training."""
  tf = records_lib.import_tensorflow()
  config = PipelineConfig(batch_size=batch_size, cycle_length=1, process_index=0, process_count=1)
  files = _host_files(directory, config, None, config.train_crop)
  damaged = DamagedShards()

  def labels(payload: tuple[Any, ...], skipped: Any) -> dict[str, Any]:
    parsed = records_lib.parse_example(payload[0], files.manifest.num_labels)
    return {"labels": parsed["labels"], "record_id": parsed["record_id"]}

  stream = _record_stream(tf, files, config, None, skip_corrupted, damaged)
  dataset = stream.filter(lambda payload, skipped: skipped == 0).map(labels).batch(batch_size)
  return BatchIterator(dataset, damaged, skip_corrupted, training=True, log=log)

"""Streaming tf.data input pipeline over a records directory (see `records`), for training and evaluation.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, NUM_LEADS
from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data import units as units_lib
from hubert_ecg_jax.data.online import fast_model_inputs
from hubert_ecg_jax.data.preprocess import WINDOW_SAMPLES
from hubert_ecg_jax.train.masking import sample_span_mask

_EPOCH_SEED_STRIDE = 1_000_003


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
      import jax
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
  """Iterates a pipeline's batches as numpy dicts; its position can be saved and restored."""

  def __init__(self, dataset: Any):
    self.dataset = dataset
    self._iterator = iter(dataset)

  def __next__(self) -> dict[str, np.ndarray]:
    element = next(self._iterator)
    batch = {key: value.numpy() for key, value in element.items()}
    batch["record_id"] = np.array([value.decode() for value in batch["record_id"]])
    return batch

  def save(self, path: str | os.PathLike) -> str:
    """Writes the iterator state (a TF checkpoint with prefix `path`); returns the written prefix."""
    tf = records_lib.import_tensorflow()
    return tf.train.Checkpoint(iterator=self._iterator).write(str(path))

  def restore(self, path: str | os.PathLike) -> None:
    """Moves this iterator to the state saved at `path` (from an iterator over the same pipeline)."""
    tf = records_lib.import_tensorflow()
    if not tf.io.gfile.exists(f"{path}.index"):
      raise FileNotFoundError(f"no iterator state at {path} (expected {path}.index)")
    tf.train.Checkpoint(iterator=self._iterator).read(str(path)).assert_consumed()


@dataclasses.dataclass(frozen=True)
class _HostFiles:
  """What one host reads: its records shards (and their units shards), and whether records, not
  files, are split between the hosts (fewer files than hosts)."""
  manifest: records_lib.RecordsManifest
  records: list[str]
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
    paths = paths[index::count]
    units_paths = None if units_paths is None else units_paths[index::count]
  return _HostFiles(manifest, paths, units_paths, units_shape, split_records)


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


def _record_stream(tf: Any, files: _HostFiles, config: PipelineConfig, file_seed: Any | None) -> Any:
  """This host's part of one pass over the files: serialized examples, or (example, units) pairs
  read side by side from a records shard and its units shard."""
  if files.units is None:
    shards = tf.data.Dataset.from_tensor_slices(files.records)
    read = tf.data.TFRecordDataset
  else:
    shards = tf.data.Dataset.from_tensor_slices((files.records, files.units))
    read = lambda records, units: tf.data.Dataset.zip((tf.data.TFRecordDataset(records),
                                                       tf.data.TFRecordDataset(units)))
  if file_seed is not None:  # the same permutation with or without units
    shards = shards.shuffle(len(files.records), seed=file_seed)
  stream = shards.interleave(read, cycle_length=min(config.cycle_length, len(files.records)),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if files.split_records:
    index, count = config.hosts()
    stream = stream.shard(count, index)
  return stream


def _parse(tf: Any, element: Any, files: _HostFiles) -> dict[str, Any]:
  """The parsed record of a stream element, with its units as "targets" when there are units."""
  if files.units is None:
    return records_lib.parse_example(element, files.manifest.num_labels)
  serialized, serialized_units = element
  parsed = records_lib.parse_example(serialized, files.manifest.num_labels)
  units = units_lib.parse_units(serialized_units, files.units_shape)
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


def train_windows_dataset(directory: str | os.PathLike, config: PipelineConfig,
                          units_dir: str | os.PathLike | None = None) -> Any:
  """Endless batches of training windows before the online stage: windows float32 (B, 12, 2500),
  and the records' units as targets int32 (B, codebooks, frames) when `units_dir` is given."""
  tf = records_lib.import_tensorflow()
  config = config.resolved()
  files = _host_files(directory, config, units_dir, config.train_crop)
  index, count = config.hosts()

  def epoch(epoch_index: Any) -> Any:
    epoch_seed = tf.constant(config.seed, tf.int64) * _EPOCH_SEED_STRIDE + epoch_index
    stream = _record_stream(tf, files, config, epoch_seed).enumerate()

    def window(position: Any, element: Any) -> dict[str, Any]:
      parsed = _parse(tf, element, files)
      crop_seed = tf.stack([epoch_seed, position * count + index])
      offsets = _crop_offsets(tf, parsed["num_samples"], config.train_crop, 1, crop_seed)
      return _element(parsed, _crop(tf, parsed["signal"], offsets, 1)[0], offsets[0])

    windows = stream.map(window, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return windows.shuffle(config.shuffle_buffer, seed=epoch_seed)

  dataset = tf.data.Dataset.range(np.iinfo(np.int64).max).flat_map(epoch)
  return dataset.batch(config.batch_size, drop_remainder=True).with_options(_options(config))


def eval_windows_dataset(directory: str | os.PathLike, config: PipelineConfig,
                         units_dir: str | os.PathLike | None = None) -> Any:
  """One pass of evaluation windows, batched, before the online stage (last batch may be short)."""
  tf = records_lib.import_tensorflow()
  config = config.resolved()
  files = _host_files(directory, config, units_dir, config.eval_crop)
  index, count = config.hosts()
  stream = _record_stream(tf, files, config, None).enumerate()

  def windows(position: Any, element: Any) -> Any:
    parsed = _parse(tf, element, files)
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
                  units_dir: str | os.PathLike | None = None) -> Any:
  """The endless training tf.data.Dataset of batch dicts; with `units_dir` (pre-training) each
  batch carries the records' units as targets and span masks."""
  config = config.resolved()
  return _with_online_stage(train_windows_dataset(directory, config, units_dir), config,
                            with_masks=units_dir is not None)


def eval_dataset(directory: str | os.PathLike, config: PipelineConfig,
                 units_dir: str | os.PathLike | None = None) -> Any:
  """One evaluation pass as a tf.data.Dataset of batch dicts (targets too with `units_dir`)."""
  config = config.resolved()
  return _with_online_stage(eval_windows_dataset(directory, config, units_dir), config, False)


def make_train_iterator(directory: str | os.PathLike, config: PipelineConfig,
                        units_dir: str | os.PathLike | None = None) -> BatchIterator:
  """Endless training batches of this host, as numpy dicts."""
  return BatchIterator(train_dataset(directory, config, units_dir))


def make_eval_iterator(directory: str | os.PathLike, config: PipelineConfig,
                       units_dir: str | os.PathLike | None = None) -> BatchIterator:
  """One evaluation pass over this host's records, as numpy dicts."""
  return BatchIterator(eval_dataset(directory, config, units_dir))

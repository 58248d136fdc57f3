"""Batched deterministic inference: classifiers and embeddings over ECG files or records directories.

More in docs/modules.md."""
from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from hubert_ecg_jax import model_dir
from hubert_ecg_jax.classifier import HubertECGForClassification, masked_mean
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data.pipeline import PipelineConfig, make_eval_iterator
from hubert_ecg_jax.data.preprocess import (WINDOW_SAMPLES, crop_offsets, crop_window,
                                            missing_standard_leads, model_inputs, prepare_record)
from hubert_ecg_jax.data.readers import (HDF5_EXTENSIONS, find_hdf5_files, find_records,
                                         read_code15_hdf5, read_record)
from hubert_ecg_jax.data.records import MANIFEST_NAME, read_manifest
from hubert_ecg_jax.files import AnyPath, as_path, atomic_path
from hubert_ecg_jax.tasks import Task
from hubert_ecg_jax.hub import model_source, resolve_model
from hubert_ecg_jax.layers import cast_kernels
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.parallel import BatchRunner
from hubert_ecg_jax.pretrained import load_pretrained, load_pretrained_with_heads
from hubert_ecg_jax.progress import progress_bar

CLASSIFIER_FORMAT = "hubert-ecg-jax/classifier"
CLASSIFIER_FORMAT_VERSION = 1
CROP_MODES = ("first", "tta", "random", "cover")
POOLING = ("mean", "none")
_PRETRAINING_HEADS = ("final_proj_", "label_embedding_")


# ------------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class Classifier:
  """A fine-tuned classifier: config, params, task, thresholds (multi-label) and metadata."""
  config: HubertECGConfig
  params: dict
  task: Task
  thresholds: np.ndarray | None
  classifier_hidden_size: int | None
  metadata: dict

  @property
  def model(self) -> HubertECGForClassification:
    return HubertECGForClassification(self.config, self.task.num_outputs, self.classifier_hidden_size)


def classifier_metadata(task: Task, classifier_hidden_size: int | None, classifier_dropout: float,
                        thresholds: np.ndarray | None = None, **extra: Any) -> dict[str, Any]:
  """The metadata a classifier is saved with (`model_dir.save_model`)."""
  return {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_FORMAT_VERSION, "task": task.to_dict(),
          "classifier_hidden_size": classifier_hidden_size, "classifier_dropout": classifier_dropout,
          "thresholds": None if thresholds is None else [float(t) for t in thresholds], **extra}


def load_classifier(path: str | pathlib.Path, compute_dtype: str | None = None) -> Classifier:
  """A classifier saved by `hubert-ecg-jax finetune` (or a converted fine-tuned checkpoint, whose
  outputs are then named label_0... and treated as multi-label with threshold 0.5);
  `compute_dtype` replaces the config's (None keeps it), for inference: the backbone's kernels are
  cast to it here, once."""
  classifier = _load_classifier(path)
  if compute_dtype is not None:
    classifier.config = classifier.config.replace(compute_dtype=compute_dtype)
    backbone = cast_kernels(classifier.params["hubert_ecg"], compute_dtype)  # once, not per call
    classifier.params = {**classifier.params, "hubert_ecg": backbone}
  return classifier


def _load_classifier(path: str | pathlib.Path) -> Classifier:
  path = resolve_model(path)
  if model_dir.is_model_dir(path):
    config, params, metadata = model_dir.load_model(path)
    if metadata.get("format") != CLASSIFIER_FORMAT:
      raise ValueError(f"{path} is a model directory but not a fine-tuned classifier (its metadata "
                       f"has format {metadata.get('format')!r}, expected {CLASSIFIER_FORMAT!r}); "
                       "fine-tune it first with `hubert-ecg-jax finetune`")
    task = Task.from_dict(metadata["task"])
    thresholds = metadata.get("thresholds")
    return Classifier(config, params, task, None if thresholds is None else np.asarray(thresholds),
                      metadata.get("classifier_hidden_size"), metadata)
  if path.is_dir() and not (path / model_dir.CONFIG_FILE).is_file():
    raise FileNotFoundError(f"{path} is not a fine-tuned model: expected a directory written by "
                            "`hubert-ecg-jax finetune` (config.json, params/, metadata.json)")
  config, backbone, heads = load_pretrained_with_heads(path)
  if "classifier" not in heads:
    raise ValueError(f"{path} holds no classifier head: expected a fine-tuned model (a directory "
                     "written by `hubert-ecg-jax finetune`, or a converted fine-tuned checkpoint)")
  num_outputs = int(np.shape(heads["classifier"]["bias"])[0])
  hidden = int(np.shape(heads["classifier_hidden"]["bias"])[0]) if "classifier_hidden" in heads else None
  names = tuple(f"label_{i}" for i in range(num_outputs))
  params = {"hubert_ecg": strip_pretraining_heads(backbone), **heads}
  return Classifier(config, params, Task("multi_label", names, names), None, hidden,
                    {"source": str(path)})


def strip_pretraining_heads(backbone: dict) -> dict:
  """Backbone params without `final_proj_*` / `label_embedding_*` (for `pretraining_heads=False`)."""
  return {name: value for name, value in backbone.items() if not name.startswith(_PRETRAINING_HEADS)}


def load_backbone(path: str | pathlib.Path, compute_dtype: str | None = None
                  ) -> tuple[HubertECGConfig, dict]:
  """(config, backbone params) of any model: pretrained or fine-tuned, ours or converted;
  `compute_dtype` replaces the config's (None keeps it), for inference: the kernels are cast to
  it here, once."""
  config, backbone = load_pretrained(path, compute_dtype)
  backbone = strip_pretraining_heads(backbone)
  return config, backbone if compute_dtype is None else cast_kernels(backbone, compute_dtype)


def classifier_logits_fn(model: HubertECGForClassification) -> Callable:
  """(params, x, mask) -> logits (batch, outputs), deterministic."""
  return lambda params, x, mask: model.apply({"params": params}, x, attention_mask=mask,
                                             deterministic=True)


def embedding_fn(config: HubertECGConfig, layer: int | None = None, pool: str = "mean") -> Callable:
  """(backbone params, x, mask) -> (batch, hidden) masked mean, or (batch, frames, hidden) for
  pool "none", of hidden state `layer` (0: the encoder input, L: the last block; None: the last)."""
  if pool not in POOLING:
    raise ValueError(f"pool must be one of {POOLING}, found {pool!r}")
  if layer is not None and not 0 <= layer <= config.num_hidden_layers:
    raise ValueError(f"layer must lie in 0..{config.num_hidden_layers} (0: encoder input, "
                     f"{config.num_hidden_layers}: last block), found {layer}")
  model = HubertECG(config, pretraining_heads=False)

  def embed(params: Any, x: jax.Array, mask: jax.Array) -> jax.Array:
    out = model.apply({"params": params}, x, attention_mask=mask, deterministic=True,
                      output_hidden_states=layer is not None)
    hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
    return masked_mean(hidden, out.frame_mask) if pool == "mean" else hidden

  return embed


def hidden_state_features(model: str | pathlib.Path, layer: int | None = None,
                          compute_dtype: str | None = None, batch_size: int = 64
                          ) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], dict[str, Any]]:
  """Iteration-n features of the k-means targets: (x, mask) -> hidden state `layer` (None: the
  middle one) of a model, (batch, frames, hidden) float32, computed on every local device."""
  config, backbone = load_backbone(model, compute_dtype)
  layer = config.num_hidden_layers // 2 if layer is None else layer
  runner = BatchRunner(embedding_fn(config, layer, pool="none"), batch_size)
  description = {"kind": "hidden_states", "model": str(model), "layer": layer,
                 "hidden_size": config.hidden_size, "compute_dtype": config.compute_dtype}
  return (lambda x, mask: runner(backbone, x, mask).astype(np.float32)), description


# ------------------------------------------------------------------------------------------------
# Inputs


def window_offsets(num_samples: int, crop: str, n_crops: int = 1,
                   rng: np.random.Generator | None = None) -> np.ndarray:
  """Start offsets of the 5-s windows of a 500-Hz record of `num_samples` samples (see module doc)."""
  if crop not in CROP_MODES:
    raise ValueError(f"crop must be one of {CROP_MODES}, found {crop!r}")
  if crop == "cover":
    return crop_offsets(num_samples, "tta", n_crops=max(1, math.ceil(num_samples / WINDOW_SAMPLES)))
  return crop_offsets(num_samples, crop, rng=rng, n_crops=1 if crop == "first" else n_crops)


def record_windows(prepared: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Prepared record (12, n) and offsets (k,) -> model inputs x, mask, each (k, 6000)."""
  return model_inputs(np.stack([crop_window(prepared, int(offset)) for offset in offsets]))


@dataclasses.dataclass
class FileResult:
  """One record read from a file: its id, source, raw record, window offsets and per-window outputs."""
  record_id: str
  source: str
  record: Any  # data.readers.EcgRecord (raw signal in mV, for plotting)
  offsets: np.ndarray
  outputs: np.ndarray  # (windows, ...)


def list_input_files(path: str | pathlib.Path, extensions: Sequence[str] = (".hea", ".npy")
                     ) -> list[pathlib.Path]:
  """A record file, or the record files of a folder (recursive; CODE-15 HDF5 files included)."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise FileNotFoundError(f"{path} does not exist: expected an ECG file or a folder of them")
  files = find_records(path, extensions) + find_hdf5_files(path)
  if not files:
    looked_for = list(extensions) + list(HDF5_EXTENSIONS)
    raise ValueError(f"no ECG records in {path} (looked for {looked_for})")
  return files


def read_file_records(path: pathlib.Path, fs: float | None = None) -> Iterator[Any]:
  """The records of one file (CODE-15 HDF5 files hold many) as `EcgRecord`s."""
  if path.suffix.lower() in HDF5_EXTENSIONS:
    yield from read_code15_hdf5(path)
  else:
    yield read_record(path, fs=fs)


def run_on_files(runner: BatchRunner, params: Any, files: Sequence[pathlib.Path], crop: str,
                 n_crops: int = 1, fs: float | None = None, seed: int = 0, group_size: int = 32,
                 on_error: Callable[[str, str], None] | None = None, progress: bool = True,
                 missing_leads: str = "refuse") -> Iterator[FileResult]:
  """Reads, prepares, crops and runs every record of `files`, `group_size` records per device pass.

  A record that cannot be read or prepared is passed to `on_error(source, reason)` and skipped
  (without `on_error` the error is raised). `missing_leads` is `prepare_record`'s.
  """
  def prepared_records() -> Iterator[tuple[Any, str, np.ndarray, np.ndarray, np.ndarray]]:
    for index, path in enumerate(progress_bar(files, desc="records", unit="file", disable=not progress)):
      try:
        for number, record in enumerate(read_file_records(path, fs)):
          prepared = prepare_record(record.signal, record.fs, lead_names=record.lead_names,
                                    missing_leads=missing_leads)
          rng = np.random.default_rng([seed, index, number])
          offsets = window_offsets(prepared.shape[1], crop, n_crops, rng)
          x, mask = record_windows(prepared, offsets)
          yield record, str(path), offsets, x, mask
      except (ValueError, FileNotFoundError, OSError) as error:
        if on_error is None:
          raise
        on_error(str(path), f"{type(error).__name__}: {error}")

  group: list[tuple[Any, str, np.ndarray, np.ndarray, np.ndarray]] = []
  for item in prepared_records():
    group.append(item)
    if len(group) == group_size:
      yield from _run_group(runner, params, group)
      group = []
  yield from _run_group(runner, params, group)


def _run_group(runner: BatchRunner, params: Any, group: list) -> Iterator[FileResult]:
  if not group:
    return
  outputs = runner(params, np.concatenate([item[3] for item in group]),
                   np.concatenate([item[4] for item in group]))
  start = 0
  for record, source, offsets, _, _ in group:
    yield FileResult(record.record_id, source, record, offsets, outputs[start:start + len(offsets)])
    start += len(offsets)


@dataclasses.dataclass
class DirectoryResult:
  """Outputs over a records directory: one row per record, windows along axis 1."""
  record_ids: list[str]
  outputs: np.ndarray  # (records, windows, ...)
  labels: np.ndarray  # (records, columns) as stored
  label_names: list[str]


def run_on_records_dir(runner: BatchRunner, params: Any, directory: str | pathlib.Path,
                       crop: str = "first", n_crops: int = 1, seed: int = 0,
                       progress: bool = True) -> DirectoryResult:
  """Runs every record of a records directory (`hubert-ecg-jax preprocess` output) through `runner`."""
  if crop not in ("first", "tta", "random"):
    raise ValueError(f"records directories take crop 'first', 'tta' or 'random', found {crop!r}")
  manifest = read_manifest(directory)
  n_crops = 1 if crop == "first" else n_crops
  pipeline = PipelineConfig(batch_size=runner.batch_size, seed=seed, eval_crop=crop,
                            eval_crops=n_crops, process_index=0, process_count=1)
  record_ids, outputs, labels = [], [], []
  with progress_bar(total=manifest.num_records * n_crops, desc=f"windows of {as_path(directory).name}",
            unit="window", disable=not progress) as bar:
    for batch in make_eval_iterator(directory, pipeline):
      outputs.append(runner(params, batch["x"], batch["attention_mask"]))
      record_ids.extend(batch["record_id"].tolist())
      labels.append(batch["labels"])
      bar.update(len(batch["x"]))
  if not outputs:
    raise ValueError(f"{directory} holds no records")
  windows = np.concatenate(outputs)
  count = len(windows) // n_crops
  return DirectoryResult(record_ids=record_ids[::n_crops],
                         outputs=windows.reshape(count, n_crops, *windows.shape[1:]),
                         labels=np.concatenate(labels)[::n_crops],
                         label_names=list(manifest.label_names))


def embed_to_file(model: str | pathlib.Path, data: str | pathlib.Path, out: str | pathlib.Path,
                  layer: int | None = None, pool: str = "mean", crop: str = "first",
                  crops: int = 2, fs: float | None = None,
                  extensions: Sequence[str] = (".hea", ".npy"), batch_size: int = 64,
                  overwrite: bool = False, progress: bool = True, compute_dtype: str | None = None,
                  missing_leads: str = "refuse"
                  ) -> tuple[tuple[int, ...], int, AnyPath, dict[str, str]]:
  """Embeddings of a records directory or ECG files to `out` (.npy) and `out.index.csv` (row,
  record_id, source, leads entered as zeros), both atomically: `hubert-ecg-jax embed`. Returns
  (shape, layer, index path, the model's source: `hub.model_source`)."""
  out = as_path(out)
  if out.suffix != ".npy":
    raise ValueError(f"--out must name a .npy file, found {out}")
  index_path = out.with_suffix(".index.csv")
  for path in (out, index_path):
    if path.exists() and not overwrite:
      raise FileExistsError(f"{path} already exists: choose another --out or pass --overwrite")
  if pool == "none" and crop != "first":
    raise ValueError("--pool none keeps every frame of one window: use it with --crop first")
  origin = model_source(model)
  config, backbone = load_backbone(origin["path"], compute_dtype)
  runner = BatchRunner(embedding_fn(config, layer, pool), batch_size)
  data = as_path(data)
  if (data / MANIFEST_NAME).is_file():
    if crop == "cover":
      raise ValueError("--crop cover is for ECG files; records directories take first or tta")
    result = run_on_records_dir(runner, backbone, data, crop, crops, progress=progress)
    embeddings, ids = result.outputs.mean(axis=1), result.record_ids
    sources = [str(data)] * len(ids)
    missing = [[] for _ in ids]  # records directories hold prepared records (see their manifest)
  else:
    files = list_input_files(data, extensions)

    def on_error(source: str, reason: str) -> None:
      print(f"skipped {source}: {reason}", file=sys.stderr)

    rows, ids, sources, missing = [], [], [], []
    for item in run_on_files(runner, backbone, files, crop, crops, fs,
                             on_error=on_error if len(files) > 1 else None, progress=progress,
                             missing_leads=missing_leads):
      rows.append(item.outputs.mean(axis=0))
      ids.append(item.record_id)
      sources.append(item.source)
      missing.append(missing_standard_leads(item.record.lead_names))
    if not rows:
      raise ValueError(f"no record of {data} could be read")
    embeddings = np.stack(rows)
  embeddings = embeddings.astype(np.float32)
  with atomic_path(out) as staging, staging.open("wb") as stream:
    np.save(stream, embeddings)
  with atomic_path(index_path) as staging, staging.open("w", newline="") as stream:
    writer = csv.writer(stream)
    writer.writerow(["row", "record_id", "source", "missing_leads"])
    writer.writerows([i, record_id, source, ";".join(leads)]
                     for i, (record_id, source, leads) in enumerate(zip(ids, sources, missing)))
  return (embeddings.shape, config.num_hidden_layers if layer is None else layer, index_path,
          origin)

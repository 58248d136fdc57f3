"""A fine-tuning run's pieces: the task, model and data it prepares, validation, the saved classifier.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.evaluate import aggregate_crops, label_auroc, multiclass_metrics, tune_thresholds
from hubert_ecg_jax.evaluate.metrics import label_names_or_default
from hubert_ecg_jax.evaluate.snomed import ptbxl_descriptions
from hubert_ecg_jax.finetune import losses
from hubert_ecg_jax.finetune.config import FinetuneSettings
from hubert_ecg_jax.finetune.data import read_labels, resolve_splits
from hubert_ecg_jax.finetune.fraction import subset_training_split
from hubert_ecg_jax.tasks import Task, task_from_dataset
from hubert_ecg_jax.hub import model_source
from hubert_ecg_jax.inference import classifier_metadata, load_backbone, run_on_records_dir
from hubert_ecg_jax.model_dir import save_model
from hubert_ecg_jax.parallel import BatchRunner

BEST_MODEL = "best_model"


@dataclasses.dataclass
class Prepared:
  """Everything a run derives from its settings before training."""
  splits: dict[str, pathlib.Path]
  task: Task
  loss_weights: np.ndarray  # pos_weight, class weights, or ones
  config: HubertECGConfig
  model: HubertECGForClassification
  params: Any
  notes: list[str]


@dataclasses.dataclass
class FinetuneResult:
  stop_reason: str  # finished, early_stopped, nonfinite, or the signal (SIGTERM, SIGINT)
  step: int
  best_step: int | None
  best_score: float | None
  best_model: pathlib.Path | None
  splits: dict[str, pathlib.Path]


@dataclasses.dataclass
class Validation:
  score: float  # higher is better; NaN when undefined (e.g. no label with both classes)
  loss: float
  metrics: dict[str, float]
  probabilities: np.ndarray  # (records, outputs) after window aggregation
  targets: np.ndarray


def prepare(settings: FinetuneSettings, workdir: pathlib.Path) -> Prepared:
  """The task, loss weights and classifier of a run (see the module docstring)."""
  splits = resolve_splits(settings.data, workdir, settings.train.progress)
  _, labels, names = read_labels(splits["train"], settings.data.skip_corrupted)
  if len(labels) == 0:
    raise ValueError(f"the training data {splits['train']} holds no records")
  task = task_from_dataset(settings.task_kind, names, labels, settings.task_columns)
  notes = []
  if settings.data.train_fraction < 1.0:
    splits["train"], labels, note = subset_training_split(
        splits["train"], task, labels, names, settings.data.train_fraction,
        settings.data.fraction_seed, workdir)
    notes.append(note)
  targets = task.targets(labels, names)
  if task.kind == "multi_label":
    empty = targets.sum(axis=0) == 0
    if empty.all():
      raise ValueError("no label has a positive training record: nothing to learn")
    if empty.any():
      dropped = [name for name, drop in zip(task.output_names, empty) if drop]
      notes.append(f"left out {len(dropped)} label(s) without a positive training record: {dropped}")
      kept = tuple(name for name, drop in zip(task.output_names, empty) if not drop)
      task = Task("multi_label", kept, kept)
      targets = targets[:, ~empty]
  label_names_or_default(task.output_names, task.num_outputs)  # unique names
  if not settings.train.use_loss_weights or task.kind == "regression":
    weights = np.ones(task.num_outputs, np.float32)
  elif task.kind == "multi_label":
    weights = losses.positive_weights(targets)
  else:
    weights = losses.class_weights(targets, task.num_outputs)

  m = settings.model
  if m.init == "pretrained":
    config, backbone = load_backbone(m.pretrained)
  else:
    config, backbone = HubertECGConfig.preset(m.size), None
  config = config.replace(compute_dtype=m.compute_dtype, **m.dropouts)
  model = HubertECGForClassification(config, task.num_outputs, m.classifier_hidden_size,
                                     m.classifier_dropout)
  key = jax.random.PRNGKey(settings.train.seed)
  # Parameter shapes do not depend on the input length: the shortest input compiles fastest.
  dummy = jnp.zeros((1, config.min_input_length), jnp.float32)
  params = jax.jit(lambda k: model.init({"params": k}, dummy))(key)
  params = dict(params["params"])
  if backbone is not None:
    expected = jax.tree.map(jnp.shape, params["hubert_ecg"])
    found = jax.tree.map(jnp.shape, backbone)
    if expected != found:
      raise ValueError(f"the pretrained weights in {m.pretrained} do not fit their own config")
    params["hubert_ecg"] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), backbone)
  return Prepared(splits, task, weights, config, model, params, notes)


def validate(runner: BatchRunner, params: Any, prepared: Prepared, settings: FinetuneSettings
             ) -> Validation:
  """Predicts the validation split and scores it (score: higher is better)."""
  e, task = settings.eval, prepared.task
  result = run_on_records_dir(runner, params, prepared.splits["val"], e.crop, e.crops,
                              seed=settings.train.seed, progress=False)
  allow_missing = task.kind == "multi_label"
  targets = task.targets(result.labels, result.label_names, allow_missing=allow_missing)
  logits = result.outputs  # (records, windows, outputs)
  how = e.aggregation if task.kind != "regression" else "mean"
  probabilities = aggregate_crops(task.probabilities(logits), how)
  mean_logits = jnp.asarray(logits.mean(axis=1))
  if task.kind == "multi_label" and settings.train.use_loss_weights:
    weights = losses.positive_weights(targets)  # from the validation set, as the original
  else:  # no weights, or class weights (the validation set may lack a class): the training ones
    weights = prepared.loss_weights
  loss = float(losses.mean_loss(task.kind, mean_logits, jnp.asarray(targets), jnp.asarray(weights)))
  metrics = {"loss": loss}
  if task.kind == "multi_label":
    auroc = label_auroc(targets, probabilities)
    metrics["macro_auroc"] = float(np.nanmean(auroc)) if np.isfinite(auroc).any() else math.nan
  elif task.kind == "multi_class":
    metrics["macro_auroc"] = multiclass_metrics(targets, probabilities).macro["auroc"]
  use_loss = settings.train.early_stopping_metric == "loss" or task.kind == "regression"
  score = -loss if use_loss else metrics["macro_auroc"]
  return Validation(score, loss, metrics, probabilities, targets)


def save_classifier(directory: pathlib.Path, prepared: Prepared, settings: FinetuneSettings,
                    params: Any, validation: Validation, step: int, notes: list[str]) -> pathlib.Path:
  """Saves the classifier with its metadata; multi-label thresholds are tuned on `validation`."""
  thresholds, tuning = None, None
  if prepared.task.kind == "multi_label":
    tuning = tune_thresholds(validation.targets, validation.probabilities, prepared.task.output_names)
    thresholds = tuning.thresholds
  metadata = classifier_metadata(
      prepared.task, settings.model.classifier_hidden_size, settings.model.classifier_dropout,
      thresholds, threshold_tuning=None if tuning is None else tuning.to_dict(),
      validation={"step": step, "score": validation.score, **validation.metrics,
                  "crop": settings.eval.crop, "crops": settings.eval.crops,
                  "aggregation": settings.eval.aggregation},
      mode=settings.mode, loss_weights=[float(w) for w in prepared.loss_weights], notes=notes,
      pretrained_source=(model_source(settings.model.pretrained)
                         if settings.model.init == "pretrained" else None),
      label_descriptions=(ptbxl_descriptions(settings.data.manual_dir) or None
                          if (settings.data.tfds_name or "").startswith("ptb_xl") else None),
      training_config=settings.raw)
  host = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  return save_model(directory, prepared.config, host, metadata, overwrite=True)

"""The fine-tuning run: data, task, model, then train with validation, early stopping and resume.

`finetune(settings, workdir)`:
  1. resolves the splits to records directories (`finetune.data`), reads the training labels and builds
     the task (multi-label labels without a positive training record are left out, with a note) and its
     loss weights from the training set;
  2. builds the classifier on the backbone (pretrained weights, or random init for the from-scratch
     baseline) and the optimizer (AdamW + warmup/decay, freezing, layer-wise LR decay);
  3. trains on random aligned 5-s crops, data-parallel over the local devices; every `eval_every`
     steps (and at the end) it predicts the validation split, scores it (macro AUROC, or the loss) and,
     when the score improves, saves the classifier to `workdir/best_model` with the thresholds tuned on
     that validation; after `patience` validations without improvement it stops;
  4. checkpoints after every validation (state, early-stopping counters, data position) under
     `workdir/checkpoints`: rerunning the same command resumes; SIGTERM/Ctrl-C checkpoints and stops.
`mode="linear_probe"` replaces step 3 with `finetune.linear_probe`.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hubert_ecg_jax.progress import progress_bar

from hubert_ecg_jax.checkpoint import save_model
from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.finetune import losses
from hubert_ecg_jax.finetune.config import FinetuneSettings
from hubert_ecg_jax.finetune.data import read_labels, resolve_splits
from hubert_ecg_jax.finetune.fraction import subset_training_split
from hubert_ecg_jax.finetune.freezing import finetune_optimizer
from hubert_ecg_jax.finetune.step import DataParallelTrainer, make_train_step
from hubert_ecg_jax.finetune.tasks import Task, task_from_dataset
from hubert_ecg_jax.inference import (BatchRunner, classifier_logits_fn, classifier_metadata,
                                      load_backbone, run_on_records_dir)

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


@dataclasses.dataclass
class EarlyStopping:
  """Best validation score so far and the validations since; saved with each checkpoint.

  The first validation always counts as the best; a later one replaces it when its score is higher
  (a NaN score never is; a NaN best is beaten by any number). After `patience` validations in a row
  without a better score, `done` is set.
  """
  patience: int
  best_score: float = -math.inf
  best_step: int = -1
  bad_evals: int = 0
  done: bool = False

  def update(self, score: float, step: int) -> bool:
    """Records a validation; True when it is the new best (scores compare as stored, float32)."""
    score = float(np.float32(score))
    best = self.best_score if math.isfinite(self.best_score) else -math.inf
    if self.best_step < 0 or score > best:
      self.best_score, self.best_step, self.bad_evals = score, int(step), 0
      return True
    self.bad_evals += 1
    self.done = self.bad_evals >= self.patience
    return False

  def to_tree(self) -> dict[str, jax.Array]:
    return {"best_score": jnp.asarray(self.best_score, jnp.float32),
            "best_step": jnp.asarray(self.best_step, jnp.int32),
            "bad_evals": jnp.asarray(self.bad_evals, jnp.int32),
            "done": jnp.asarray(int(self.done), jnp.int32)}

  @classmethod
  def from_tree(cls, patience: int, tree: dict[str, Any]) -> EarlyStopping:
    values = {name: np.asarray(value).item() for name, value in jax.device_get(tree).items()}
    return cls(patience, float(values["best_score"]), int(values["best_step"]),
               int(values["bad_evals"]), bool(values["done"]))


def prepare(settings: FinetuneSettings, workdir: pathlib.Path) -> Prepared:
  """Steps 1 and 2 of the module docstring."""
  from hubert_ecg_jax.evaluate.metrics import label_names_or_default

  splits = resolve_splits(settings.data, workdir, settings.train.progress)
  _, labels, names = read_labels(splits["train"])
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
  from hubert_ecg_jax.evaluate import aggregate_crops, label_auroc, multiclass_metrics

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
  from hubert_ecg_jax.evaluate import tune_thresholds
  from hubert_ecg_jax.hub import model_source
  from hubert_ecg_jax.evaluate.snomed import ptbxl_descriptions

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
                          if settings.data.tfds_name.startswith("ptb_xl") else None),
      training_config=settings.raw)
  host = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  return save_model(directory, prepared.config, host, metadata, overwrite=True)


def finetune(settings: FinetuneSettings, workdir: str | pathlib.Path,
             print_fn: Callable[[str], None] = tqdm.write) -> FinetuneResult:
  """Runs (or resumes) a fine-tuning job in `workdir` (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  prepared = prepare(settings, workdir)
  for note in prepared.notes:
    print_fn(f"note: {note}")
  print_fn(f"task: {prepared.task.kind}, {prepared.task.num_outputs} outputs; model: "
           f"{prepared.config.num_hidden_layers} blocks of {prepared.config.hidden_size}"
           f" ({settings.model.init})")
  if settings.mode == "linear_probe":
    from hubert_ecg_jax.finetune.linear_probe import linear_probe

    return linear_probe(settings, prepared, workdir, print_fn)
  return _train(settings, prepared, workdir, print_fn)


def _train(settings: FinetuneSettings, prepared: Prepared, workdir: pathlib.Path,
           print_fn: Callable[[str], None]) -> FinetuneResult:
  from hubert_ecg_jax.data.pipeline import PipelineConfig, make_train_iterator
  from hubert_ecg_jax.train.checkpointing import CheckpointManager, DataPosition, abstract_like
  from hubert_ecg_jax.train.logging import MetricsWriter
  from hubert_ecg_jax.train.loop import StopSignals
  from hubert_ecg_jax.train.optimizer import linear_warmup_decay, make_optimizer
  from hubert_ecg_jax.train.state import create_train_state

  t, config = settings.train, prepared.config
  devices = jax.local_devices()[:t.devices] if t.devices else jax.local_devices()
  if t.batch_size % len(devices):
    raise ValueError(f"train.batch_size {t.batch_size} does not split over {len(devices)} devices: "
                     f"use a multiple of {len(devices)} or set train.devices")
  optimizer, trainable = finetune_optimizer(make_optimizer(settings.optimizer), prepared.params,
                                            config.num_hidden_layers, settings.freeze,
                                            config.do_stable_layer_norm)
  o = settings.optimizer
  schedule = linear_warmup_decay(o.learning_rate, o.warmup_steps, o.total_steps)
  trainer = DataParallelTrainer(make_train_step(prepared.model, optimizer, prepared.task.kind,
                                                prepared.loss_weights, trainable, schedule), devices)
  runner = BatchRunner(classifier_logits_fn(prepared.model), settings.eval.batch_size, devices)
  pipeline = PipelineConfig(batch_size=t.batch_size, seed=t.seed,
                            train_crop="random" if t.random_crop else "first",
                            shuffle_buffer=t.shuffle_buffer, process_index=0, process_count=1)
  batches = make_train_iterator(prepared.splits["train"], pipeline)
  position = DataPosition(batches)

  def new_state() -> dict[str, Any]:
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(t.seed), 1)
    return {"train": create_train_state(prepared.params, optimizer, dropout_key),
            "stopping": EarlyStopping(t.patience).to_tree()}

  manager = CheckpointManager(workdir / "checkpoints", keep_last=t.keep_checkpoints, keep_best=0)
  writer = MetricsWriter(workdir / "tensorboard", print_fn)
  try:
    if manager.latest_step is not None:
      abstract = abstract_like(jax.eval_shape(new_state), trainer.replicated)
      state = manager.restore(abstract, position)
      print_fn(f"resumed from step {manager.restored_step} in {manager.directory}")
    else:
      state = trainer.place_state(new_state())
    return _loop(settings, prepared, workdir, trainer, runner, batches, position, manager, writer,
                 state, StopSignals, print_fn)
  finally:
    writer.close()
    manager.close()


def _loop(settings: FinetuneSettings, prepared: Prepared, workdir: pathlib.Path,
          trainer: DataParallelTrainer, runner: BatchRunner, batches: Any, position: Any,
          manager: Any, writer: Any, state: dict[str, Any], stop_signals: Any,
          print_fn: Callable[[str], None]) -> FinetuneResult:
  from hubert_ecg_jax.data.records import read_manifest

  t, task = settings.train, prepared.task
  train_state = state["train"]
  stopping = EarlyStopping.from_tree(t.patience, state["stopping"])
  step = int(train_state.step)
  column_names = list(read_manifest(prepared.splits["train"]).label_names)
  stop_reason = "early_stopped" if stopping.done else "finished"
  bar = progress_bar(total=t.steps, initial=step, unit="step", dynamic_ncols=True, disable=not t.progress)

  def checkpoint() -> None:
    placed = jax.device_put(stopping.to_tree(), trainer.replicated)
    manager.save(step, {"train": train_state, "stopping": placed}, position)

  with stop_signals() as signals, bar:
    while step < t.steps and not stopping.done:
      if signals.received:
        stop_reason = signals.received
        break
      batch = next(batches)
      inputs = {"x": batch["x"], "attention_mask": batch["attention_mask"],
                "targets": task.targets(batch["labels"], column_names)}
      train_state, metrics = trainer.step(train_state, inputs)
      step += 1
      bar.update(1)
      if step % t.log_every == 0 or step == t.steps:
        values = {name: float(value) for name, value in metrics.items()}
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        writer.write(step, values, "train")
        if int(train_state.nonfinite_streak) >= t.max_nonfinite_streak:
          stop_reason = "nonfinite"
          break
      if step % t.eval_every == 0 or step == t.steps:
        validation = validate(runner, train_state.params, prepared, settings)
        writer.write(step, {"score": validation.score, **validation.metrics}, "val")
        if stopping.update(validation.score, step):
          save_classifier(workdir / BEST_MODEL, prepared, settings, train_state.params, validation,
                          step, prepared.notes)
        elif stopping.done:
          stop_reason = "early_stopped"
          print_fn(f"early stopping at step {step}: {t.patience} validations without progress "
                   f"since step {stopping.best_step}")
        checkpoint()
  if stop_reason not in ("finished", "early_stopped"):
    checkpoint()
    print_fn(f"stopped at step {step} ({stop_reason}); the checkpoint resumes the run")
  best_step = stopping.best_step if stopping.best_step >= 0 else None
  return FinetuneResult(stop_reason, step, best_step,
                        None if best_step is None else stopping.best_score,
                        workdir / BEST_MODEL if best_step is not None else None, prepared.splits)


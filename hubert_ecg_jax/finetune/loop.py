"""The fine-tuning run: data, task, model, then train with validation, early stopping and resume.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hubert_ecg_jax.data.pipeline import PipelineConfig, make_train_iterator
from hubert_ecg_jax.data.records import read_manifest
from hubert_ecg_jax.files import as_path
from hubert_ecg_jax.finetune.config import FinetuneSettings
from hubert_ecg_jax.finetune.freezing import finetune_optimizer
from hubert_ecg_jax.finetune.linear_probe import linear_probe
from hubert_ecg_jax.finetune.run import (BEST_MODEL, FinetuneResult, Prepared, prepare,
                                         save_classifier, validate)
from hubert_ecg_jax.finetune.step import make_train_step
from hubert_ecg_jax.inference import classifier_logits_fn
from hubert_ecg_jax.parallel import BatchRunner, hold_run_directory, make_launcher
from hubert_ecg_jax.train.checkpointing import DataPosition
from hubert_ecg_jax.train.engine import Engine, Job, RunConfig
from hubert_ecg_jax.train.optimizer import make_optimizer
from hubert_ecg_jax.train.state import TrainState, create_train_state


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


def finetune(settings: FinetuneSettings, workdir: str | pathlib.Path,
             print_fn: Callable[[str], None] = tqdm.write) -> FinetuneResult:
  """Runs (or resumes) a fine-tuning job in `workdir` (see the module docstring)."""
  workdir = as_path(workdir)
  with hold_run_directory(workdir):
    return _finetune(settings, workdir, print_fn)


def _finetune(settings: FinetuneSettings, workdir: pathlib.Path,
              print_fn: Callable[[str], None]) -> FinetuneResult:
  workdir.mkdir(parents=True, exist_ok=True)
  prepared = prepare(settings, workdir)
  for note in prepared.notes:
    print_fn(f"note: {note}")
  print_fn(f"task: {prepared.task.kind}, {prepared.task.num_outputs} outputs; model: "
           f"{prepared.config.num_hidden_layers} blocks of {prepared.config.hidden_size}"
           f" ({settings.model.init})")
  if settings.mode == "linear_probe":
    return linear_probe(settings, prepared, workdir, print_fn)
  return _train(settings, prepared, workdir, print_fn)


class FinetuneJob(Job):
  """Fine-tuning as the engine's job: labelled batches, validation with early stopping, best model."""

  validates = True

  def __init__(self, settings: FinetuneSettings, prepared: Prepared, workdir: pathlib.Path,
               optimizer: Any, runner: BatchRunner, print_fn: Callable[[str], None]):
    self.settings, self.prepared, self.workdir = settings, prepared, workdir
    self.optimizer, self.runner, self.print = optimizer, runner, print_fn
    self.stopping = EarlyStopping(settings.train.patience)
    self.column_names = list(read_manifest(prepared.splits["train"]).label_names)

  def new_state(self) -> TrainState:
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(self.settings.train.seed), 1)
    return create_train_state(self.prepared.params, self.optimizer, dropout_key)

  def batch(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"x": item["x"], "attention_mask": item["attention_mask"],
            "targets": self.prepared.task.targets(item["labels"], self.column_names)}

  def extra_state(self) -> dict[str, Any]:
    return {"stopping": self.stopping.to_tree()}

  def load_extra_state(self, saved: dict[str, Any]) -> None:
    self.stopping = EarlyStopping.from_tree(self.settings.train.patience, saved["stopping"])

  def validate(self, state: TrainState, step: int) -> tuple[dict[str, float], None]:
    validation = validate(self.runner, state.params, self.prepared, self.settings)
    if self.stopping.update(validation.score, step):
      save_classifier(self.workdir / BEST_MODEL, self.prepared, self.settings, state.params,
                      validation, step, self.prepared.notes)
    elif self.stopping.done:
      self.print(f"early stopping at step {step}: {self.settings.train.patience} validations "
                 f"without progress since step {self.stopping.best_step}")
    return {"score": validation.score, **validation.metrics}, None

  def stop_reason(self) -> str | None:
    return "early_stopped" if self.stopping.done else None


def _train(settings: FinetuneSettings, prepared: Prepared, workdir: pathlib.Path,
           print_fn: Callable[[str], None]) -> FinetuneResult:
  t = settings.train
  devices = jax.local_devices()[:t.devices] if t.devices else jax.local_devices()
  if jax.process_count() > 1:
    raise ValueError(f"fine-tuning runs on one host; this job has {jax.process_count()} "
                     "processes: run it as a single process (it uses every local device)")
  if t.batch_size % len(devices):
    raise ValueError(f"train.batch_size {t.batch_size} does not split over {len(devices)} devices: "
                     f"use a multiple of {len(devices)} or set train.devices")
  optimizer, trainable = finetune_optimizer(make_optimizer(settings.optimizer), prepared.params,
                                            prepared.config.num_hidden_layers, settings.freeze,
                                            prepared.config.do_stable_layer_norm)
  launcher = make_launcher("mesh", make_train_step(
      prepared.model, optimizer, prepared.task.kind, prepared.loss_weights, trainable,
      settings.optimizer.schedule()), devices=devices)
  runner = BatchRunner(classifier_logits_fn(prepared.model), settings.eval.batch_size, devices)
  pipeline = PipelineConfig(batch_size=t.batch_size, seed=t.seed,
                            train_crop="random" if t.random_crop else "first",
                            shuffle_buffer=t.shuffle_buffer, process_index=0, process_count=1,
                            skip_corrupted=settings.data.skip_corrupted)
  batches = make_train_iterator(prepared.splits["train"], pipeline, log=print_fn)
  run = RunConfig(total_steps=t.steps, log_every=t.log_every, val_every=t.eval_every,
                  checkpoint_every=None, keep_last=t.keep_checkpoints, keep_best=0,
                  max_nonfinite_streak=t.max_nonfinite_streak, progress=t.progress,
                  device_prefetch=t.device_prefetch)
  job = FinetuneJob(settings, prepared, workdir, optimizer, runner, print_fn)
  outcome = Engine(launcher, run, print_fn).run(workdir, job, batches, DataPosition(batches))
  stopping = job.stopping
  best_step = stopping.best_step if stopping.best_step >= 0 else None
  return FinetuneResult(outcome.stop_reason, outcome.step, best_step,
                        None if best_step is None else stopping.best_score,
                        workdir / BEST_MODEL if best_step is not None else None, prepared.splits)

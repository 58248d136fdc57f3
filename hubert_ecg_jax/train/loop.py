"""The pre-training loop: resume, step, log, validate, checkpoint, stop gracefully, export.

`Pretrainer.run` takes an iterator of process-local numpy batches (the data pipeline's, or any with
the same keys; see `step.py`) and trains until `total_steps`:

  1. resume from the latest checkpoint under `workdir/checkpoints` (state and data position), or
     start from fresh parameters (or `init_params`, e.g. the next iteration's);
  2. each step: check the batch on the host, place it on the devices, run the jitted step;
  3. every `log_every` steps: metrics to stdout and TensorBoard (`workdir/tensorboard`);
  4. every `val_every` steps and at the end: validation, then a checkpoint carrying the val loss;
     every `checkpoint_every` steps: a checkpoint;
  5. on SIGTERM or SIGINT (to any process): finish the step, checkpoint, return (a second Ctrl-C
     interrupts at once);
     after `max_nonfinite_streak` non-finite steps in a row: checkpoint, stop with a message;
  6. at the end: export the final params to `workdir/model` (and the best by validation loss to
     `workdir/model_best`) as model directories for fine-tuning.
"""
from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.objectives import validation_metrics
from hubert_ecg_jax.progress import progress_bar
from hubert_ecg_jax.train.checkpointing import (CheckpointManager, DataPosition, abstract_like,
                                                export_model, host_copy)
from hubert_ecg_jax.train.launchers import make_launcher
from hubert_ecg_jax.train.logging import MetricsWriter
from hubert_ecg_jax.train.optimizer import OptimizerConfig, linear_warmup_decay, make_optimizer
from hubert_ecg_jax.train.state import ECG_SAMPLES, TrainState, create_train_state, init_params
from hubert_ecg_jax.train.step import make_eval_step, make_train_step

TRAIN_KEYS = ("x", "attention_mask", "targets", "mask_time_indices")
EVAL_KEYS = ("x", "attention_mask", "targets")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, validate and checkpoint."""
  total_steps: int
  alpha: float = 1.0  # weight of the masked-frame loss (the original: 1, masked frames only)
  micro_batches: int = 1  # gradient accumulation inside the step
  launcher: str = "mesh"  # "mesh" (jit + shard_map) or "pmap"
  seed: int = 42  # parameter init and dropout
  log_every: int = 100
  val_every: int = 4000  # 0: validate only at the end
  checkpoint_every: int = 1000
  keep_last: int = 3
  keep_best: int = 1
  max_nonfinite_streak: int = 10
  eval_batch_size: int | None = None  # per process; None: the first validation batch's size
  progress: bool = True

  def __post_init__(self) -> None:
    for name in ("total_steps", "micro_batches", "log_every", "checkpoint_every",
                 "max_nonfinite_streak"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.val_every < 0:
      raise ValueError(f"val_every must be >= 0, got {self.val_every}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclasses.dataclass
class TrainResult:
  step: int
  stop_reason: str  # "finished", "nonfinite", or the signal that stopped it ("SIGTERM", "SIGINT")
  metrics: dict[str, float]  # the last train metrics fetched
  val_loss: float | None  # the last validation loss
  model_dir: pathlib.Path | None  # the exported final model (when finished)


class StopSignals:
  """Turns the first SIGTERM or SIGINT into a stop request; a second SIGINT interrupts at once."""

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class Pretrainer:
  """Everything a pre-training run needs, built once: model, optimizer, jitted steps, launcher."""

  def __init__(self, model_config: HubertECGConfig, optimizer_config: OptimizerConfig,
               loop_config: LoopConfig, devices: list[jax.Device] | None = None,
               print_fn: Callable[[str], None] = tqdm.write):
    if optimizer_config.total_steps != loop_config.total_steps:
      raise ValueError(f"the learning-rate schedule is for {optimizer_config.total_steps} steps but "
                       f"the run is {loop_config.total_steps}: make them equal")
    self.model_config = model_config
    self.optimizer_config = optimizer_config
    self.loop = loop_config
    self.print = print_fn
    model = HubertECG(model_config)
    self.optimizer = make_optimizer(optimizer_config)
    schedule = linear_warmup_decay(optimizer_config.learning_rate, optimizer_config.warmup_steps,
                                   optimizer_config.total_steps)
    train_step = make_train_step(model, self.optimizer, loop_config.alpha,
                                 loop_config.micro_batches, learning_rate=schedule)
    self.launcher = make_launcher(loop_config.launcher, train_step, make_eval_step(model), devices)

  # -- state ------------------------------------------------------------------------------------
  def _new_state(self, params: Any | None) -> TrainState:
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(self.loop.seed))
    if params is None:
      params = init_params(self.model_config, init_key)
    return create_train_state(params, self.optimizer, dropout_key)

  def _abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(lambda: self._new_state(None))
    return abstract_like(shapes, self.launcher.state_sharding)

  # -- batches ----------------------------------------------------------------------------------
  def check_batch(self, batch: dict[str, np.ndarray], training: bool) -> dict[str, np.ndarray]:
    """The batch's model inputs, after checking names, shapes, dtypes and target units."""
    keys = TRAIN_KEYS if training else EVAL_KEYS
    missing = [key for key in keys if key not in batch]
    if missing:
      raise ValueError(f"batch lacks {missing}: expected keys {list(keys)}, found {sorted(batch)}")
    batch = {key: np.asarray(batch[key]) for key in keys}
    x, attention_mask, targets = batch["x"], batch["attention_mask"], batch["targets"]
    cfg = self.model_config
    if x.ndim != 2 or x.dtype != np.float32:
      raise ValueError(f"batch x must be float32 (batch, samples), found {x.dtype} {x.shape}")
    size, samples = x.shape
    frames = cfg.num_frames(samples)
    expected = {"attention_mask": (size, samples), "targets": (size, len(cfg.vocab_sizes), frames),
                "mask_time_indices": (size, frames)}
    for key in keys[1:]:
      if batch[key].shape != expected[key]:
        raise ValueError(f"batch {key} must have shape {expected[key]} for x of shape {x.shape} and "
                         f"{len(cfg.vocab_sizes)} codebooks, found {batch[key].shape}")
    if training and batch["mask_time_indices"].dtype != np.bool_:
      raise ValueError(f"batch mask_time_indices must be bool, found {batch['mask_time_indices'].dtype}")
    if not (np.issubdtype(targets.dtype, np.integer) and np.issubdtype(attention_mask.dtype, np.integer)):
      raise ValueError(f"batch targets and attention_mask must be integer, found {targets.dtype} and "
                       f"{attention_mask.dtype}")
    lengths = np.array([cfg.num_frames(n) for n in attention_mask.sum(axis=-1)])
    valid = np.arange(frames)[None, :] < lengths[:, None]  # (batch, frames) non-padding frames
    for index, vocab in enumerate(cfg.vocab_sizes):
      units = targets[:, index, :][valid]
      if units.size and (units.min() < 0 or units.max() >= vocab):
        raise ValueError(f"targets of codebook {index} must lie in [0, {vocab}), found units from "
                         f"{units.min()} to {units.max()}: do the records' k-means K match vocab_sizes?")
    batch["attention_mask"] = attention_mask.astype(np.int32)
    batch["targets"] = targets.astype(np.int32)
    return batch

  def _padded(self, batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`batch` grown to `size` rows of padding (attention mask 0: they count nowhere)."""
    extra = size - batch["x"].shape[0]
    if extra < 0:
      raise ValueError(f"a validation batch of {batch['x'].shape[0]} exceeds eval_batch_size {size}")
    return {key: np.concatenate([value, np.zeros((extra, *value.shape[1:]), value.dtype)])
            for key, value in batch.items()}

  # -- validation -------------------------------------------------------------------------------
  def validate(self, state: TrainState, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """CE and accuracy over all non-padding frames of `batches` (one pass, no masking).

    Batches are padded to one size (`eval_batch_size`, else the first batch's, rounded up to the
    devices) so one compiled step serves all; on several processes, a host that runs out of
    batches feeds padding until all have.
    """
    from jax.experimental import multihost_utils

    devices = self.launcher.local_devices
    size = self.loop.eval_batch_size
    if size is None and jax.process_count() > 1:
      raise ValueError("set eval_batch_size for validation on several processes (each needs the "
                       "same batch shape)")
    samples = ECG_SAMPLES
    totals = None
    iterator = iter(batches)
    while True:
      batch = next(iterator, None)
      if jax.process_count() > 1:
        if not multihost_utils.process_allgather(np.array([batch is not None])).any():
          break
      elif batch is None:
        break
      if batch is None:  # this host is done, others are not
        batch = self._padded(self._padding_batch(samples), size)
      else:
        batch = self.check_batch(batch, training=False)
        samples = batch["x"].shape[1]
        size = size or -(-batch["x"].shape[0] // devices) * devices
      sums = self.launcher.eval_step(state, self.launcher.place_batch(self._padded(batch, size)))
      sums = self.launcher.to_host(sums)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:
      raise ValueError("the validation data gave no batches")
    return {name: float(value) for name, value in validation_metrics(totals).items()}

  def _padding_batch(self, samples: int) -> dict[str, np.ndarray]:
    """A batch of no rows, to be padded: for a host without validation batches left."""
    frames = self.model_config.num_frames(samples)
    return {"x": np.zeros((0, samples), np.float32), "attention_mask": np.zeros((0, samples), np.int32),
            "targets": np.zeros((0, len(self.model_config.vocab_sizes), frames), np.int32)}

  # -- the run ----------------------------------------------------------------------------------
  def run(self, workdir: str | pathlib.Path, train_batches: Iterator[dict[str, np.ndarray]],
          val_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
          data_position: Any = None, init_params: Any = None) -> TrainResult:
    """Trains to `total_steps`, resuming from `workdir` if a checkpoint is there.

    Args:
      workdir: the run's directory: checkpoints/, tensorboard/, model/, model_best/.
      train_batches: endless iterator of process-local batch dicts.
      val_batches: makes a fresh iterator over the validation batches, or None for no validation.
      data_position: what saves/restores the iterator position (see `DataPosition`); default:
        `train_batches` itself when it has `save`/`restore`, else none (a resumed run then reads
        the data from where the given iterator starts).
      init_params: parameters to start from when there is no checkpoint (e.g. the next iteration).
    """
    loop = self.loop
    if data_position is None and hasattr(train_batches, "save") and hasattr(train_batches, "restore"):
      data_position = train_batches
    position = None if data_position is None else DataPosition(data_position)
    workdir = pathlib.Path(workdir)
    manager = CheckpointManager(workdir / "checkpoints", loop.keep_last, loop.keep_best)
    writer = MetricsWriter(workdir / "tensorboard", self.print)
    try:
      return self._run(workdir, train_batches, val_batches, position, init_params, manager, writer)
    finally:
      writer.close()
      manager.close()

  def _run(self, workdir: pathlib.Path, train_batches: Iterator[dict[str, np.ndarray]],
           val_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None,
           position: DataPosition | None, init_params: Any, manager: CheckpointManager,
           writer: MetricsWriter) -> TrainResult:
    loop, launcher = self.loop, self.launcher
    if manager.latest_step is not None:
      state = launcher.place_state(manager.restore(self._abstract_state(), position))
      self.print(f"resumed from step {manager.restored_step} in {manager.directory}")
    else:
      state = launcher.place_state(self._new_state(init_params))
    step = int(host_copy(launcher.checkpoint_view(state).step))
    if position is None:
      self.print("note: the batches have no save/restore: a resumed run will not continue the "
                 "data stream where this one stopped")
    metrics: dict[str, float] = {}
    val_loss = None
    stop_reason = "finished"
    previous = None
    first_step = step
    timer_step, timer_start = step, time.perf_counter()
    bar = progress_bar(total=loop.total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not loop.progress or jax.process_index() != 0)

    def checkpoint(with_val_loss: float | None = None) -> None:
      manager.save(step, launcher.checkpoint_view(state), position, with_val_loss)

    with StopSignals() as signals, bar:
      while step < loop.total_steps:
        if self._stop_requested(signals):
          stop_reason = signals.received or "SIGTERM"  # another process got it
          break
        batch = self.check_batch(next(train_batches), training=True)
        global_batch = batch["x"].shape[0] * jax.process_count()
        state, step_metrics = launcher.train_step(state, launcher.place_batch(batch))
        step += 1
        bar.update(1)
        # The previous step's streak is ready (or nearly): reading it keeps the devices busy.
        streak = 0 if previous is None else int(launcher.to_host(previous["nonfinite_streak"]))
        previous = step_metrics
        if step == first_step + 1:
          jax.block_until_ready(step_metrics)  # leave compilation out of the speed
          timer_step, timer_start = step, time.perf_counter()
        if step % loop.log_every == 0 or step in (first_step + 1, loop.total_steps):
          metrics = {k: float(v) for k, v in launcher.to_host(step_metrics).items()}
          elapsed = time.perf_counter() - timer_start
          if step > timer_step and elapsed > 0:
            metrics["ecg_per_s"] = global_batch * (step - timer_step) / elapsed
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", ecg_per_s=f"{metrics['ecg_per_s']:.1f}")
          writer.write(step, metrics, "train")
          streak = int(metrics["nonfinite_streak"])
        if streak >= loop.max_nonfinite_streak:
          stop_reason = "nonfinite"
          break
        at_end = step == loop.total_steps
        if val_batches is not None and (at_end or (loop.val_every and step % loop.val_every == 0)):
          val_metrics = self.validate(state, val_batches())
          val_loss = val_metrics["loss"]
          writer.write(step, val_metrics, "val")
          checkpoint(val_loss)
        elif at_end or step % loop.checkpoint_every == 0:
          checkpoint()

    if stop_reason == "nonfinite":
      self.print(f"stopping at step {step}: {loop.max_nonfinite_streak} steps in a row had a "
                 "non-finite loss or gradients (they were skipped; the state is the last finite "
                 "one). Lower the learning rate, enable grad_clip_norm or check the data.")
    if stop_reason != "finished":
      checkpoint()
      if stop_reason != "nonfinite":
        self.print(f"{stop_reason} received: checkpointed step {step}, stopping")
      return TrainResult(step, stop_reason, metrics, val_loss, None)
    return TrainResult(step, stop_reason, metrics, val_loss,
                       self._export(workdir, state, manager, step))

  @staticmethod
  def _stop_requested(signals: StopSignals) -> bool:
    """Whether any process got a stop signal: all processes must stop at the same step."""
    if jax.process_count() == 1:
      return signals.received is not None
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.array([signals.received is not None])).any())

  def _export(self, workdir: pathlib.Path, state: TrainState, manager: CheckpointManager,
              step: int) -> pathlib.Path | None:
    """Final params to `workdir/model`; the best by validation loss to `workdir/model_best`."""
    launcher = self.launcher
    metadata = {"step": step, "source": "hubert-ecg-jax pretraining"}
    model_dir = export_model(workdir / "model", self.model_config,
                             launcher.checkpoint_view(state).params, metadata)
    best = manager.best_step
    if best is not None:
      best_state = manager.restore(self._abstract_state(), step=best)
      export_model(workdir / "model_best", self.model_config, best_state.params,
                   dict(metadata, step=best))
    if model_dir is not None:
      self.print(f"exported the final model to {model_dir}"
                 + (f" and the best (step {best}) to {workdir / 'model_best'}" if best else ""))
    return model_dir

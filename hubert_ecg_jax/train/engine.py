"""The training engine: one loop for pre-training and fine-tuning (more: docs/modules.md)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from hubert_ecg_jax.data.pipeline import SKIPPED
from hubert_ecg_jax.files import as_path
from hubert_ecg_jax.parallel import DevicePrefetch, Launcher, host_copy
from hubert_ecg_jax.progress import progress_bar
from hubert_ecg_jax.train.checkpointing import CheckpointManager, DataPosition, abstract_like
from hubert_ecg_jax.train.logging import MetricsWriter
from hubert_ecg_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long to train and how often to log, validate and checkpoint."""
  total_steps: int
  log_every: int = 100
  val_every: int | None = 4000  # None: validate only at the end
  checkpoint_every: int | None = 1000  # None: checkpoint only with validations and stops
  keep_last: int = 3
  keep_best: int = 1  # checkpoints kept for the lowest validation loss
  max_nonfinite_streak: int = 10
  progress: bool = True
  device_prefetch: int = 2  # batches placed on the devices ahead of the running step (0: none)

  def __post_init__(self) -> None:
    for name in ("total_steps", "log_every", "max_nonfinite_streak", "val_every",
                 "checkpoint_every"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.device_prefetch < 0:
      raise ValueError(f"device_prefetch must be >= 0, got {self.device_prefetch}")


@dataclasses.dataclass
class Outcome:
  step: int
  stop_reason: str  # "finished", "nonfinite", the job's own, or the signal ("SIGTERM", "SIGINT")
  metrics: dict[str, float]  # the last train metrics fetched
  val_loss: float | None  # the last validation loss
  exported: Any  # what `job.export` returned (when the run finished)


class _StepInput(NamedTuple):
  """One step's batch, placed on the devices, and what the engine logs of it."""
  batch: Any  # the launcher's placed arrays
  size: int  # this process's batch size
  skipped: int | None  # damaged records left out before it (when the batches tell)


class Job:
  """What a training run plugs into the engine; the defaults: no validation, no extra state."""

  validates = False

  def new_state(self) -> TrainState:
    """The host state at step 0."""
    raise NotImplementedError

  def batch(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The step's inputs from one item of the batch iterator."""
    return item

  def extra_state(self) -> dict[str, Any] | None:
    """State saved beside the train state (as `{"train": state, **extra}`), or None."""
    return None

  def load_extra_state(self, saved: dict[str, Any]) -> None:
    """Takes back what `extra_state` saved."""

  def validate(self, state: Any, step: int) -> tuple[dict[str, float], float | None]:
    """(metrics to log, loss that ranks checkpoints or None) of the placed state."""
    raise NotImplementedError

  def stop_reason(self) -> str | None:
    """A reason to stop now that is not a failure (e.g. early stopping)."""
    return None

  def export(self, workdir: pathlib.Path, state: Any, manager: CheckpointManager, step: int) -> Any:
    """What a finished run leaves besides its checkpoints (the checkpoint-view state)."""
    return None


class StopSignals:
  """Turns the first SIGTERM or SIGINT into a stop request; a second SIGINT interrupts at once."""

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    # os.write, not print: the handler may run while the main thread is inside a print.
    os.write(2, f"{self.received} received: stopping with a checkpoint after this step (Ctrl-C "
                "again interrupts at once)\n".encode())

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def any_process(self) -> bool:
    """Whether any process got a stop signal: all processes must stop at the same step."""
    if jax.process_count() == 1:
      return self.received is not None
    return bool(multihost_utils.process_allgather(np.array([self.received is not None])).any())


class Engine:
  """Runs jobs on one launcher with one `RunConfig`."""

  def __init__(self, launcher: Launcher, config: RunConfig,
               print_fn: Callable[[str], None] = tqdm.write):
    self.launcher = launcher
    self.config = config
    self.print = print_fn

  def abstract_checkpoint(self, job: Job) -> Any:
    """The restore target of a checkpoint of `job`, placed for the current devices."""
    tree = self._with_extra(job, jax.eval_shape(job.new_state))
    return abstract_like(tree, self.launcher.state_sharding)

  def _with_extra(self, job: Job, state: Any) -> Any:
    extra = job.extra_state()
    if extra is None:
      return state
    return {"train": state, **jax.device_put(extra, self.launcher.state_sharding)}

  def run(self, workdir: str | pathlib.Path, job: Job, batches: Iterator[dict[str, np.ndarray]],
          position: DataPosition | None) -> Outcome:
    """Trains `job` to `total_steps` in `workdir` (checkpoints/, tensorboard/), resuming if it can.

    Batches may carry `skipped_records` (damaged records left out, logged summed per log line)
    and the iterator may have `check_damage()`, called before each checkpoint (see
    `data.pipeline.BatchIterator`).
    """
    workdir = as_path(workdir)
    manager = CheckpointManager(workdir / "checkpoints", self.config.keep_last, self.config.keep_best)
    writer = MetricsWriter(workdir / "tensorboard", self.print)
    try:
      return self._run(workdir, job, batches, position, manager, writer)
    finally:
      writer.close()
      manager.close()

  def _resume(self, job: Job, manager: CheckpointManager, position: DataPosition | None) -> Any:
    if manager.latest_step is None:
      return self.launcher.place_state(job.new_state())
    saved = manager.restore(self.abstract_checkpoint(job), position)
    if job.extra_state() is not None:
      job.load_extra_state(saved)
      saved = saved["train"]
    self.print(f"resumed from step {manager.restored_step} in {manager.directory}")
    return self.launcher.place_state(saved)

  def _place(self, job: Job, item: dict[str, np.ndarray]) -> _StepInput:
    batch = job.batch(item)
    skipped = int(item[SKIPPED]) if SKIPPED in item else None
    return _StepInput(self.launcher.place_batch(batch), batch["x"].shape[0], skipped)

  def _next_save(self, job: Job, step: int) -> int:
    """The first step >= `step` whose checkpoint is scheduled (a validation, `checkpoint_every`, the
    end): batches for steps past it are not pulled before it is saved."""
    loop = self.config
    every = [n for n in (loop.checkpoint_every, loop.val_every if job.validates else None) if n]
    return min([loop.total_steps] + [-(-step // n) * n for n in every])

  def _run(self, workdir: pathlib.Path, job: Job, batches: Iterator[dict[str, np.ndarray]],
           position: DataPosition | None, manager: CheckpointManager,
           writer: MetricsWriter) -> Outcome:
    loop, launcher = self.config, self.launcher
    state = self._resume(job, manager, position)
    step = int(host_copy(launcher.checkpoint_view(state).step))
    if position is None:
      self.print("note: the batches have no save/restore: a resumed run will not continue the "
                 "data stream where this one stopped")
    check_damage = getattr(batches, "check_damage", lambda: None)
    skipped: int | None = None  # damaged records the batches left out since the last log (if told)
    metrics: dict[str, float] = {}
    val_loss = None
    stop_reason = job.stop_reason() or "finished"
    stopping = False  # a stop signal or non-finite steps: train the placed batches, then checkpoint
    previous = None
    first_step = step
    timer_step, timer_start = step, time.perf_counter()
    bar = progress_bar(total=loop.total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not loop.progress or jax.process_index() != 0)
    feed = DevicePrefetch(batches, lambda item: self._place(job, item), loop.device_prefetch)

    def checkpoint(with_val_loss: float | None = None) -> None:
      # Placed batches are never pending here (`_next_save`, the drain when stopping): the data
      # position is that of the batches the steps took.
      check_damage()  # no checkpoint holds a data position past a damaged shard
      tree = self._with_extra(job, launcher.checkpoint_view(state))
      manager.save(step, tree, position, with_val_loss)

    with StopSignals() as signals, bar:
      while step < loop.total_steps:
        if not stopping:
          if job.stop_reason():
            stop_reason = job.stop_reason()
            break  # no checkpoint follows: the placed batches are dropped
          if signals.any_process():
            stop_reason = signals.received or "SIGTERM"  # another process got it
            stopping = True
        if stopping and not feed.pending:
          break
        taken = next(feed)
        if taken.skipped is not None:
          skipped = (skipped or 0) + taken.skipped
        global_batch = taken.size * jax.process_count()
        state, step_metrics = launcher.train_step(state, taken.batch)
        step += 1
        if not stopping:  # the next batches' copies overlap this step
          feed.fill(self._next_save(job, step) - step)
        bar.update(1)
        # The previous step's streak is ready (or nearly): reading it keeps the devices busy.
        streak = 0 if previous is None else int(launcher.to_host(previous["nonfinite_streak"]))
        previous = step_metrics
        if step == first_step + 1:
          jax.block_until_ready(step_metrics)  # leave compilation out of the speed
          timer_step, timer_start = step, time.perf_counter()
        if step % loop.log_every == 0 or step in (first_step + 1, loop.total_steps):
          metrics = {k: float(v) for k, v in launcher.to_host(step_metrics).items()}
          if skipped is not None:
            metrics[SKIPPED], skipped = _all_processes_sum(skipped), 0
          elapsed = time.perf_counter() - timer_start
          if step > timer_step and elapsed > 0:
            metrics["ecg_per_s"] = global_batch * (step - timer_step) / elapsed
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", ecg_per_s=f"{metrics['ecg_per_s']:.1f}")
          writer.write(step, metrics, "train")
          streak = int(metrics["nonfinite_streak"])
        if streak >= loop.max_nonfinite_streak and not stopping:
          stop_reason, stopping = "nonfinite", True
          continue
        at_end = step == loop.total_steps
        if job.validates and (at_end or (loop.val_every and step % loop.val_every == 0)):
          val_metrics, val_loss = job.validate(state, step)
          writer.write(step, val_metrics, "val")
          checkpoint(val_loss)
        elif at_end or (loop.checkpoint_every and step % loop.checkpoint_every == 0):
          checkpoint()

    if stop_reason == "nonfinite":
      self.print(f"stopping at step {step}: {loop.max_nonfinite_streak} steps in a row had a "
                 "non-finite loss or gradients (they were skipped; the state is the last finite "
                 "one). Lower the learning rate, enable grad_clip_norm or check the data.")
    if stop_reason not in ("finished", job.stop_reason()):
      checkpoint()
      if stop_reason != "nonfinite":
        self.print(f"{stop_reason} received: checkpointed step {step}, stopping")
      return Outcome(step, stop_reason, metrics, val_loss, None)
    exported = job.export(workdir, launcher.checkpoint_view(state), manager, step)
    return Outcome(step, stop_reason, metrics, val_loss, exported)


def _all_processes_sum(count: int) -> int:
  if jax.process_count() == 1:
    return count
  return int(multihost_utils.process_allgather(np.array(count)).sum())

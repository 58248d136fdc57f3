"""Pre-training: the masked-prediction job the training engine runs (see `engine.py`).

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm import tqdm

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, HubertECGConfig
from hubert_ecg_jax.data.pipeline import PipelineConfig, make_eval_iterator, make_train_iterator
from hubert_ecg_jax.data.units import read_units_manifest
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.parallel import hold_run_directory, make_launcher
from hubert_ecg_jax.pretrained import load_pretrained
from hubert_ecg_jax.train.checkpointing import CheckpointManager, DataPosition, export_model
from hubert_ecg_jax.train.engine import Engine, Job, RunConfig
from hubert_ecg_jax.train.objectives import validation_metrics
from hubert_ecg_jax.train.optimizer import OptimizerConfig, make_optimizer
from hubert_ecg_jax.train.state import (TrainState, create_train_state, init_params,
                                        next_iteration_params)
from hubert_ecg_jax.train.step import make_eval_step, make_train_step, micro_batch_count

TRAIN_KEYS = ("x", "attention_mask", "targets", "mask_time_indices")
EVAL_KEYS = ("x", "attention_mask", "targets")


@dataclasses.dataclass(frozen=True)
class LoopConfig(RunConfig):
  """The engine's schedule plus what the pre-training step and state need."""
  alpha: float = 1.0  # weight of the masked-frame loss (the original: 1, masked frames only)
  per_device_batch: int | None = None  # examples a device runs at once (gradient accumulation)
  launcher: str = "mesh"  # "mesh" (jit + shard_map) or "pmap"
  seed: int = 42  # parameter init and dropout
  eval_batch_size: int | None = None  # per process; None: the first validation batch's size

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.per_device_batch is not None and self.per_device_batch < 1:
      raise ValueError(f"per_device_batch must be >= 1 (or None), got {self.per_device_batch}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclasses.dataclass
class TrainResult:
  step: int
  stop_reason: str  # "finished", "nonfinite", or the signal that stopped it ("SIGTERM", "SIGINT")
  metrics: dict[str, float]  # the last train metrics fetched
  val_loss: float | None  # the last validation loss
  model_dir: pathlib.Path | None  # the exported final model (when finished)


class Pretrainer(Job):
  """Everything a pre-training run needs, built once: model, optimizer, jitted steps, launcher."""

  def __init__(self, model_config: HubertECGConfig, optimizer_config: OptimizerConfig,
               loop_config: LoopConfig, devices: list[jax.Device] | None = None,
               print_fn: Callable[[str], None] = tqdm.write):
    if optimizer_config.total_steps != loop_config.total_steps:
      raise ValueError(f"the learning-rate schedule is for {optimizer_config.total_steps} steps but "
                       f"the run is {loop_config.total_steps}: make them equal")
    self.model_config = model_config
    self.loop = loop_config
    self.print = print_fn
    model = HubertECG(model_config)
    self.optimizer = make_optimizer(optimizer_config)
    train_step = make_train_step(model, self.optimizer, loop_config.alpha,
                                 loop_config.per_device_batch,
                                 learning_rate=optimizer_config.schedule())
    self.launcher = make_launcher(loop_config.launcher, train_step, make_eval_step(model), devices)
    self.engine = Engine(self.launcher, loop_config, print_fn)
    self._init_params: Any = None
    self._val_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None

  # -- state ------------------------------------------------------------------------------------
  def _new_state(self, params: Any | None) -> TrainState:
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(self.loop.seed))
    if params is None:
      params = init_params(self.model_config, init_key)
    return create_train_state(params, self.optimizer, dropout_key)

  def new_state(self) -> TrainState:
    return self._new_state(self._init_params)

  def _abstract_state(self) -> TrainState:
    return self.engine.abstract_checkpoint(self)

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

  def batch(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return self.check_batch(item, training=True)

  def _padded(self, batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`batch` grown to `size` rows of padding (attention mask 0: they count nowhere)."""
    extra = size - batch["x"].shape[0]
    if extra < 0:
      raise ValueError(f"a validation batch of {batch['x'].shape[0]} exceeds eval_batch_size {size}")
    return {key: np.concatenate([value, np.zeros((extra, *value.shape[1:]), value.dtype)])
            for key, value in batch.items()}

  # -- validation -------------------------------------------------------------------------------
  @property
  def validates(self) -> bool:
    return self._val_batches is not None

  def validate(self, state: TrainState, step: int) -> tuple[dict[str, float], float]:
    metrics = self.validate_on(state, self._val_batches())
    return metrics, metrics["loss"]

  def validate_on(self, state: TrainState, batches: Iterable[dict[str, np.ndarray]]
                  ) -> dict[str, float]:
    """CE and accuracy over all non-padding frames of `batches` (one pass, no masking).

    Batches are padded to one size (`eval_batch_size`, else the first batch's, rounded up to the
    devices) so one compiled step serves all; on several processes, a host that runs out of
    batches feeds padding until all have.
    """
    devices = self.launcher.local_devices
    size = self.loop.eval_batch_size
    if size is None and jax.process_count() > 1:
      raise ValueError("set eval_batch_size for validation on several processes (each needs the "
                       "same batch shape)")
    samples = MODEL_INPUT_LENGTH
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
    if data_position is None and hasattr(train_batches, "save") and hasattr(train_batches, "restore"):
      data_position = train_batches
    position = None if data_position is None else DataPosition(data_position)
    self._init_params, self._val_batches = init_params, val_batches
    outcome = self.engine.run(workdir, self, train_batches, position)
    return TrainResult(outcome.step, outcome.stop_reason, outcome.metrics, outcome.val_loss,
                       outcome.exported)

  def export(self, workdir: pathlib.Path, state: TrainState, manager: CheckpointManager,
             step: int) -> pathlib.Path | None:
    """Final params to `workdir/model`; the best by validation loss to `workdir/model_best`."""
    metadata = {"step": step, "source": "hubert-ecg-jax pretraining"}
    model_dir = export_model(workdir / "model", self.model_config, state.params, metadata)
    best = manager.best_step
    if best is not None:
      best_state = manager.restore(self._abstract_state(), step=best)
      export_model(workdir / "model_best", self.model_config, best_state.params,
                   dict(metadata, step=best))
    if model_dir is not None:  # as the user named the run directory, not the absolute path
      self.print(f"exported the final model to {workdir / 'model'}"
                 + (f" and the best (step {best}) to {workdir / 'model_best'}" if best else ""))
    return model_dir


def pretrain(config: ConfigDict, workdir: str | pathlib.Path) -> TrainResult:
  """Builds the model, data pipeline and `Pretrainer` from a pre-training ConfigDict and runs it,
  holding `workdir` (a second job on it is refused)."""
  with hold_run_directory(workdir):
    return _pretrain(config, workdir)


def _pretrain(config: ConfigDict, workdir: str | pathlib.Path) -> TrainResult:
  m, d, o, t = config.model, config.data, config.optimizer, config.train
  if not (d.train_dir and d.train_units):
    raise ValueError("set the training records and their units: --config.data.train_dir=RECORDS "
                     "(written by `preprocess`) --config.data.train_units=UNITS (written by `targets`)")
  if bool(d.val_dir) != bool(d.val_units):
    raise ValueError("validation needs both --config.data.val_dir=RECORDS and "
                     "--config.data.val_units=UNITS, found only one")
  for units_dir in filter(None, (d.train_units, d.val_units)):
    units_vocab = tuple(read_units_manifest(units_dir).vocab_sizes)
    if tuple(m.vocab_sizes) != units_vocab:
      raise ValueError(f"config.model.vocab_sizes is {tuple(m.vocab_sizes)} but the units in "
                       f"{units_dir} have K = {units_vocab}: set "
                       f"--config.model.vocab_sizes={','.join(map(str, units_vocab))} or use other units")
  model_config = HubertECGConfig.preset(
      m.size, m.downsampling, vocab_sizes=tuple(m.vocab_sizes), compute_dtype=m.compute_dtype,
      remat=m.remat,
      hidden_dropout=m.dropout, attention_dropout=m.dropout, activation_dropout=m.dropout,
      layerdrop=m.layerdrop, mask_time_prob=d.mask_prob, mask_time_length=d.mask_span,
      mask_time_min_masks=d.min_masks)
  processes = jax.process_count()
  if d.batch_size % processes:
    raise ValueError(f"data.batch_size {d.batch_size} does not split over {processes} processes")
  local_batch = d.batch_size // processes
  micro_batch_count(d.batch_size, jax.device_count(), t.per_device_batch)  # refuses up front
  optimizer_config = OptimizerConfig(total_steps=t.total_steps, **o)
  loop_config = LoopConfig(**t, eval_batch_size=local_batch)
  pipeline = PipelineConfig(batch_size=local_batch, seed=d.seed, train_crop="first", eval_crop="first",
                            mask_prob=d.mask_prob, mask_span=d.mask_span,
                            min_masks=d.min_masks, honour_padding=d.honour_padding,
                            shuffle_buffer=d.shuffle_buffer, skip_corrupted=d.skip_corrupted,
                            model_config=model_config)
  init_params = None
  if m.init_from:  # the next iteration: previous backbone and projection, new label embeddings
    _, previous = load_pretrained(m.init_from)
    init_params = next_iteration_params(previous, model_config, jax.random.PRNGKey(t.seed))
  trainer = Pretrainer(model_config, optimizer_config, loop_config)
  val_batches = ((lambda: make_eval_iterator(d.val_dir, pipeline, d.val_units)) if d.val_dir
                 else None)
  train_batches = make_train_iterator(d.train_dir, pipeline, d.train_units, log=trainer.print)
  return trainer.run(workdir, train_batches, val_batches, init_params=init_params)

"""Fine-tuning settings: the `ConfigDict` the config files start from, and its typed, checked form.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from hubert_ecg_jax.finetune.data import DataConfig
from hubert_ecg_jax.finetune.freezing import FreezeConfig
from hubert_ecg_jax.tasks import check_task
from hubert_ecg_jax.train.optimizer import OptimizerConfig

MODES = ("finetune", "linear_probe")
MODEL_INITS = ("pretrained", "scratch")
STOPPING_METRICS = ("auroc", "loss")


def default_config() -> ConfigDict:
  """Every fine-tuning setting with the original's values (see the module docstring)."""
  config = ConfigDict()
  config.mode = "finetune"  # "linear_probe": frozen backbone, embeddings once, logistic regression
  config.model = ConfigDict(dict(
      init="pretrained",  # "pretrained": weights from `pretrained`; "scratch": random init of `size`
      pretrained="",  # HF directory, original .pt, a model directory of ours, or a Hub id ORG/NAME[@REV]
      size="small",  # scratch: tiny, small, base, large
      compute_dtype="float32",  # "bfloat16": bf16 products, float32 params (faster)
      hidden_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,  # finetune.sh: 0
      attention_dropout=0.1,  # untouched by the original's dropout override
      layerdrop=0.0,  # finetune.sh: PTB-XL 0.0 (small), 0.1 (base, large)
      classifier_dropout=0.1,
      classifier_hidden_size=placeholder(int),  # None: a linear head (the paper); n: Linear -> tanh -> Linear
  ))
  config.task = ConfigDict(dict(
      kind="multi_label",  # multi_label (BCE), multi_class (CE), regression (MSE)
      columns=(),  # label columns to learn; (): every column of the training data
  ))
  config.data = ConfigDict(dict(
      source="records",  # records | split_csv | tfds (see hubert_ecg_jax/finetune/data.py)
      train="", val="", test="",
      records_dir="", label_start_index=3, fs=placeholder(float),
      tfds_name="", tfds_data_dir="", manual_dir="",
      workers=placeholder(int),  # split_csv: processes preparing records; None: all cores
      train_fraction=1.0,  # < 1: a seeded, label-stratified fraction of train (label-efficiency curves)
      fraction_seed=0,
      skip_corrupted=False,  # True: skip a damaged training shard's unreadable records (counted)
  ))
  config.train = ConfigDict(dict(
      batch_size=64, steps=70_000,
      learning_rate=1e-5, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01,
      decay_all_params=True,  # False: no decay on biases, norms, embeddings
      warmup_fraction=0.08, grad_clip_norm=placeholder(float),  # None: no clipping (the original)
      use_loss_weights=True,  # pos_weight / class weights from the training set
      random_crop=True,  # False: the first 5 s of each record
      freeze_feature_encoder=True,
      trainable_layers=placeholder(int),  # the last n blocks train; None: all
      original_freeze_quirk=False,  # True: pos_conv_embed and encoder.layer_norm stay frozen
      layer_lr_decay=1.0,  # < 1: block i trains at lr * decay ** (L - i)
      eval_every=500, patience=8,  # early stopping after `patience` validations without progress
      early_stopping_metric="auroc",  # macro AUROC (classification) or "loss"; regression: loss
      log_every=50, keep_checkpoints=2,
      max_nonfinite_streak=10,
      device_prefetch=2,  # batches placed on the devices ahead of the running step (0: none)
      shuffle_buffer=1024, seed=0,
      devices=placeholder(int),  # None: every local device
      progress=True,
  ))
  config.eval = ConfigDict(dict(
      crop="first",  # validation and test windows: first, tta (evenly spaced), random
      crops=1,  # windows per record for tta / random
      aggregation="max",  # over a record's windows: max (the original's test.sh) or mean
      batch_size=64,
      n_boot=1000,  # bootstrap resamples of the test report (0: no intervals)
  ))
  config.probe = ConfigDict(dict(
      c_values=(0.01, 0.1, 1.0, 10.0),  # inverse L2 strengths tried; the best on validation wins
      max_iter=2000,
  ))
  return config


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  init: str
  pretrained: str
  size: str
  compute_dtype: str
  dropouts: dict[str, float]
  classifier_dropout: float
  classifier_hidden_size: int | None


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """`config.train` less the optimizer and freezing entries (see `default_config`)."""
  batch_size: int
  steps: int
  use_loss_weights: bool
  random_crop: bool
  eval_every: int
  patience: int
  early_stopping_metric: str
  log_every: int
  keep_checkpoints: int
  max_nonfinite_streak: int
  device_prefetch: int
  shuffle_buffer: int
  seed: int
  devices: int | None
  progress: bool

  def __post_init__(self) -> None:
    _check_positive(self, "train", ("batch_size", "steps", "eval_every", "patience", "log_every",
                                    "keep_checkpoints", "max_nonfinite_streak", "shuffle_buffer"))
    if self.early_stopping_metric not in STOPPING_METRICS:
      raise ValueError(f"train.early_stopping_metric must be one of {STOPPING_METRICS}, found "
                       f"{self.early_stopping_metric!r}")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """`config.eval` (see `default_config`)."""
  crop: str
  crops: int
  aggregation: str
  batch_size: int
  n_boot: int

  def __post_init__(self) -> None:
    if self.aggregation not in ("mean", "max") or self.crop not in ("first", "tta", "random"):
      raise ValueError(f"eval.crop must be first, tta or random and eval.aggregation mean or max, "
                       f"found {self.crop!r} and {self.aggregation!r}")
    _check_positive(self, "eval", ("crops", "batch_size"))


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
  """A checked fine-tuning config."""
  mode: str
  model: ModelSettings
  task_kind: str
  task_columns: tuple[str, ...]
  data: DataConfig
  train: TrainSettings
  optimizer: OptimizerConfig
  freeze: FreezeConfig
  eval: EvalSettings
  probe_c_values: tuple[float, ...]
  probe_max_iter: int
  raw: dict[str, Any]  # the ConfigDict as plain data, saved with the model


def _check_positive(settings: Any, section: str, names: tuple[str, ...]) -> None:
  for name in names:
    if getattr(settings, name) < 1:
      raise ValueError(f"{section}.{name} must be at least 1, found {getattr(settings, name)}")


def _from_section(cls: type, section: ConfigDict, **changes: Any) -> Any:
  """The dataclass `cls` from the entries of `section` named as its fields (plus `changes`)."""
  names = {field.name for field in dataclasses.fields(cls)} - set(changes)
  return cls(**{name: section[name] for name in names}, **changes)


def settings_from_config(config: ConfigDict) -> FinetuneSettings:
  """Checks a fine-tuning ConfigDict and returns its typed form."""
  if config.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, found {config.mode!r}")
  m, t, e = config.model, config.train, config.eval
  if m.init not in MODEL_INITS:
    raise ValueError(f"model.init must be one of {MODEL_INITS}, found {m.init!r}")
  if m.init == "pretrained" and not m.pretrained:
    raise ValueError("set the pretrained weights: --config.model.pretrained=PATH (a Hugging Face "
                     "directory, an original .pt, a `convert` output or a Hub id such as "
                     "Edoardo-BS/hubert-ecg-base), or train from random "
                     "weights with --config.model.init=scratch")
  check_task(config.task.kind)
  if not config.probe.c_values or min(config.probe.c_values) <= 0:
    raise ValueError(f"probe.c_values must be positive, found {config.probe.c_values}")
  if config.probe.max_iter < 1:
    raise ValueError(f"probe.max_iter must be at least 1, found {config.probe.max_iter}")
  dropouts = {name: float(m[name]) for name in ("hidden_dropout", "activation_dropout",
                                                "feat_proj_dropout", "attention_dropout", "layerdrop")}
  model = ModelSettings(m.init, m.pretrained, m.size, m.compute_dtype, dropouts,
                        float(m.classifier_dropout), m.classifier_hidden_size)
  return FinetuneSettings(
      mode=config.mode, model=model, task_kind=config.task.kind,
      task_columns=tuple(c for c in config.task.columns if c),
      data=_from_section(DataConfig, config.data), train=_from_section(TrainSettings, t),
      optimizer=_from_section(OptimizerConfig, t, total_steps=t.steps),
      freeze=_from_section(FreezeConfig, t),
      eval=_from_section(EvalSettings, e, crops=1 if e.crop == "first" else e.crops),
      probe_c_values=tuple(float(c) for c in config.probe.c_values),
      probe_max_iter=config.probe.max_iter, raw=config.to_dict())


# finetune.sh's PTB-XL layerdrop per model size (patience 8 and validation every 500 steps for all).
PTBXL_LAYERDROP = {"small": 0.0, "base": 0.1, "large": 0.1}
PTBXL_LABELS = {"all": 71, "diag": 44, "subdiag": 23, "superdiag": 5, "form": 19, "rhythm": 12}


def ptbxl_config(task: str, size: str | None = None) -> ConfigDict:
  """The original's PTB-XL recipe for one of the six label tasks and a model size (default small).

  Data: the TFDS PTB-XL builder (`hubert_ecg_jax.data.tfds_ptbxl`, folds 1-8 train, 9 validation,
  10 test) reading the PTB-XL folder given as `data.manual_dir`; the weights: `model.pretrained`.
  The size (small, base, large) sets finetune.sh's layerdrop: 0.0 small, 0.1 base and large.
  Recipe (finetune.sh): AdamW lr 1e-5, betas (0.9, 0.98), eps 1e-9, weight decay 0.01, 8% warmup
  then linear decay, batch 64, 70k steps, validation every 500 steps, early stopping after 8
  validations without a better macro AUROC, BCE with pos_weight from the training set, random
  aligned 5-s crops, CNN frozen, every transformer block trainable, dropout 0 except attention 0.1
  and classifier 0.1. The original's split CSVs work too: --config.data.source=split_csv
  --config.data.train=TRAIN.csv --config.data.val=VAL.csv --config.data.test=TEST.csv
  --config.data.records_dir=NPY_FOLDER --config.data.label_start_index=4. Random init (the
  paper's baseline): --config.model.init=scratch.
  """
  size = size or "small"
  if task not in PTBXL_LABELS:
    raise ValueError(f"unknown PTB-XL task {task!r}: expected one of {sorted(PTBXL_LABELS)}")
  if size not in PTBXL_LAYERDROP:
    raise ValueError(f"the config argument is the model size, one of {sorted(PTBXL_LAYERDROP)}: "
                     f"found {size!r}")
  config = default_config()
  config.model.size = size
  config.model.layerdrop = PTBXL_LAYERDROP[size]
  config.data.source = "tfds"
  config.data.tfds_name = f"ptb_xl/{task}"
  config.data.train, config.data.val, config.data.test = "train", "validation", "test"
  return config

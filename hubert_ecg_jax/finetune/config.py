"""Fine-tuning settings: the `ConfigDict` the config files start from, and its typed, checked form.

Config files (`configs/finetune_*.py`) call `default_config()` and change what their recipe needs;
`--config.KEY=VALUE` overrides any entry. Defaults are the original's fine-tuning recipe (reference §3,
finetune.sh): AdamW lr 1e-5, betas (0.9, 0.98), eps 1e-9, weight decay 0.01 on every parameter, 8%
linear warmup then linear decay, batch 64, 70k steps, validation every 500 steps with patience 8,
loss weights on, random aligned 5-s crops, CNN frozen, every block trainable, dropout 0 except
attention 0.1 and classifier 0.1.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict

from hubert_ecg_jax.finetune.data import DataConfig
from hubert_ecg_jax.finetune.freezing import FreezeConfig
from hubert_ecg_jax.finetune.losses import check_task
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
      classifier_hidden_size=0,  # 0: a linear head (the paper); n: Linear -> tanh -> Linear
  ))
  config.task = ConfigDict(dict(
      kind="multi_label",  # multi_label (BCE), multi_class (CE), regression (MSE)
      columns=(),  # label columns to learn; (): every column of the training data
  ))
  config.data = ConfigDict(dict(
      source="records",  # records | split_csv | tfds (see hubert_ecg_jax/finetune/data.py)
      train="", val="", test="",
      records_dir="", label_start_index=3, fs=0.0,
      tfds_name="", tfds_data_dir="", manual_dir="",
      workers=0,
      train_fraction=1.0,  # < 1: a seeded, label-stratified fraction of train (label-efficiency curves)
      fraction_seed=0,
  ))
  config.train = ConfigDict(dict(
      batch_size=64, steps=70_000,
      learning_rate=1e-5, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01,
      decay_all_params=True,  # False: no decay on biases, norms, embeddings
      warmup_fraction=0.08, grad_clip_norm=0.0,  # 0: no clipping (the original)
      use_loss_weights=True,  # pos_weight / class weights from the training set
      random_crop=True,  # False: the first 5 s of each record
      freeze_feature_encoder=True,
      trainable_layers=-1,  # the last n blocks train; -1: all
      original_freeze_quirk=False,  # True: pos_conv_embed and encoder.layer_norm stay frozen
      layer_lr_decay=1.0,  # < 1: block i trains at lr * decay ** (L - i)
      eval_every=500, patience=8,  # early stopping after `patience` validations without progress
      early_stopping_metric="auroc",  # macro AUROC (classification) or "loss"; regression: loss
      log_every=50, keep_checkpoints=2,
      max_nonfinite_streak=10,
      shuffle_buffer=1024, seed=0,
      devices=0,  # 0: every local device
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
  shuffle_buffer: int
  seed: int
  devices: int
  progress: bool


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  crop: str
  crops: int
  aggregation: str
  batch_size: int
  n_boot: int


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


def _positive(name: str, value: int) -> int:
  if value < 1:
    raise ValueError(f"{name} must be at least 1, found {value}")
  return value


def settings_from_config(config: ConfigDict) -> FinetuneSettings:
  """Checks a fine-tuning ConfigDict and returns its typed form."""
  if config.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, found {config.mode!r}")
  m, t, e, d = config.model, config.train, config.eval, config.data
  if m.init not in MODEL_INITS:
    raise ValueError(f"model.init must be one of {MODEL_INITS}, found {m.init!r}")
  if m.init == "pretrained" and not m.pretrained:
    raise ValueError("set the pretrained weights: --config.model.pretrained=PATH (a Hugging Face "
                     "directory, an original .pt, a `convert` output or a Hub id such as "
                     "Edoardo-BS/hubert-ecg-base), or train from random "
                     "weights with --config.model.init=scratch")
  check_task(config.task.kind)
  if t.early_stopping_metric not in STOPPING_METRICS:
    raise ValueError(f"train.early_stopping_metric must be one of {STOPPING_METRICS}, found "
                     f"{t.early_stopping_metric!r}")
  if e.aggregation not in ("mean", "max") or e.crop not in ("first", "tta", "random"):
    raise ValueError(f"eval.crop must be first, tta or random and eval.aggregation mean or max, "
                     f"found {e.crop!r} and {e.aggregation!r}")
  if not config.probe.c_values or min(config.probe.c_values) <= 0:
    raise ValueError(f"probe.c_values must be positive, found {config.probe.c_values}")
  dropouts = {name: float(m[name]) for name in ("hidden_dropout", "activation_dropout",
                                                "feat_proj_dropout", "attention_dropout", "layerdrop")}
  model = ModelSettings(m.init, m.pretrained, m.size, m.compute_dtype, dropouts,
                        float(m.classifier_dropout), m.classifier_hidden_size or None)
  train = TrainSettings(
      batch_size=_positive("train.batch_size", t.batch_size), steps=_positive("train.steps", t.steps),
      use_loss_weights=t.use_loss_weights, random_crop=t.random_crop,
      eval_every=_positive("train.eval_every", t.eval_every), patience=_positive("train.patience", t.patience),
      early_stopping_metric=t.early_stopping_metric, log_every=_positive("train.log_every", t.log_every),
      keep_checkpoints=_positive("train.keep_checkpoints", t.keep_checkpoints),
      max_nonfinite_streak=_positive("train.max_nonfinite_streak", t.max_nonfinite_streak),
      shuffle_buffer=_positive("train.shuffle_buffer", t.shuffle_buffer), seed=t.seed,
      devices=t.devices, progress=t.progress)
  optimizer = OptimizerConfig(
      total_steps=t.steps, learning_rate=t.learning_rate, b1=t.b1, b2=t.b2, eps=t.eps,
      weight_decay=t.weight_decay, decay_all_params=t.decay_all_params,
      warmup_fraction=t.warmup_fraction, grad_clip_norm=t.grad_clip_norm or None)
  freeze = FreezeConfig(freeze_feature_encoder=t.freeze_feature_encoder,
                        trainable_layers=None if t.trainable_layers < 0 else t.trainable_layers,
                        original_freeze_quirk=t.original_freeze_quirk, layer_lr_decay=t.layer_lr_decay)
  data = DataConfig(source=d.source, train=d.train, val=d.val, test=d.test, records_dir=d.records_dir,
                    label_start_index=d.label_start_index, fs=d.fs or None, tfds_name=d.tfds_name,
                    tfds_data_dir=d.tfds_data_dir, manual_dir=d.manual_dir, workers=d.workers,
                    train_fraction=float(d.train_fraction), fraction_seed=int(d.fraction_seed))
  evaluation = EvalSettings(e.crop, 1 if e.crop == "first" else _positive("eval.crops", e.crops),
                            e.aggregation, _positive("eval.batch_size", e.batch_size), e.n_boot)
  return FinetuneSettings(
      mode=config.mode, model=model, task_kind=config.task.kind,
      task_columns=tuple(c for c in config.task.columns if c), data=data, train=train,
      optimizer=optimizer, freeze=freeze, eval=evaluation,
      probe_c_values=tuple(float(c) for c in config.probe.c_values),
      probe_max_iter=_positive("probe.max_iter", config.probe.max_iter), raw=config.to_dict())


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

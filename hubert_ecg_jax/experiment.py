"""Experiment configs: Python files exposing `get_config()`, with `--config.key=value` overrides.

As in big_vision: a config file (e.g. `configs/pretrain_base.py`) builds an
`ml_collections.ConfigDict`; `file.py:arg` passes `arg` to `get_config(arg)`. Overrides are
`key.sub=value` strings, parsed by the type of the value they replace (bool, int, float, str,
tuple, or the declared type of a `placeholder`); an unknown key or a value of the wrong type is a
`ValueError` that says what was expected.
"""
from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import inspect
import pathlib
from typing import Any, Sequence

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

# Bare config names (`pretrain_base`) are the files of the repository's configs/ folder, which the
# package ships as `hubert_ecg_jax.configs` (pyproject maps the folder), so a wheel install has them.
NAMED_CONFIGS = "hubert_ecg_jax.configs"
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def named_configs() -> dict[str, pathlib.Path]:
  """The shipped config files by name (`pretrain_base` -> its path)."""
  folder = importlib.resources.files(NAMED_CONFIGS)
  return {entry.name[:-3]: pathlib.Path(str(entry)) for entry in folder.iterdir()
          if entry.name.endswith(".py") and not entry.name.startswith("_")}


def resolve_config_path(name: str) -> pathlib.Path:
  """A config file path, or the name of a shipped config (`pretrain_base`, `finetune_demo`)."""
  path = pathlib.Path(name)
  if path.is_file():
    return path
  shipped = named_configs()
  if name.removesuffix(".py") in shipped:
    return shipped[name.removesuffix(".py")]
  raise FileNotFoundError(f"no config file {name!r}: give a path to a .py file with get_config() "
                          f"or one of {sorted(shipped)}")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Runs `get_config()` of the file named by `spec` (`path.py` or `path.py:arg`), then overrides."""
  name, _, argument = spec.partition(":")
  path = resolve_config_path(name)
  module_spec = importlib.util.spec_from_file_location(f"hubert_ecg_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"{path} must define get_config() returning an ml_collections.ConfigDict")
  takes_argument = bool(inspect.signature(get_config).parameters)
  if argument and not takes_argument:
    raise ValueError(f"{path}: get_config() takes no argument, but {spec!r} passes {argument!r}")
  config = get_config(argument or None) if takes_argument else get_config()
  if not isinstance(config, ConfigDict):
    raise ValueError(f"{path}: get_config() must return a ConfigDict, found {type(config).__name__}")
  return apply_overrides(config, overrides)


def _parse_bool(text: str, key: str) -> bool:
  if text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise ValueError(f"--config.{key} expects a bool (true/false), found {text!r}")


def _parse_tuple(text: str, key: str, current: tuple) -> tuple:
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = tuple(part.strip() for part in text.split(","))
  value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  element_types = {type(v) for v in current}
  if len(element_types) == 1:
    element_type = element_types.pop()
    if element_type is float:
      value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
    if not all(type(v) is element_type for v in value):
      raise ValueError(f"--config.{key} expects a tuple of {element_type.__name__}, found {text!r}")
  return value


def parse_value(text: str, current: Any, key: str, declared: type | None = None) -> Any:
  """`text` as the type of `current` (or `declared`, for a None placeholder)."""
  kind = type(current) if current is not None else declared
  if current is None and text.lower() == "none":
    return None
  try:
    if kind is bool:
      return _parse_bool(text, key)
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str:
      return text
    if kind is tuple:
      return _parse_tuple(text, key, current or ())
  except ValueError as error:
    if str(error).startswith("--config."):
      raise
    raise ValueError(f"--config.{key} expects {kind.__name__}, found {text!r}") from None
  raise ValueError(f"--config.{key} holds a {kind.__name__ if kind else 'None without a type'}, "
                   "which cannot be set from the command line")


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Sets each `key.sub=value` in `config` (a copy), type-checked against what it replaces."""
  config = ConfigDict(config.to_dict(preserve_field_references=True))
  for override in overrides:
    key, sep, text = override.partition("=")
    key = key.removeprefix("--config.").removeprefix("config.")
    if not sep or not key:
      raise ValueError(f"a config override must look like key.sub=value, found {override!r}")
    *parents, leaf = key.split(".")
    section = config
    for depth, part in enumerate(parents):
      if part not in section or not isinstance(section[part], ConfigDict):
        where = ".".join(parents[:depth]) or "the config"
        raise ValueError(f"unknown config section {'.'.join(parents[:depth + 1])!r}: {where} has "
                         f"{sorted(section.keys())}")
      section = section[part]
    if leaf not in section:
      where = ".".join(parents) or "the config"
      raise ValueError(f"unknown config key {key!r}: {where} has {sorted(section.keys())}")
    current = section[leaf]
    if isinstance(current, ConfigDict):
      raise ValueError(f"{key!r} is a section, not a value: set one of {sorted(current.keys())}")
    section[leaf] = parse_value(text, current, key, section.get_type(leaf))
  return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.key=value` / `--config.key value` overrides from the other arguments."""
  overrides, rest = [], []
  index = 0
  while index < len(argv):
    arg = argv[index]
    if arg.startswith("--config."):
      if "=" in arg:
        overrides.append(arg)
      elif index + 1 < len(argv):
        overrides.append(f"{arg}={argv[index + 1]}")
        index += 1
      else:
        raise ValueError(f"{arg} needs a value: {arg}=VALUE")
    else:
      rest.append(arg)
    index += 1
  return overrides, rest


# The original's recipe per model size (reference §2): iteration 1 learns K=100 hand-made-feature
# units for 80k steps; later iterations learn units of the previous model's hidden states.
# (K, steps, layerdrop) of iterations >= 2; tiny is ours, for demos and tests.
_LATER_ITERATIONS = {"tiny": (100, 80_000, 0.0), "small": (500, 400_000, 0.1),
                     "base": (500, 800_000, 0.1), "large": (1000, 400_000, 0.0)}


def pretraining_config(size: str, iteration: int | str | None = None) -> ConfigDict:
  """The original's pre-training settings for `size` at `iteration` (1, the default, 2, ...)."""
  if size not in _LATER_ITERATIONS:
    raise ValueError(f"unknown model size {size!r}: expected one of {sorted(_LATER_ITERATIONS)}")
  try:
    iteration = int(iteration or 1)
  except ValueError:
    raise ValueError(f"the config argument is the iteration, 1 or more: found {iteration!r}") from None
  if iteration < 1:
    raise ValueError(f"the config argument is the iteration, 1 or more: found {iteration}")
  vocab, steps, layerdrop = _LATER_ITERATIONS[size]
  if iteration == 1:
    vocab, steps = 100, 80_000
  config = ConfigDict()
  config.model = ConfigDict(dict(
      size=size,  # HubertECGConfig preset: tiny, small, base, large
      downsampling="x5",  # conv feature encoder: x5 (released, 93 frames), x10, wav2vec2
      compute_dtype="float32",  # "bfloat16": bf16 matrix products, float32 params and sums
      remat=False,  # recompute each layer's activations in the backward pass (less device memory)
      vocab_sizes=(vocab,),  # K per codebook: must match the records' k-means targets
      dropout=0.1,  # hidden, attention and activation dropout
      layerdrop=layerdrop,
      init_from="",  # iteration >= 2: the previous iteration's model directory
  ))
  config.data = ConfigDict(dict(
      train_dir="",  # records (`hubert-ecg-jax preprocess` output)
      train_units="",  # their k-means units (`hubert-ecg-jax targets` output)
      val_dir="",  # records for validation ("" = no validation)
      val_units="",  # their units (with the same k-means models)
      batch_size=448,  # global batch, split over processes and devices
      mask_prob=0.33, mask_span=1, min_masks=2,
      honour_padding=True,  # False: mask padding frames too, as the original
      shuffle_buffer=1024,
      seed=0,
      skip_corrupted=False,  # True: skip a damaged shard's unreadable records (counted), not stop
  ))
  config.optimizer = ConfigDict(dict(
      learning_rate=5e-5, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01,
      decay_all_params=True,  # as the original; False spares biases, norms and embeddings
      warmup_fraction=0.08,
      grad_clip_norm=placeholder(float),  # None: no clipping (the original); fairseq's HuBERT uses 10
  ))
  config.train = ConfigDict(dict(
      total_steps=steps,
      alpha=1.0,  # masked-frame weight of the loss (1: masked frames only, as the original)
      # Examples a device runs at once: None, its whole share of batch_size; smaller, the share
      # is run in share / per_device_batch micro-batches with one update (gradient accumulation).
      per_device_batch=placeholder(int),
      device_prefetch=2,  # batches placed on the devices ahead of the running step (0: none)
      launcher="mesh",  # "mesh" (jit + shard_map) or "pmap"
      seed=42,
      log_every=100,
      val_every=4000,
      checkpoint_every=2000,
      keep_last=3,
      keep_best=1,
      max_nonfinite_streak=10,
      progress=True,
  ))
  return config

"""A finished model on disk: `config.json` + Orbax params (+ `metadata.json`), written atomically.

This is the format `hubert-ecg-jax convert` writes and every command reads; training checkpoints
(params + optimizer + data position) live in `hubert_ecg_jax.train.checkpointing`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.files import AnyPath, as_path, orbax_input, orbax_output, orbax_path

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"


def is_model_dir(path: str | os.PathLike | AnyPath) -> bool:
  path = as_path(path)
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_model(directory: str | os.PathLike | AnyPath, config: HubertECGConfig, params: Any,
               metadata: dict[str, Any] | None = None, overwrite: bool = False) -> AnyPath:
  """Writes the model to `directory` atomically: a crash leaves either nothing or a complete model.
  At a URL Orbax cannot write (not gs://) the model is written locally and copied there, config.json
  last: a copy cut short has none, and readers refuse it."""
  directory = as_path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists: choose another output or pass overwrite")
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory} is a file: expected a model directory to replace")
  with orbax_output(directory) as staging:
    host_params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32), params)
    ocp.save(orbax_path(staging / PARAMS_DIR), host_params)
    write_config_and_metadata(staging, config, metadata)
  return directory


def write_config_and_metadata(directory: AnyPath, config: HubertECGConfig,
                              metadata: dict[str, Any] | None) -> None:
  """The two files of a model directory beside its params: `config.json`, `metadata.json`."""
  config.save_json(directory / CONFIG_FILE)
  (directory / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, default=str) + "\n")


def load_model(directory: str | os.PathLike | AnyPath
               ) -> tuple[HubertECGConfig, dict, dict[str, Any]]:
  """Reads a model written by `save_model`: (config, params as numpy arrays, metadata)."""
  directory = as_path(directory)
  if not is_model_dir(directory):
    raise FileNotFoundError(f"{directory} is not a hubert-ecg-jax model directory: expected "
                            f"{CONFIG_FILE} and a {PARAMS_DIR}/ folder in it")
  config = HubertECGConfig.from_json(directory / CONFIG_FILE)
  with orbax_input(directory / PARAMS_DIR) as params_path:  # a local copy where Orbax cannot read
    params = jax.tree_util.tree_map(np.asarray, ocp.load(params_path))
  metadata_path = directory / METADATA_FILE
  metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
  return config, params, metadata

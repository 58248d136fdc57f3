"""Released HuBERT-ECG weights in, ours out: `load_pretrained` and `export_hf_directory`.

More in docs/modules.md."""
from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax import model_dir
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.convert import check_params, flax_to_state_dict, state_dict_to_flax
from hubert_ecg_jax.files import AnyPath, UrlPath, as_path, atomic_path, make_parent_folder
from hubert_ecg_jax.hub import resolve_model
from hubert_ecg_jax.model import HubertECG

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Names under which the original's config class may have been pickled (module path varies with
# the directory the training script ran from).
_CONFIG_CLASS_NAMES = ("HuBERTECGConfig", "HubertECGConfig", "HubertConfig")


def expected_params(config: HubertECGConfig, pretraining_heads: bool = True) -> dict:
  """Shapes of a HubertECG's params for `config` (no computation)."""
  model = HubertECG(config, pretraining_heads=pretraining_heads)
  x = jnp.zeros((1, max(config.min_input_length, 400)), jnp.float32)
  return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x))["params"]


def read_state_dict(path: str | os.PathLike | AnyPath) -> dict[str, np.ndarray]:
  """A `.safetensors` or `.bin` file -> {key: float32 array}."""
  path = as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file {path} does not exist")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load, load_file
    try:
      return load(path.read_bytes()) if isinstance(path, UrlPath) else load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
      raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
  state = _torch_load(path)
  if isinstance(state, dict) and "model_state_dict" in state:
    state = state["model_state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
  return state


def read_hf_directory(directory: str | os.PathLike | AnyPath
                      ) -> tuple[HubertECGConfig, dict[str, Any]]:
  directory = as_path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{directory} has no config.json: expected a Hugging Face model directory")
  for name in WEIGHT_FILES:
    if (directory / name).is_file():
      return HubertECGConfig.from_json(config_path), read_state_dict(directory / name)
  raise FileNotFoundError(f"{directory} has neither {' nor '.join(WEIGHT_FILES)}")


def read_pt_checkpoint(path: str | os.PathLike | AnyPath
                       ) -> tuple[HubertECGConfig, dict[str, Any], dict]:
  """The original's training checkpoint -> (config, state dict, other entries without tensors)."""
  checkpoint_dict = _torch_load(as_path(path))
  if not isinstance(checkpoint_dict, dict) or "model_state_dict" not in checkpoint_dict:
    raise ValueError(f"{path} is not a HuBERT-ECG training checkpoint: expected a dict with "
                     "'model_state_dict' and 'model_config'")
  config_object = checkpoint_dict.get("model_config")
  if config_object is None:
    raise ValueError(f"{path} has no 'model_config' entry: cannot tell the model's size")
  config_fields = config_object if isinstance(config_object, dict) else vars(config_object)
  config = HubertECGConfig.from_hf_dict(dict(config_fields, model_type="hubert_ecg"))
  info = {k: v for k, v in checkpoint_dict.items()
          if k in ("global_step", "best_val_loss", "best_val_accuracy", "pretraining_vocab_sizes",
                   "finetuning_vocab_size", "use_label_embedding", "linear")}
  return config, checkpoint_dict["model_state_dict"], info


def _torch_load(path: AnyPath) -> Any:
  """torch.load with the weights-only unpickler; only the config class is allowed in, as a stand-in."""
  import torch
  import torch.serialization as serialization

  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  # torch reads local files by name; a URL's bytes are read once and served from memory
  source = io.BytesIO(path.read_bytes()) if isinstance(path, UrlPath) else str(path)
  try:
    unsafe = serialization.get_unsafe_globals_in_checkpoint(source)
  except Exception as error:
    raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from None
  refused = sorted(name for name in unsafe if name.rsplit(".", 1)[-1] not in _CONFIG_CLASS_NAMES)
  if refused:
    raise ValueError(f"{path} contains pickled objects other than the model config, refused for "
                     f"safety: {refused}")
  stand_ins = [_config_stand_in(name) for name in unsafe]
  try:
    with serialization.safe_globals(stand_ins):
      if isinstance(source, io.BytesIO):
        source.seek(0)
      return torch.load(source, map_location="cpu", weights_only=True)
  except Exception as error:
    raise ValueError(f"{path} could not be read as a HuBERT-ECG checkpoint: {error}") from None


def _config_stand_in(qualified_name: str) -> type:
  """An inert class that unpickles a config object into a plain attribute bag."""
  module, _, name = qualified_name.rpartition(".")
  return type(name, (), {"__module__": module, "__qualname__": name})


def params_from_state_dict(config: HubertECGConfig, state_dict: dict[str, Any],
                           source: str = "checkpoint") -> tuple[dict, dict]:
  """Converts and validates: (HubertECG params, classifier-head params or {})."""
  backbone, classifier = state_dict_to_flax(state_dict)
  check_params(backbone, expected_params(config, pretraining_heads=_has_pretraining_heads(backbone)),
               f"the weights in {source}")
  return backbone, classifier


def _has_pretraining_heads(params: dict) -> bool:
  return any(k.startswith(("final_proj_", "label_embedding_")) for k in params)


def load_pretrained(path: str | os.PathLike | AnyPath, compute_dtype: str | None = None,
                    revision: str | None = None) -> tuple[HubertECGConfig, dict]:
  """(config, params) for `HubertECG(config)` from a HF directory, an original `.pt`, our model dir,
  or a Hugging Face Hub id (at `revision`: a branch, tag or commit; default main)."""
  config, params, _ = load_pretrained_with_heads(path, revision)
  if compute_dtype is not None:
    config = config.replace(compute_dtype=compute_dtype)
  return config, params


def load_pretrained_with_heads(path: str | os.PathLike | AnyPath, revision: str | None = None
                               ) -> tuple[HubertECGConfig, dict, dict]:
  """Like `load_pretrained`, plus the classifier-head params of a fine-tuned checkpoint ({} if none)."""
  path = resolve_model(path, revision)
  if path.is_dir() and model_dir.is_model_dir(path):
    config, params, _ = model_dir.load_model(path)
    heads = {}
    if "hubert_ecg" in params:  # a fine-tuned classifier saved by us
      heads = {k: v for k, v in params.items() if k != "hubert_ecg"}
      params = params["hubert_ecg"]
    check_params(params, expected_params(config, pretraining_heads=_has_pretraining_heads(params)),
                 f"the params in {path}")
    return config, params, heads
  if path.is_dir():
    config, state_dict = read_hf_directory(path)
  elif path.suffix in (".pt", ".pth", ".ckpt"):
    config, state_dict, _ = read_pt_checkpoint(path)
  else:
    raise ValueError(f"cannot tell what {path} is: expected a Hugging Face directory (config.json + "
                     "model.safetensors or pytorch_model.bin), an original .pt checkpoint, or a "
                     "model directory written by `hubert-ecg-jax convert`")
  params, heads = params_from_state_dict(config, state_dict, str(path))
  return config, params, heads


def export_hf_directory(config: HubertECGConfig, params: dict, directory: str | os.PathLike | AnyPath,
                        weight_norm: str = "parametrizations", overwrite: bool = False) -> AnyPath:
  """Writes `config.json` + `model.safetensors` that `transformers.HubertModel.from_pretrained` loads.

  Pretraining heads (and a classifier head) are saved under the original's key names.
  """
  from safetensors.numpy import save

  directory = as_path(directory)
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory} is a file: expected a folder (new or empty) for the model")
  if directory.exists() and any(directory.iterdir()) and not overwrite:
    raise FileExistsError(f"{directory} exists and is not empty: choose another output or overwrite")
  state_dict = flax_to_state_dict(params, weight_norm=weight_norm)
  make_parent_folder(directory)
  directory.mkdir(exist_ok=True)
  hf_config = config.to_hf_dict()
  hf_config.setdefault("architectures", ["HuBERTECG"])
  # The released `auto_map` points at the original's remote code, which is not shipped here.
  hf_config.pop("auto_map", None)
  # Both files are staged and committed only when both are complete, the weights first and
  # config.json (what readers look for) last: an interrupted export (a full disk, a kill) leaves no
  # half-written file and an earlier export intact.
  with atomic_path(directory / "config.json") as config_file, \
       atomic_path(directory / "model.safetensors") as weights_file:
    weights_file.write_bytes(save(state_dict, metadata={"format": "pt"}))
    config_file.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return directory

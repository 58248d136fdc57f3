"""PyTorch state dicts of HuBERT-ECG <-> Flax params, by an explicit key table.

More in docs/modules.md."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

FlaxPath = tuple[str, ...]
WEIGHT_NORM_SPELLINGS = {"weight_g": "parametrizations.weight.original0",
                         "weight_v": "parametrizations.weight.original1"}
BACKBONE_PREFIX = "hubert_ecg."

# (PyTorch key regex, Flax path template). Indices captured as {0}, {1}.
_RULES: tuple[tuple[str, str], ...] = (
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", "feature_extractor/conv_layers_{0}/{w}"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)",
     "feature_extractor/conv_layers_{0}/layer_norm/{w}"),
    (r"feature_projection\.layer_norm\.(weight|bias)", "feature_projection_norm/{w}"),
    (r"feature_projection\.projection\.(weight|bias)", "feature_projection/{w}"),
    (r"masked_spec_embed", "masked_spec_embed"),
    (r"encoder\.pos_conv_embed\.conv\.(weight_g|weight_v|bias)", "encoder/pos_conv_embed/{0}"),
    (r"encoder\.layer_norm\.(weight|bias)", "encoder/layer_norm/{w}"),
    (r"encoder\.layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
     "encoder/layers_{0}/attention/{1}/{w}"),
    (r"encoder\.layers\.(\d+)\.(layer_norm|final_layer_norm)\.(weight|bias)", "encoder/layers_{0}/{1}/{w}"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.(intermediate_dense|output_dense)\.(weight|bias)",
     "encoder/layers_{0}/feed_forward/{1}/{w}"),
    (r"final_proj\.(\d+)\.(weight|bias)", "final_proj_{0}/{w}"),
    (r"label_embedding\.(\d+)\.weight", "label_embedding_{0}/embedding"),
)
_CLASSIFIER_RULES: tuple[tuple[str, str], ...] = (
    (r"classifier\.(weight|bias)", "classifier/{w}"),
    (r"classifier\.0\.(weight|bias)", "classifier_hidden/{w}"),
    (r"classifier\.2\.(weight|bias)", "classifier/{w}"),
)


def _flax_leaf_name(pt_leaf: str, flax_parent: str) -> str:
  if pt_leaf == "bias":
    return "bias"
  return "scale" if "norm" in flax_parent.rsplit("/", 1)[-1] else "kernel"


def _apply_rules(key: str, rules) -> FlaxPath | None:
  for pattern, template in rules:
    match = re.fullmatch(pattern, key)
    if match:
      groups = match.groups()
      pt_leaf = groups[-1] if groups else ""
      parent = template.rsplit("/", 1)[0].format(*groups)
      path = template.format(*groups, w=_flax_leaf_name(pt_leaf, parent))
      return tuple(path.split("/"))
  return None


def normalise_pt_key(key: str) -> str:
  """Weight norm spelled either way -> `weight_g`/`weight_v`."""
  for short, long in WEIGHT_NORM_SPELLINGS.items():
    key = key.replace(long, short)
  return key


def _to_flax_layout(path: FlaxPath, value: np.ndarray) -> np.ndarray:
  """Kernels change layout; both transposes are their own inverse (also used for export)."""
  if path[-1] == "kernel":
    return value.T if value.ndim == 2 else value.transpose(2, 1, 0)
  return value


def state_dict_to_flax(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
  """Splits a PyTorch state dict into (backbone + pretraining-head params, classifier params).

  Raises ValueError listing every key that is not part of HuBERT-ECG.
  """
  backbone: dict = {}
  classifier: dict = {}
  unknown = []
  for raw_key, tensor in state_dict.items():
    key = normalise_pt_key(raw_key)
    if key.startswith(BACKBONE_PREFIX):
      key = key[len(BACKBONE_PREFIX):]
    value = _as_numpy(tensor)
    path = _apply_rules(key, _RULES)
    target = backbone
    if path is None:
      path = _apply_rules(key, _CLASSIFIER_RULES)
      target = classifier
    if path is None:
      unknown.append(raw_key)
      continue
    _set(target, path, _to_flax_layout(path, value))
  if unknown:
    raise ValueError(f"{len(unknown)} key(s) of the checkpoint are not HuBERT-ECG parameters "
                     f"(is it another model?): {sorted(unknown)[:20]}")
  return backbone, classifier


def flax_to_state_dict(params: Mapping[str, Any], weight_norm: str = "parametrizations",
                       backbone_prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params -> PyTorch state dict (float32 numpy arrays).

  `params` is a HubertECG tree, or a classifier's {"hubert_ecg": ..., "classifier": ...} tree; its
  backbone keys get `backbone_prefix` (the original's fine-tuned checkpoints use `hubert_ecg.`; the
  default, none, is what `transformers.HubertModel` loads).
  """
  if weight_norm not in ("parametrizations", "weight_g"):
    raise ValueError(f"weight_norm must be 'parametrizations' or 'weight_g', found {weight_norm!r}")
  mlp_head = "classifier_hidden" in params
  out = {}
  for path, value in _flatten(params).items():
    if path[0] == "hubert_ecg":
      check = _pt_key(path[1:])
      key, rules = backbone_prefix + check, _RULES
    else:
      key = check = _pt_key(path, mlp_head)
      rules = _RULES + _CLASSIFIER_RULES
    expected = path[1:] if path[0] == "hubert_ecg" else path
    if _apply_rules(check, rules) != expected:
      raise ValueError(f"parameter {'/'.join(path)!r} has no PyTorch counterpart")
    if weight_norm == "parametrizations":
      for short, long in WEIGHT_NORM_SPELLINGS.items():
        key = key.replace(f"conv.{short}", f"conv.{long}")
    out[key] = np.ascontiguousarray(_to_flax_layout(path, np.asarray(value, np.float32)))
  return out


# Flax path (joined by ".") -> PyTorch key: the forward rules read backwards; checked by
# re-applying the forward rules in `flax_to_state_dict`.
_INVERSE_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    (r"conv_layers_(\d+)\.(kernel|bias)$", r"conv_layers.\1.conv.\2"),
    (r"conv_layers_(\d+)\.layer_norm", r"conv_layers.\1.layer_norm"),
    (r"^feature_projection_norm\.", "feature_projection.layer_norm."),
    (r"^feature_projection\.(kernel|bias)$", r"feature_projection.projection.\1"),
    (r"pos_conv_embed\.", "pos_conv_embed.conv."),
    (r"layers_(\d+)\.", r"layers.\1."),
    (r"^final_proj_(\d+)\.", r"final_proj.\1."),
    (r"^label_embedding_(\d+)\.embedding$", r"label_embedding.\1.weight"),
    (r"\.(kernel|scale)$", ".weight"),
)


def _pt_key(path: FlaxPath, mlp_head: bool = False) -> str:
  key = ".".join(path)
  if path[0] == "classifier_hidden":
    key = key.replace("classifier_hidden.", "classifier.0.")
  elif path[0] == "classifier" and mlp_head:
    key = key.replace("classifier.", "classifier.2.")
  for pattern, replacement in _INVERSE_SUBSTITUTIONS:
    key = re.sub(pattern, replacement, key)
  return key


def check_params(params: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
  """Raises ValueError naming missing keys, unexpected keys, and shape mismatches."""
  found, wanted = _flatten(params), _flatten(expected)
  problems = []
  missing = sorted("/".join(p) for p in set(wanted) - set(found))
  extra = sorted("/".join(p) for p in set(found) - set(wanted))
  if missing:
    problems.append(f"missing {len(missing)} parameter(s): {missing[:12]}")
  if extra:
    problems.append(f"unexpected {len(extra)} parameter(s): {extra[:12]}")
  for path in sorted(set(found) & set(wanted)):
    if tuple(np.shape(found[path])) != tuple(wanted[path].shape):
      problems.append(f"shape mismatch at {'/'.join(path)}: the config expects "
                      f"{tuple(wanted[path].shape)}, the weights have {tuple(np.shape(found[path]))}")
  if problems:
    raise ValueError(f"{what} do not match the config: " + "; ".join(problems[:20]))


def _as_numpy(tensor: Any) -> np.ndarray:
  if hasattr(tensor, "detach"):  # a torch tensor: go through float32 (numpy has no bfloat16)
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
      tensor = tensor.float()
    return tensor.numpy()
  return np.asarray(tensor)


def _set(tree: dict, path: FlaxPath, value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _flatten(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out

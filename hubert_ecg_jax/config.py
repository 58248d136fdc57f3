"""`HubertECGConfig`: the model's hyperparameters, presets, and the original's `config.json`.

The field names are those of `transformers.HubertConfig` (plus the `hubert_ecg` additions
`vocab_sizes` and `ensemble_length`), so a released `config.json` maps onto this class one to one.
`compute_dtype` and `remat` are ours: how to compute, not what; they are not written to `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from hubert_ecg_jax.files import UrlPath, as_path

# Conv feature-encoder variants of the original, keyed by `downsampling_factor`
# (name -> (kernels, strides)). "x5" is what the released models use: 6000 samples -> 93 frames.
CONV_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "x5": ((10, 3, 3, 2, 2), (4, 2, 2, 2, 2)),
    "x10": ((10, 3, 3, 2), (4, 2, 2, 2)),
    "wav2vec2": ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)),
}

COMPUTE_DTYPES = ("float32", "bfloat16")

# The input every model takes: 5 s of these 12 leads at 100 Hz, flattened lead-major.
STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = len(STANDARD_LEADS)
MODEL_INPUT_LENGTH = 6000  # NUM_LEADS x 5 s x 100 Hz

# Keys of `config.json` that carry no information for this model; they are kept verbatim so that
# a config read from a released repository is written back unchanged.
_NOT_IN_CONFIG_JSON = ("compute_dtype", "remat", "hf_extra")  # fields of ours
_HF_ONLY_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "torch_dtype")


@dataclasses.dataclass(frozen=True)
class HubertECGConfig:
  """Hyperparameters of HuBERT-ECG (a `transformers.HubertConfig` with HuBERT-ECG's heads)."""

  # Encoder.
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  do_stable_layer_norm: bool = False  # False: post-LN (the released models); True: pre-LN + final LN
  # Conv feature encoder.
  conv_dim: tuple[int, ...] = (512,) * 5
  conv_kernel: tuple[int, ...] = CONV_VARIANTS["x5"][0]
  conv_stride: tuple[int, ...] = CONV_VARIANTS["x5"][1]
  conv_bias: bool = False
  feat_extract_norm: str = "group"  # "group": GroupNorm on conv 0 only; "layer": LayerNorm on every conv
  feat_extract_activation: str = "gelu"
  feat_proj_layer_norm: bool = True
  # Positional convolution.
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  # Regularisation.
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.1
  feat_proj_dropout: float = 0.0
  final_dropout: float = 0.1
  layerdrop: float = 0.1
  # Masking (SpecAugment along time, as transformers' `_compute_mask_indices`).
  apply_spec_augment: bool = True
  mask_time_prob: float = 0.33
  mask_time_length: int = 1
  mask_time_min_masks: int = 2
  mask_feature_prob: float = 0.0
  mask_feature_length: int = 10
  mask_feature_min_masks: int = 0
  # Pretraining heads.
  classifier_proj_size: int = 256
  vocab_sizes: tuple[int, ...] = (500,)
  ensemble_length: int = 1
  initializer_range: float = 0.02
  # Ours: dtype of the matrix products (parameters stay float32; accumulation is float32).
  compute_dtype: str = "float32"
  # Ours: recompute each encoder layer's activations in the backward pass instead of keeping them
  # (less device memory for large batches or the large model, about a third more compute).
  remat: bool = False
  # Every other key of a `config.json` we read, written back unchanged (not compared or hashed).
  hf_extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def __post_init__(self):
    for name in ("conv_dim", "conv_kernel", "conv_stride", "vocab_sizes"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    problems = []
    if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
      problems.append(f"conv_dim, conv_kernel and conv_stride must have the same length, found "
                      f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}")
    if self.hidden_size % self.num_attention_heads:
      problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                      f"{self.num_attention_heads}")
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                      f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")
    if self.feat_extract_norm not in ("group", "layer"):
      problems.append(f"feat_extract_norm must be 'group' or 'layer', found {self.feat_extract_norm!r}")
    if self.hidden_act != "gelu" or self.feat_extract_activation != "gelu":
      problems.append(f"only the exact 'gelu' activation is supported, found hidden_act="
                      f"{self.hidden_act!r}, feat_extract_activation={self.feat_extract_activation!r}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      problems.append(f"compute_dtype must be one of {COMPUTE_DTYPES}, found {self.compute_dtype!r}")
    if not self.vocab_sizes or min(self.vocab_sizes) < 1:
      problems.append(f"vocab_sizes must be a non-empty list of positive sizes, found {self.vocab_sizes}")
    if self.ensemble_length not in (1, len(self.vocab_sizes)):
      problems.append(f"ensemble_length must be 1 (one projection shared by all codebooks) or "
                      f"len(vocab_sizes)={len(self.vocab_sizes)}, found {self.ensemble_length}")
    for name in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout",
                 "final_dropout", "layerdrop", "mask_time_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        problems.append(f"{name} must lie in [0, 1], found {getattr(self, name)}")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "classifier_proj_size", "num_conv_pos_embeddings"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be positive, found {getattr(self, name)}")
    if problems:
      raise ValueError("invalid HubertECGConfig: " + "; ".join(problems))

  # ----------------------------------------------------------------------------------------------
  @classmethod
  def preset(cls, size: str, downsampling: str = "x5", **overrides: Any) -> HubertECGConfig:
    """The original's sizes: `tiny` (tests and demo), `small`, `base`, `large`."""
    if size not in PRESETS:
      raise ValueError(f"unknown model size {size!r}: expected one of {sorted(PRESETS)}")
    if downsampling not in CONV_VARIANTS:
      raise ValueError(f"unknown downsampling variant {downsampling!r}: expected one of "
                       f"{sorted(CONV_VARIANTS)}")
    kernels, strides = CONV_VARIANTS[downsampling]
    fields = dict(PRESETS[size])
    conv_width = fields.pop("conv_width", 512)
    fields.update(conv_dim=(conv_width,) * len(kernels), conv_kernel=kernels, conv_stride=strides)
    fields.update(overrides)
    return cls(**fields)

  def replace(self, **changes: Any) -> HubertECGConfig:
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"unknown HubertECGConfig field(s): {sorted(unknown)}")
    return dataclasses.replace(self, **changes)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def receptive_field(self) -> int:
    """Input samples seen by one frame of the conv feature encoder (82 for the released models)."""
    field, jump = 1, 1
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      field += (kernel - 1) * jump
      jump *= stride
    return field

  @property
  def frame_hop(self) -> int:
    """Input samples between consecutive frames (64 for the released models)."""
    return math.prod(self.conv_stride)

  def num_frames(self, num_samples: int) -> int:
    """Frames the conv feature encoder makes of `num_samples` input samples (6000 -> 93)."""
    length = int(num_samples)
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      length = (length - kernel) // stride + 1
    return max(length, 0)

  @property
  def min_input_length(self) -> int:
    """The shortest input that gives one frame."""
    length = 1
    for kernel, stride in reversed(tuple(zip(self.conv_kernel, self.conv_stride))):
      length = (length - 1) * stride + kernel
    return length

  # ----------------------------------------------------------------------------------------------
  def to_hf_dict(self) -> dict[str, Any]:
    """The original's `config.json` content (model type `hubert_ecg`)."""
    out = dict(self.hf_extra)
    for f in dataclasses.fields(self):
      if f.name in _NOT_IN_CONFIG_JSON:
        continue
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    out["num_feat_extract_layers"] = len(self.conv_dim)
    out["model_type"] = "hubert_ecg"
    return out

  @classmethod
  def from_hf_dict(cls, data: dict[str, Any], **overrides: Any) -> HubertECGConfig:
    """Reads a `config.json` of `hubert_ecg` (or plain `hubert`) type; other keys are kept verbatim."""
    model_type = data.get("model_type", "hubert_ecg")
    if model_type not in ("hubert_ecg", "hubert"):
      raise ValueError(f"config.json is for model_type {model_type!r}: expected 'hubert_ecg' "
                       "(HuBERT-ECG) or 'hubert'")
    names = {f.name for f in dataclasses.fields(cls)} - set(_NOT_IN_CONFIG_JSON)
    fields = {k: v for k, v in data.items() if k in names}
    layers = data.get("num_feat_extract_layers")
    if layers is not None and "conv_dim" in data and layers != len(data["conv_dim"]):
      raise ValueError(f"config.json: num_feat_extract_layers={layers} but conv_dim has "
                       f"{len(data['conv_dim'])} entries")
    if model_type == "hubert":  # a plain HubertModel has no HuBERT-ECG heads: keep our defaults
      fields.setdefault("vocab_sizes", (data.get("vocab_size", 500),))
    extra = {k: v for k, v in data.items() if k not in names and k != "num_feat_extract_layers"}
    extra["model_type"] = model_type
    fields.update(overrides)
    return cls(**fields, hf_extra=extra)

  def save_json(self, path: str | pathlib.Path | UrlPath) -> None:
    as_path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

  @classmethod
  def from_json(cls, path: str | pathlib.Path | UrlPath, **overrides: Any) -> HubertECGConfig:
    path = as_path(path)
    try:
      data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
      raise ValueError(f"{path} is not valid JSON: {error}") from None
    return cls.from_hf_dict(data, **overrides)


# The original's sizes (reference §1.2); everything not listed takes the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_width=32, classifier_proj_size=16, vocab_sizes=(100,), layerdrop=0.0),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048,
                  classifier_proj_size=256, vocab_sizes=(500,), layerdrop=0.1),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, classifier_proj_size=256, vocab_sizes=(500,), layerdrop=0.1),
    "large": dict(hidden_size=960, num_hidden_layers=16, num_attention_heads=12,
                  intermediate_size=3840, classifier_proj_size=512, vocab_sizes=(1000,), layerdrop=0.0),
}

"""Which classifier parameters train, at which learning rate: freezing and layer-wise LR decay.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

BACKBONE = "hubert_ecg"
HEAD_NAMES = ("classifier", "classifier_hidden")


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
  """What is frozen, and the layer-wise learning-rate decay factor."""
  freeze_feature_encoder: bool = True  # the CNN, frozen in every paper run
  trainable_layers: int | None = None  # the last n transformer blocks train; None: all
  original_freeze_quirk: bool = False  # True: pos_conv_embed and encoder.layer_norm stay frozen
  layer_lr_decay: float = 1.0

  def __post_init__(self) -> None:
    if self.trainable_layers is not None and self.trainable_layers < 0:
      raise ValueError(f"trainable_layers must be >= 0 or None (all), found {self.trainable_layers}")
    if not 0.0 < self.layer_lr_decay <= 1.0:
      raise ValueError(f"layer_lr_decay must lie in (0, 1], found {self.layer_lr_decay}")


def _keys(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def parameter_group(path: tuple[str, ...]) -> tuple[str, int | None]:
  """(group, block index or None) of a leaf path such as ("hubert_ecg", "encoder", "layers_3", ...)."""
  if path[0] in HEAD_NAMES:
    return "head", None
  if path[0] != BACKBONE or len(path) < 2:
    raise ValueError(f"unexpected classifier parameter {'/'.join(path)}: expected it under "
                     f"{BACKBONE!r} or {HEAD_NAMES}")
  part = path[1]
  if part == "feature_extractor":
    return "conv", None
  if part in ("feature_projection", "feature_projection_norm"):
    return "projection", None
  if part == "masked_spec_embed":
    return "mask_embed", None
  if part == "encoder" and len(path) > 2:
    if path[2].startswith("layers_"):
      return "layer", int(path[2].removeprefix("layers_"))
    if path[2] in ("pos_conv_embed", "layer_norm"):
      return ("encoder_norm" if path[2] == "layer_norm" else "encoder_base"), None
  raise ValueError(f"unexpected backbone parameter {'/'.join(path)}")


def _check_layers(num_layers: int, config: FreezeConfig) -> int:
  trainable = num_layers if config.trainable_layers is None else config.trainable_layers
  if trainable > num_layers:
    raise ValueError(f"trainable_layers={trainable} but the model has {num_layers} blocks")
  return trainable


def trainable_mask(params: Any, num_layers: int, config: FreezeConfig,
                   pre_layer_norm: bool = False) -> Any:
  """A tree of bools like `params`: True where the leaf trains (see the module docstring)."""
  trainable_layers = _check_layers(num_layers, config)
  first_trainable = num_layers - trainable_layers
  encoder_base = trainable_layers == num_layers and not config.original_freeze_quirk

  def trains(path: tuple[Any, ...], _: Any) -> bool:
    group, index = parameter_group(_keys(path))
    if group == "conv":
      return not config.freeze_feature_encoder
    if group == "mask_embed":
      return False
    if group == "layer":
      return index >= first_trainable
    if group == "encoder_norm" and pre_layer_norm:
      return trainable_layers > 0 and not config.original_freeze_quirk
    if group in ("encoder_base", "encoder_norm"):
      return encoder_base
    return True  # projection, head

  return jax.tree_util.tree_map_with_path(trains, params)


def layer_lr_multipliers(params: Any, num_layers: int, decay: float,
                         pre_layer_norm: bool = False) -> Any:
  """A tree of floats like `params`: decay ** depth (see the module docstring)."""

  def multiplier(path: tuple[Any, ...], _: Any) -> float:
    group, index = parameter_group(_keys(path))
    if group == "head" or (group == "encoder_norm" and pre_layer_norm):
      depth = 0
    elif group == "layer":
      depth = num_layers - index
    else:
      depth = num_layers + 1
    return float(decay ** depth)

  return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_updates(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its fixed multiplier."""

  def init(_: Any) -> optax.EmptyState:
    return optax.EmptyState()

  def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init, update)


def finetune_optimizer(base: optax.GradientTransformation, params: Any, num_layers: int,
                       config: FreezeConfig, pre_layer_norm: bool = False
                       ) -> tuple[optax.GradientTransformation, Any]:
  """(optimizer, trainable mask): `base` (AdamW with its schedule) on the trainable leaves only,
  no state and zero updates for frozen ones, then the layer-wise LR multipliers."""
  mask = trainable_mask(params, num_layers, config, pre_layer_norm)
  labels = jax.tree.map(lambda trains: "train" if trains else "freeze", mask)
  optimizer = optax.multi_transform({"train": base, "freeze": optax.set_to_zero()}, labels)
  if config.layer_lr_decay != 1.0:
    optimizer = optax.chain(optimizer, scale_updates(
        layer_lr_multipliers(params, num_layers, config.layer_lr_decay, pre_layer_norm)))
  return optimizer, mask

"""The pre-training optimizer: AdamW with linear warmup and linear decay, as the original.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Parameter names (last path entry) that the "weights only" decay mask leaves undecayed.
NO_DECAY_NAMES = frozenset({"bias", "scale", "embedding", "masked_spec_embed", "weight_g"})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW and learning-rate schedule settings (defaults: the original's)."""
  total_steps: int
  learning_rate: float = 5e-5
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-9
  weight_decay: float = 0.01
  # True: decay every parameter as the original; False: only kernels (no biases, norms, embeddings).
  decay_all_params: bool = True
  warmup_fraction: float = 0.08
  # Clip gradients to this global L2 norm; None: no clipping (the original).
  grad_clip_norm: float | None = None

  def __post_init__(self) -> None:
    if self.total_steps < 1:
      raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
    if not 0.0 <= self.warmup_fraction <= 1.0:
      raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      raise ValueError(f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")

  @property
  def warmup_steps(self) -> int:
    """ceil(warmup_fraction * total_steps), as the original."""
    return math.ceil(self.warmup_fraction * self.total_steps)

  def schedule(self) -> optax.Schedule:
    """The learning rate the optimizer uses for update number `count` (0 for the first)."""
    return linear_warmup_decay(self.learning_rate, self.warmup_steps, self.total_steps)


def linear_warmup_decay(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Learning rate at update `count` (0 for the first update), as get_linear_schedule_with_warmup."""

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    warmup = count / max(1, warmup_steps)
    decay = jnp.maximum(0.0, (total_steps - count) / max(1, total_steps - warmup_steps))
    return peak * jnp.where(count < warmup_steps, warmup, decay)

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: all but biases, norm scales and embeddings."""

  def decays(path: tuple[Any, ...], leaf: jax.Array) -> bool:
    name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
    return name not in NO_DECAY_NAMES and jnp.ndim(leaf) >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Clipping (optional) then AdamW under the warmup-decay schedule."""
  adamw = optax.adamw(learning_rate=config.schedule(), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay,
                      mask=None if config.decay_all_params else weight_decay_mask)
  if config.grad_clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)

"""The training state (a pytree) and how it is made: from scratch, or for the next iteration.

`TrainState` holds everything a resumed run needs besides the data position: parameters,
optimizer state, the step count, the base RNG key, and the non-finite-step counters.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, HubertECGConfig
from hubert_ecg_jax.model import HubertECG


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 (): batches consumed (skipped non-finite steps included)
  params: Any  # float32 pytree of the model's parameters
  opt_state: Any  # optax state of `params`
  rng: jax.Array  # uint32 (2,): base key; dropout keys are folded from it per step and device
  nonfinite_streak: jax.Array  # int32 (): consecutive steps skipped for non-finite loss or gradients
  skipped_steps: jax.Array  # int32 (): all steps skipped so far


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: HubertECGConfig, rng: jax.Array, num_samples: int) -> Any:
  model = HubertECG(config)
  return model.init({"params": rng}, jnp.zeros((1, num_samples), jnp.float32))["params"]


def init_params(config: HubertECGConfig, rng: jax.Array, num_samples: int = MODEL_INPUT_LENGTH) -> Any:
  """Fresh parameters of `HubertECG(config)` with its pretraining heads (compiled once per config)."""
  return _init_params(config, rng, num_samples)


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """A state at step 0 with fresh optimizer moments."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jnp.asarray(rng, jnp.uint32), nonfinite_streak=jnp.zeros((), jnp.int32),
                    skipped_steps=jnp.zeros((), jnp.int32))


def next_iteration_params(params: Any, config: HubertECGConfig, rng: jax.Array,
                          num_samples: int = MODEL_INPUT_LENGTH) -> Any:
  """The original's iteration switch: fresh label embeddings for `config.vocab_sizes`, all else kept.

  `params` are the previous iteration's; `config` is the new iteration's model (same
  architecture, new vocabulary). The backbone and `final_proj` are kept; the label embeddings are
  initialised anew (the original builds new `nn.Embedding`s). Start the optimizer from scratch
  (`create_train_state`).
  """
  fresh = jax.eval_shape(lambda: init_params(config, rng, num_samples))
  kept = {name: value for name, value in params.items() if not name.startswith("label_embedding_")}
  expected = {name: value for name, value in fresh.items() if not name.startswith("label_embedding_")}
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  if jax.tree.structure(kept) != jax.tree.structure(expected) or shapes(kept) != shapes(expected):
    differing = sorted(name for name in set(kept) | set(expected)
                       if name not in kept or name not in expected
                       or shapes(kept[name]) != shapes(expected[name]))
    raise ValueError(f"the previous model's parameters do not fit the new iteration's architecture "
                     f"(size, downsampling, projection): differing entries {differing}")
  embedding_init = jax.nn.initializers.normal(1.0)  # as HubertECG's label embeddings
  keys = jax.random.split(rng, len(config.vocab_sizes))
  for index, size in enumerate(config.vocab_sizes):
    kept[f"label_embedding_{index}"] = {
        "embedding": embedding_init(keys[index], (size, config.classifier_proj_size), jnp.float32)}
  return kept

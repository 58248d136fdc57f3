"""The training state (a pytree) and how it is made: from scratch, or for the next iteration.

`TrainState` holds everything a resumed run needs besides the data position: parameters,
optimizer state, the step count, the base RNG key, and the non-finite-step counters.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.model import HubertECG

# Input length of a 5-s 12-lead ECG at 100 Hz, flattened lead-major.
ECG_SAMPLES = 6000


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 (): batches consumed (skipped non-finite steps included)
  params: Any  # float32 pytree of the model's parameters
  opt_state: Any  # optax state of `params`
  rng: jax.Array  # uint32 (2,): base key; dropout keys are folded from it per step and device
  nonfinite_streak: jax.Array  # int32 (): consecutive steps skipped for non-finite loss or gradients
  skipped_steps: jax.Array  # int32 (): all steps skipped so far


def init_params(config: HubertECGConfig, rng: jax.Array, num_samples: int = ECG_SAMPLES) -> Any:
  """Fresh parameters of `HubertECG(config)` with its pretraining heads."""
  model = HubertECG(config)
  return model.init({"params": rng}, jnp.zeros((1, num_samples), jnp.float32))["params"]


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """A state at step 0 with fresh optimizer moments."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jnp.asarray(rng, jnp.uint32), nonfinite_streak=jnp.zeros((), jnp.int32),
                    skipped_steps=jnp.zeros((), jnp.int32))


def init_train_state(config: HubertECGConfig, optimizer: optax.GradientTransformation, seed: int,
                     num_samples: int = ECG_SAMPLES) -> TrainState:
  """A state from scratch: parameters initialised from `seed`, the dropout key derived from it."""
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  return create_train_state(init_params(config, init_key, num_samples), optimizer, dropout_key)


def _label_embedding_names(params: Any) -> list[str]:
  return sorted(name for name in params if name.startswith("label_embedding_"))


def next_iteration_params(params: Any, config: HubertECGConfig, vocab_sizes: tuple[int, ...],
                          rng: jax.Array,
                          num_samples: int = ECG_SAMPLES) -> tuple[HubertECGConfig, Any]:
  """The original's iteration switch: new label embeddings for `vocab_sizes`, all else kept.

  The backbone and `final_proj` come from `params`; the label embeddings are freshly initialised
  (the original builds new `nn.Embedding`s). Start the new iteration's optimizer from scratch with
  `create_train_state`.
  """
  vocab_sizes = tuple(int(v) for v in vocab_sizes)
  if config.ensemble_length not in (1, len(vocab_sizes)):
    raise ValueError(f"the model has ensemble_length={config.ensemble_length} projections, which "
                     f"cannot serve {len(vocab_sizes)} codebooks: use 1 codebook or "
                     f"{config.ensemble_length}")
  old_embeddings = _label_embedding_names(params)
  if len(old_embeddings) != len(config.vocab_sizes):
    raise ValueError(f"params have {len(old_embeddings)} label embeddings but the config has "
                     f"vocab_sizes={config.vocab_sizes}")
  new_config = config.replace(vocab_sizes=vocab_sizes)
  fresh = jax.eval_shape(lambda: init_params(new_config, rng, num_samples))
  new_params = {name: value for name, value in params.items() if not name.startswith("label_embedding_")}
  mismatched = [name for name in new_params
                if jax.tree.map(jnp.shape, new_params[name]) != jax.tree.map(jnp.shape, fresh[name])]
  if mismatched or set(new_params) != {n for n in fresh if not n.startswith("label_embedding_")}:
    raise ValueError(f"params do not match the config's architecture (differing: "
                     f"{mismatched or sorted(set(fresh) ^ set(new_params))})")
  embedding_init = jax.nn.initializers.normal(1.0)  # as HubertECG's label embeddings
  keys = jax.random.split(rng, len(vocab_sizes))
  for index, size in enumerate(vocab_sizes):
    new_params[f"label_embedding_{index}"] = {
        "embedding": embedding_init(keys[index], (size, config.classifier_proj_size), jnp.float32)}
  return new_config, new_params

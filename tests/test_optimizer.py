"""Optimizer and schedule against torch AdamW and transformers' linear warmup schedule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from hubert_ecg_jax.train.optimizer import (OptimizerConfig, make_optimizer,
                                            weight_decay_mask)


def _torch_learning_rates(peak: float, warmup: int, total: int) -> list[float]:
  """The learning rate each torch optimizer step uses (scheduler stepped after each update)."""
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
  scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
  rates = []
  for _ in range(total + 3):
    rates.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
  return rates


@pytest.mark.parametrize("total", [1, 13, 100, 80_000])
def test_schedule_matches_transformers(total: int) -> None:
  config = OptimizerConfig(total_steps=total)
  assert config.warmup_steps == int(np.ceil(0.08 * total))
  scheduler = get_linear_schedule_with_warmup(
      torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5), config.warmup_steps, total)
  counts = np.unique(np.linspace(0, total + 2, 300).astype(int))
  expected = np.array([5e-5 * scheduler.lr_lambdas[0](int(c)) for c in counts])
  got = jax.vmap(lambda c: config.schedule()(c))(jnp.asarray(counts))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-13)


def test_update_n_uses_the_rate_torch_uses_for_its_nth_step() -> None:
  config = OptimizerConfig(total_steps=25)
  expected = _torch_learning_rates(5e-5, config.warmup_steps, 25)
  got = [float(config.schedule()(c)) for c in range(len(expected))]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-13)


def _params(rng: np.random.Generator) -> dict:
  return {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                    "bias": rng.normal(size=(3,)).astype(np.float32)},
          "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)},
          "label_embedding_0": {"embedding": rng.normal(size=(5, 3)).astype(np.float32)}}


@pytest.mark.parametrize("decay_all,clip", [(True, None), (False, 0.5)])
def test_updates_match_torch_adamw(decay_all: bool, clip: float | None) -> None:
  rng = np.random.default_rng(0)
  params = _params(rng)
  config = OptimizerConfig(total_steps=12, learning_rate=1e-2, weight_decay=0.1,
                           decay_all_params=decay_all, grad_clip_norm=clip)
  leaves, treedef = jax.tree.flatten(params)
  decays = jax.tree.leaves(weight_decay_mask(params)) if not decay_all else [True] * len(leaves)
  torch_params = [torch.nn.Parameter(torch.tensor(leaf)) for leaf in leaves]
  groups = [{"params": [p for p, d in zip(torch_params, decays) if d], "weight_decay": 0.1},
            {"params": [p for p, d in zip(torch_params, decays) if not d], "weight_decay": 0.0}]
  torch_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-9)
  scheduler = get_linear_schedule_with_warmup(torch_opt, config.warmup_steps, config.total_steps)

  optimizer = make_optimizer(config)
  jax_params = jax.tree.map(jnp.asarray, params)
  opt_state = optimizer.init(jax_params)
  for _ in range(10):
    grads = [rng.normal(size=leaf.shape).astype(np.float32) for leaf in leaves]
    for p, g in zip(torch_params, grads):
      p.grad = torch.tensor(g)
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(torch_params, clip)
    torch_opt.step()
    scheduler.step()
    updates, opt_state = optimizer.update(jax.tree.unflatten(treedef, grads), opt_state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)
  for ours, theirs in zip(jax.tree.leaves(jax_params), torch_params):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_spares_biases_norms_and_embeddings() -> None:
  mask = weight_decay_mask(_params(np.random.default_rng(0)))
  assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False},
                  "label_embedding_0": {"embedding": False}}


def test_bad_settings_raise() -> None:
  with pytest.raises(ValueError, match="total_steps must be >= 1"):
    OptimizerConfig(total_steps=0)
  with pytest.raises(ValueError, match="warmup_fraction"):
    OptimizerConfig(total_steps=10, warmup_fraction=1.5)
  with pytest.raises(ValueError, match="grad_clip_norm"):
    OptimizerConfig(total_steps=10, grad_clip_norm=0.0)

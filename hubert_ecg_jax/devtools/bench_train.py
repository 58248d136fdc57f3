"""Train-step benchmark: our jitted masked-prediction AdamW step (float32, and bf16 compute with
float32 accumulation and parameters) against the PyTorch original's step on `transformers`'
HubertModel with the same weights, the same batch and the same objective, interleaved in one run.

Both sides run what pre-training runs: dropout 0.1, the span masks replaced by the mask
embedding, cosine logits / 0.1, cross-entropy on the masked frames, AdamW. Layerdrop is off on
both sides: PyTorch skips the dropped layers' work at random, which would make the figures noisy.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, HubertECGConfig
from hubert_ecg_jax.devtools.bench_forward import measure, time_call
from hubert_ecg_jax.devtools.flops import train_step_flops
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.parallel import MeshLauncher
from hubert_ecg_jax.data.masking import sample_span_mask
from hubert_ecg_jax.train.optimizer import OptimizerConfig, make_optimizer
from hubert_ecg_jax.train.state import create_train_state, init_params
from hubert_ecg_jax.train.step import make_eval_step, make_train_step

# The original's AdamW; a long schedule so the learning rate is not 0 in the timed steps.
OPTIMIZER = OptimizerConfig(total_steps=1_000_000, warmup_fraction=0.0)


def benchmark_batch(config: HubertECGConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """ECG-like inputs, no padding, pre-training span masks and random units."""
  rng = np.random.default_rng(seed)
  walk = np.cumsum(rng.normal(size=(batch, MODEL_INPUT_LENGTH)), axis=1)
  walk -= walk.min(axis=1, keepdims=True)
  x = (2 * walk / walk.max(axis=1, keepdims=True) - 1).astype(np.float32)
  frames = config.num_frames(MODEL_INPUT_LENGTH)
  return {"x": x, "attention_mask": np.ones((batch, MODEL_INPUT_LENGTH), np.int32),
          "targets": np.stack([rng.integers(0, v, (batch, frames)) for v in config.vocab_sizes],
                              axis=1).astype(np.int32),
          "mask_time_indices": sample_span_mask(rng, batch, frames)}


def jax_train_step(config: HubertECGConfig, params: Any, batch: dict[str, np.ndarray]
                   ) -> tuple[Callable[[], None], Any]:
  """Our train step on one device, compiled ahead: (a call running one step, the state donated
  and carried from call to call; the executable, for its memory analysis)."""
  model = HubertECG(config)
  optimizer = make_optimizer(OPTIMIZER)
  launcher = MeshLauncher(make_train_step(model, optimizer), make_eval_step(model),
                          jax.devices()[:1])
  state = launcher.place_state(create_train_state(params, optimizer, jax.random.PRNGKey(1)))
  placed = launcher.place_batch(batch)
  compiled = jax.jit(launcher.train_step, donate_argnums=0).lower(state, placed).compile()

  def step() -> None:
    nonlocal state
    state, metrics = compiled(state, placed)
    jax.block_until_ready((state, metrics))

  return step, compiled


def torch_train_step(config: HubertECGConfig, params: Any | None, batch: dict[str, np.ndarray],
                     bf16: bool = False) -> Callable[[], None]:
  """The original's step: HubertModel (sdpa attention) + heads, masked CE, torch AdamW, on the GPU
  when there is one. params: flax params as numpy (None: torch's own initialisation); bf16: the
  forward under bf16 autocast (PyTorch at its strongest on accelerators)."""
  import torch
  import torch.nn.functional as F

  from hubert_ecg_jax.devtools.torch_reference import TorchHubertECG

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = TorchHubertECG(config, attn_implementation="sdpa")
  if params is not None:
    model.load_flax_params(params)
  model.to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER.learning_rate,
                                betas=(OPTIMIZER.b1, OPTIMIZER.b2), eps=OPTIMIZER.eps,
                                weight_decay=OPTIMIZER.weight_decay)
  data = {name: torch.from_numpy(value).to(device) for name, value in batch.items()}
  masked, targets = data["mask_time_indices"], data["targets"].long()
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step() -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      out = model.hubert(data["x"], attention_mask=data["attention_mask"].long(),
                         mask_time_indices=masked)
      logits = model.logits(out.last_hidden_state)
      loss = sum(F.cross_entropy(l[masked].float(), targets[:, i][masked])  # float32 loss
                 for i, l in enumerate(logits))
    loss.backward()
    optimizer.step()
    sync()

  return step


def run_train_benchmark(size: str = "base", batch: int = 8, repeats: int = 5,
                        with_torch: bool = True) -> dict[str, Any]:
  """ECG/s of the train step: `jax_fp32`, `jax_bf16` and `torch_fp32`, medians of interleaved runs."""
  config = HubertECGConfig.preset(size, layerdrop=0.0)
  data = benchmark_batch(config, batch)
  params = init_params(config, jax.random.PRNGKey(0))
  candidates: dict[str, Callable[[], float]] = {
      name: (lambda step=jax_train_step(step_config, params, data)[0]: time_call(step))
      for name, step_config in (("jax_fp32", config),
                                ("jax_bf16", config.replace(compute_dtype="bfloat16")))}
  torch_side = (torch_train_step, config, jax.tree.map(np.asarray, params), data)  # own process
  return measure(candidates, torch_side if with_torch else None, repeats,
                 train_step_flops(config), {"size": size, "batch": batch})

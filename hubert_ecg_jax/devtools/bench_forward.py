"""Forward-pass benchmark: our JAX model (float32 and bf16 compute) against `transformers`' PyTorch
HubertModel with the same weights, measured interleaved in one run so machine drift hits both.

The PyTorch side runs in a worker process of its own (`WorkerTimer`): in a process where XLA:CPU
has run, PyTorch's CPU forward was measured 3x slower than alone (8.1 -> 2.4 ECG/s, base, batch 8),
which would flatter us. The two processes take turns; neither computes while the other is timed.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.devtools.flops import forward_flops, peak_flops
from hubert_ecg_jax.inference import strip_pretraining_heads
from hubert_ecg_jax.model import HubertECG


def time_call(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_medians(candidates: dict[str, Callable[[], float]], repeats: int,
                        warmup: int = 1) -> dict[str, float]:
  """Median seconds of each candidate (a call returns the seconds it took), run in turn `repeats` times."""
  for timed in candidates.values():
    for _ in range(warmup):
      timed()
  times: dict[str, list[float]] = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, timed in candidates.items():
      times[name].append(timed())
  return {name: statistics.median(values) for name, values in times.items()}


def _worker(connection: Any, factory: Callable[..., Callable[[], Any]], args: tuple) -> None:
  try:
    fn = factory(*args)
  except Exception as error:  # reported to the parent, which raises it
    connection.send(f"error: {type(error).__name__}: {error}")
    return
  connection.send("ready")
  while connection.recv() == "run":
    connection.send(time_call(fn))


class WorkerTimer:
  """Builds `factory(*args)` in a spawned process; each call runs it there once and returns seconds."""

  def __init__(self, factory: Callable[..., Callable[[], Any]], *args: Any):
    context = multiprocessing.get_context("spawn")
    self._connection, child = context.Pipe()
    self._process = context.Process(target=_worker, args=(child, factory, args), daemon=True)
    self._process.start()
    status = self._connection.recv()
    if status != "ready":
      self.close()
      raise RuntimeError(f"benchmark worker failed to start: {status}")

  def __call__(self) -> float:
    self._connection.send("run")
    return self._connection.recv()

  def close(self) -> None:
    if self._process.is_alive():
      self._connection.send("stop")
      self._process.join(timeout=30)


def torch_forward(config: HubertECGConfig, params: dict, x: np.ndarray) -> Callable[[], Any]:
  """transformers' HubertModel (sdpa attention, eval, float32) carrying `params`, on batch `x`."""
  import torch

  from hubert_ecg_jax.devtools.torch_reference import TorchHubertECG
  reference = TorchHubertECG(config, attn_implementation="sdpa").eval()
  reference.load_flax_params(params)
  x_torch = torch.from_numpy(x)

  def forward():
    with torch.inference_mode():
      reference.hubert(x_torch)
  return forward


def run_forward_benchmark(size: str = "base", batch: int = 8, repeats: int = 5,
                          with_torch: bool = True) -> dict[str, Any]:
  config = HubertECGConfig.preset(size)
  x = np.random.default_rng(0).uniform(-1, 1, (batch, 6000)).astype(np.float32)
  model = HubertECG(config)
  params = jax.jit(model.init)({"params": jax.random.key(0)}, jnp.asarray(x[:1]))["params"]
  candidates: dict[str, Callable[[], float]] = {}
  x_device = jax.device_put(x)
  backbone = strip_pretraining_heads(params)
  for dtype in ("float32", "bfloat16"):
    fast_model = HubertECG(config.replace(compute_dtype=dtype), pretraining_heads=False)
    forward = jax.jit(lambda p, v, m=fast_model: m.apply({"params": p}, v).last_hidden_state)
    candidates[f"jax_{'fp32' if dtype == 'float32' else 'bf16'}"] = (
        lambda f=forward, p=backbone: time_call(lambda: f(p, x_device).block_until_ready()))
  torch_side = (torch_forward, config, jax.tree.map(np.asarray, params), x)
  return measure(candidates, torch_side if with_torch else None, repeats,
                 forward_flops(config, with_logits=False), {"size": size, "batch": batch})


def measure(candidates: dict[str, Callable[[], float]], torch_side: tuple | None, repeats: int,
            flops_per_ecg: int, info: dict[str, Any]) -> dict[str, Any]:
  """Times the candidates (plus `torch_fp32` built as `torch_side[0](*torch_side[1:])` in a worker
  process) interleaved, and reports ECG/s, GFLOP/s, MFU (on known accelerators) and ratios."""
  worker = None
  if torch_side is not None:
    worker = WorkerTimer(*torch_side)
    candidates = {**candidates, "torch_fp32": worker}
  try:
    seconds = interleaved_medians(candidates, repeats)
  finally:
    if worker is not None:
      worker.close()
  batch = info["batch"]
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind)
  result: dict[str, Any] = {**info, "repeats": repeats, "device": device.device_kind,
                            "gflop_per_ecg": flops_per_ecg / 1e9}
  for name, secs in seconds.items():
    result[f"{name}_ecg_per_s"] = batch / secs
    result[f"{name}_gflop_per_s"] = batch * flops_per_ecg / secs / 1e9
    if peak and name.startswith("jax"):
      result[f"{name}_mfu"] = batch * flops_per_ecg / secs / peak
  if "torch_fp32" in seconds:
    for name in seconds:
      if name.startswith("jax"):
        result[f"{name}_vs_torch"] = seconds["torch_fp32"] / seconds[name]
  return result


def format_table(result: dict[str, Any], title: str) -> str:
  rows = [f"{title}: size {result['size']}, batch {result['batch']}, device {result['device']}, "
          f"{result['gflop_per_ecg']:.1f} GFLOP per ECG, median of {result['repeats']} interleaved runs",
          f"{'implementation':<14} {'ECG/s':>9} {'GFLOP/s':>9} {'vs PyTorch':>11}"]
  for name in ("torch_fp32", "jax_fp32", "jax_bf16"):
    if f"{name}_ecg_per_s" not in result:
      continue
    ratio = result.get(f"{name}_vs_torch")
    rows.append(f"{name:<14} {result[f'{name}_ecg_per_s']:>9.2f} "
                f"{result[f'{name}_gflop_per_s']:>9.1f} {'' if ratio is None else f'{ratio:.2f}x':>11}")
  if "jax_bf16_mfu" in result:
    rows.append(f"MFU (bf16): {100 * result['jax_bf16_mfu']:.1f}%")
  return "\n".join(rows)

"""The accelerator check: what a GPU or TPU run needs to know, measured by one program.

`hubert-ecg-jax bench device` writes a JSON record and prints a markdown table of:
- the devices, library versions, the chip's bf16 peak used for MFU and a measured matmul peak;
- parity with transformers' HubertModel on the same device: float32 under "highest" matmul
  precision (every hidden state within 1e-4), bf16 compute (relative error within 2e-2);
- the forward pass and the train step over a sweep of sizes, dtypes and per-device batches:
  ECG/s, MFU, the executable's device memory and its compile time; out-of-memory ends a sweep;
- the PyTorch peer on the same device at its strongest (SDPA attention, bf16 autocast), same batch;
- a short pre-training run from in-memory batches with learnable units, then a checkpoint saved
  and restored on the device, with a bit-identical next-step loss;
- k-means on the device, against the CPU figure of the README.
It needs no TensorFlow: batches come from memory. `--quick` runs tiny sizes on a CPU in a minute
or two; the test suite runs it that way, so the program cannot rot.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, HubertECGConfig
from hubert_ecg_jax.data.masking import sample_span_mask
from hubert_ecg_jax.devtools.bench_forward import interleaved_medians, time_call
from hubert_ecg_jax.devtools.bench_train import (OPTIMIZER, benchmark_batch, jax_train_step,
                                                  torch_train_step)
from hubert_ecg_jax.devtools.flops import forward_flops, peak_flops, train_step_flops
from hubert_ecg_jax.inference import strip_pretraining_heads
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.parallel import DevicePrefetch, MeshLauncher
from hubert_ecg_jax.pretrained import params_from_state_dict
from hubert_ecg_jax.targets.kmeans import KMeansConfig, fit_kmeans
from hubert_ecg_jax.train.checkpointing import CheckpointManager, abstract_like
from hubert_ecg_jax.train.optimizer import make_optimizer
from hubert_ecg_jax.train.state import create_train_state, init_params
from hubert_ecg_jax.train.step import make_eval_step, make_train_step

# `size dtype mode batches`: one sweep entry per string; batches are per device.
FULL_SWEEP = ("base bf16 train 64,128,256,512,1024", "base fp32 train 256",
              "base bf16 forward 256,1024", "base fp32 forward 256",
              "large bf16 train 64,256", "large bf16 forward 256")
QUICK_SWEEP = ("tiny bf16 train 4,8", "tiny fp32 forward 8")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
PARITY_FP32_ATOL = 1e-4
PARITY_BF16_RTOL = 2e-2
CPU_KMEANS_SECONDS = 41.0  # README: 1M x 768, K 500 on the 2-core development CPU (tools/bench_kmeans.py)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers")


@dataclasses.dataclass
class CheckSettings:
  sweep: tuple[str, ...] = FULL_SWEEP
  parity_size: str = "base"
  parity_batch: int = 4
  pretrain_size: str = "small"
  pretrain_batch: int = 128  # per device
  pretrain_steps: int = 300
  kmeans_n: int = 1_000_000
  kmeans_dim: int = 768
  kmeans_k: int = 500
  repeats: int = 5
  with_torch: bool = True
  time_limit_s: float = 420.0  # sweep entries past this are reported as skipped

  @classmethod
  def quick(cls) -> CheckSettings:
    return cls(sweep=QUICK_SWEEP, parity_size="tiny", parity_batch=2, pretrain_size="tiny",
               pretrain_batch=16, pretrain_steps=60, kmeans_n=20_000, kmeans_dim=32, kmeans_k=16,
               repeats=2)


@dataclasses.dataclass(frozen=True)
class SweepEntry:
  size: str
  dtype: str  # "bf16" or "fp32"
  mode: str  # "train" or "forward"
  batch: int


def parse_sweep(specs: tuple[str, ...]) -> list[SweepEntry]:
  """`"base bf16 train 64,128"` -> one entry per batch; a wrong field is a ValueError naming it."""
  entries = []
  for spec in specs:
    fields = spec.split()
    if len(fields) != 4:
      raise ValueError(f"a sweep entry reads 'SIZE DTYPE MODE BATCHES', found {spec!r}")
    size, dtype, mode, batches = fields
    HubertECGConfig.preset(size)  # refuses an unknown size
    if dtype not in DTYPES or mode not in ("train", "forward"):
      raise ValueError(f"{spec!r}: DTYPE is bf16 or fp32 and MODE train or forward")
    try:
      sizes = [int(b) for b in batches.split(",")]
    except ValueError:
      raise ValueError(f"{spec!r}: BATCHES are comma-separated integers") from None
    entries += [SweepEntry(size, dtype, mode, batch) for batch in sizes]
  return entries


def _out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def environment() -> dict[str, Any]:
  """Devices, versions, the data-sheet bf16 peak and a measured bf16 matmul rate."""
  device = jax.devices()[0]
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  n = 8192 if device.platform != "cpu" else 1024
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.float32))
  matmul(a, a).block_until_ready()
  seconds = min(time_call(lambda: matmul(a, a).block_until_ready()) for _ in range(5))
  return {"platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "versions": versions,
          "peak_bf16_flops": peak_flops(device.device_kind),
          "measured_bf16_matmul_flops": 2 * n ** 3 / seconds}


def parity(size: str, batch: int) -> dict[str, Any]:
  """Our model against transformers' HubertModel with the same random weights, on the device."""
  import torch

  from hubert_ecg_jax.devtools.torch_reference import ecg_like_batch, make_reference

  config = HubertECGConfig.preset(size)
  reference = make_reference(config, seed=3)
  params, _ = params_from_state_dict(config, reference.state_dict_like_original())
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference in full precision
  torch.backends.cudnn.allow_tf32 = False
  reference.to(torch_device)
  x = ecg_like_batch(batch, seed=3)
  torch_hidden, _ = reference.forward_all(x)
  result = {"size": size, "batch": batch}
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda p, v: HubertECG(config).apply({"params": p}, v, output_hidden_states=True))(
        params, jnp.asarray(x))
    result["fp32_max_abs_diff"] = max(float(np.abs(np.asarray(ours) - theirs).max())
                                      for ours, theirs in zip(out.hidden_states, torch_hidden))
  bf16 = HubertECG(config.replace(compute_dtype="bfloat16"))
  last = np.asarray(jax.jit(lambda p, v: bf16.apply({"params": p}, v).last_hidden_state)(
      params, jnp.asarray(x)))
  result["bf16_relative_error"] = float(np.linalg.norm(last - torch_hidden[-1])
                                        / np.linalg.norm(torch_hidden[-1]))
  result["ok"] = (result["fp32_max_abs_diff"] <= PARITY_FP32_ATOL
                  and result["bf16_relative_error"] <= PARITY_BF16_RTOL)
  reference.to("cpu")
  return result


def _jax_runner(entry: SweepEntry) -> tuple[Callable[[], Any], Any, int]:
  """(a compiled call with its arguments bound, its compiled executable, FLOPs per ECG)."""
  config = HubertECGConfig.preset(entry.size, layerdrop=0.0, compute_dtype=DTYPES[entry.dtype])
  data = benchmark_batch(config, entry.batch)
  params = init_params(config, jax.random.PRNGKey(0))
  if entry.mode == "forward":
    model = HubertECG(config, pretraining_heads=False)
    forward = jax.jit(lambda p, v: model.apply({"params": p}, v).last_hidden_state)
    args = (jax.device_put(strip_pretraining_heads(params)), jax.device_put(data["x"]))
    compiled = forward.lower(*args).compile()
    return (lambda: compiled(*args).block_until_ready()), compiled, forward_flops(config, with_logits=False)
  run, compiled = jax_train_step(config, params, data)
  return run, compiled, train_step_flops(config)


def _executable_bytes(compiled: Any) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def _torch_runner(entry: SweepEntry) -> Callable[[], Any]:
  """transformers' HubertModel + heads on the device: SDPA, bf16 autocast for bf16 entries."""
  config = HubertECGConfig.preset(entry.size, layerdrop=0.0)
  batch = benchmark_batch(config, entry.batch)
  if entry.mode == "train":
    return torch_train_step(config, None, batch, bf16=entry.dtype == "bf16")
  import torch

  from hubert_ecg_jax.devtools.torch_reference import TorchHubertECG

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = TorchHubertECG(config, attn_implementation="sdpa").to(device).eval()
  x = torch.from_numpy(batch["x"]).to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=entry.dtype == "bf16")
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run() -> None:
    with torch.inference_mode(), autocast:
      model.hubert(x)
    sync()
  return run


def throughput(entries: list[SweepEntry], repeats: int, with_torch: bool,
               deadline: float) -> list[dict[str, Any]]:
  """One row per entry: ECG/s and MFU of ours (and of PyTorch), memory, compile time."""
  peak = peak_flops(jax.devices()[0].device_kind)
  rows, exhausted = [], set()
  for entry in entries:
    row: dict[str, Any] = dataclasses.asdict(entry)
    rows.append(row)
    if time.monotonic() > deadline:
      row["status"] = "skipped: time limit"
      continue
    if (entry.size, entry.dtype, entry.mode) in exhausted:
      row["status"] = "skipped: a smaller batch ran out of memory"
      continue
    try:
      started = time.perf_counter()
      run, compiled, flops = _jax_runner(entry)
      row["compile_s"] = time.perf_counter() - started
      row["device_bytes"] = _executable_bytes(compiled)
      candidates = {"jax": lambda: time_call(run)}
      if with_torch:
        torch_run = _torch_runner(entry)
        candidates["torch"] = lambda: time_call(torch_run)
      seconds = interleaved_medians(candidates, repeats)
    except Exception as error:  # out of memory ends this sweep line; anything else is a failure
      if not _out_of_memory(error):
        raise
      exhausted.add((entry.size, entry.dtype, entry.mode))
      row["status"] = "out of memory"
      continue
    row["status"] = "ok"
    for name, secs in seconds.items():
      row[f"{name}_ecg_per_s"] = entry.batch / secs
      if peak:
        row[f"{name}_mfu"] = entry.batch * flops / secs / peak
    if "torch" in seconds:
      row["vs_torch"] = seconds["torch"] / seconds["jax"]
  return rows


def learnable_batch(config: HubertECGConfig, batch: int, rng: np.random.Generator) -> dict:
  """ECG-like inputs whose units (the frame's mean level, quantised) can be learnt."""
  data = benchmark_batch(config, batch, seed=int(rng.integers(1 << 31)))
  frames = config.num_frames(MODEL_INPUT_LENGTH)
  hop = MODEL_INPUT_LENGTH // frames
  levels = data["x"][:, :frames * hop].reshape(batch, frames, hop).mean(axis=2)  # (batch, frames)
  edges = np.linspace(-1, 1, config.vocab_sizes[0] + 1)[1:-1]
  data["targets"] = np.digitize(levels, edges)[:, None, :].astype(np.int32)  # (batch, 1, frames)
  return data


def pretraining_run(size: str, batch: int, steps: int) -> dict[str, Any]:
  """`steps` bf16 steps on 8 cycled in-memory batches, then a checkpoint round trip."""
  config = HubertECGConfig.preset(size, vocab_sizes=(16,), compute_dtype="bfloat16", layerdrop=0.0)
  model = HubertECG(config)
  optimizer = make_optimizer(dataclasses.replace(OPTIMIZER, learning_rate=1e-3, warmup_fraction=0.05,
                                                 total_steps=steps + 1, grad_clip_norm=1.0))
  launcher = MeshLauncher(make_train_step(model, optimizer), make_eval_step(model), jax.devices()[:1])
  rng = np.random.default_rng(0)
  batches = [learnable_batch(config, batch, rng) for _ in range(8)]
  frames = config.num_frames(MODEL_INPUT_LENGTH)

  def host_batch(index: int) -> dict[str, np.ndarray]:
    data = dict(batches[index % len(batches)])
    data["mask_time_indices"] = sample_span_mask(rng, batch, frames)
    return data

  # As the training engine feeds its steps: the next batches' copies overlap the running step.
  feed = DevicePrefetch(map(host_batch, itertools.count()), launcher.place_batch, ahead=2)
  state = launcher.place_state(create_train_state(init_params(config, jax.random.PRNGKey(0)),
                                                  optimizer, jax.random.PRNGKey(1)))
  losses, started = [], time.perf_counter()
  for step in range(steps):
    state, metrics = launcher.train_step(state, next(feed))
    feed.fill(steps - step)  # up to the batch of the round trip's step, not past it
    if step == 0:
      jax.block_until_ready(metrics)
      started = time.perf_counter()  # after the compiling step
    losses.append(metrics["loss"])
  jax.block_until_ready(state)
  seconds = time.perf_counter() - started
  losses = [float(loss) for loss in launcher.to_host(losses)]
  next_batch = next(feed)
  with tempfile.TemporaryDirectory() as directory:
    manager = CheckpointManager(pathlib.Path(directory) / "checkpoints")
    saved = launcher.checkpoint_view(state)
    manager.save(steps, saved)
    abstract = abstract_like(saved, launcher.state_sharding)
    _, metrics = launcher.train_step(state, next_batch)  # donates `state`
    continued = float(launcher.to_host(metrics)["loss"])
    restored = launcher.place_state(manager.restore(abstract))
    _, metrics = launcher.train_step(restored, next_batch)
    resumed = float(launcher.to_host(metrics)["loss"])
    manager.close()
  window = max(1, steps // 10)
  return {"size": size, "batch": batch, "steps": steps,
          "first_loss": float(np.mean(losses[:window])), "last_loss": float(np.mean(losses[-window:])),
          "ecg_per_s": (steps - 1) * batch / seconds,
          "next_step_loss_continued": continued, "next_step_loss_restored": resumed,
          "restore_identical": continued == resumed}


def kmeans_on_device(n: int, dim: int, k: int) -> dict[str, Any]:
  """Fit time of our k-means (compilation excluded) on a synthetic mixture of `n` x `dim` vectors."""
  key_means, key_pick, key_noise = jax.random.split(jax.random.key(0), 3)
  means = jax.random.normal(key_means, (4 * k, dim))
  vectors = means[jax.random.randint(key_pick, (n,), 0, 4 * k)] + 0.5 * jax.random.normal(key_noise, (n, dim))
  vectors = np.asarray(vectors, np.float32)
  config = KMeansConfig(k=k, normalize=False)
  fit_kmeans(vectors[:max(k * 4, config.batch_size * 3)], config)  # compiles
  started = time.perf_counter()
  model = fit_kmeans(vectors, config)
  seconds = time.perf_counter() - started
  result = {"n": n, "dim": dim, "k": k, "seconds": seconds, "sse_per_vector": model.inertia / n}
  if (n, dim, k) == (1_000_000, 768, 500):
    result["vs_cpu"] = CPU_KMEANS_SECONDS / seconds
  return result


def run_device_check(settings: CheckSettings) -> dict[str, Any]:
  entries = parse_sweep(settings.sweep)
  started = time.monotonic()
  record: dict[str, Any] = {"date": time.strftime("%Y-%m-%d", time.gmtime()),
                            "environment": environment()}
  if settings.with_torch:
    record["parity"] = parity(settings.parity_size, settings.parity_batch)
  record["throughput"] = throughput(entries, settings.repeats, settings.with_torch,
                                    started + settings.time_limit_s)
  record["pretraining"] = pretraining_run(settings.pretrain_size, settings.pretrain_batch,
                                          settings.pretrain_steps)
  record["kmeans"] = kmeans_on_device(settings.kmeans_n, settings.kmeans_dim, settings.kmeans_k)
  record["seconds"] = time.monotonic() - started
  return record


def _number(value: Any, spec: str, scale: float = 1.0) -> str:
  return "" if value is None else format(value * scale, spec)


def format_report(record: dict[str, Any]) -> str:
  env = record["environment"]
  versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
  lines = [f"## Device check, {record['date']}: {env['device_count']} x {env['device_kind']} "
           f"({env['platform']})", "", versions, "",
           f"bf16 peak for MFU: {_number(env['peak_bf16_flops'], '.0f', 1e-12) or 'unknown'} TFLOP/s "
           f"(data sheet); measured bf16 matmul: {env['measured_bf16_matmul_flops'] / 1e12:.1f} TFLOP/s", ""]
  if "parity" in record:
    p = record["parity"]
    lines += [f"Parity with transformers ({p['size']}, batch {p['batch']}): float32 max |diff| "
              f"{p['fp32_max_abs_diff']:.2e} (<= {PARITY_FP32_ATOL}), bf16 relative error "
              f"{p['bf16_relative_error']:.2e} (<= {PARITY_BF16_RTOL}): {'ok' if p['ok'] else 'FAILED'}", ""]
  lines += ["| size | dtype | mode | batch/device | ECG/s | MFU | PyTorch ECG/s | vs PyTorch | "
            "device memory (GB) | compile (s) | status |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for row in record["throughput"]:
    lines.append(
        f"| {row['size']} | {row['dtype']} | {row['mode']} | {row['batch']} | "
        f"{_number(row.get('jax_ecg_per_s'), '.1f')} | {_number(row.get('jax_mfu'), '.1%')} | "
        f"{_number(row.get('torch_ecg_per_s'), '.1f')} | {_number(row.get('vs_torch'), '.2f')}"
        f"{'x' if row.get('vs_torch') else ''} | {_number(row.get('device_bytes'), '.1f', 1e-9)} | "
        f"{_number(row.get('compile_s'), '.0f')} | {row['status']} |")
  t = record["pretraining"]
  lines += ["", f"Pre-training run ({t['size']}, bf16, batch {t['batch']}, {t['steps']} steps): loss "
            f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}, {t['ecg_per_s']:.1f} ECG/s; checkpoint "
            f"restored on the device, next-step loss {t['next_step_loss_restored']:.6f} vs "
            f"{t['next_step_loss_continued']:.6f}: {'identical' if t['restore_identical'] else 'DIFFERENT'}"]
  k = record["kmeans"]
  vs_cpu = f", {k['vs_cpu']:.1f}x the CPU figure" if "vs_cpu" in k else ""
  lines += [f"k-means ({k['n']} x {k['dim']}, K {k['k']}): {k['seconds']:.1f} s{vs_cpu}",
            f"Whole check: {record['seconds']:.0f} s"]
  return "\n".join(lines)


def passed(record: dict[str, Any]) -> bool:
  """Parity within its bounds, the checkpoint round trip exact, the pre-training loss falling."""
  t = record["pretraining"]
  return (record.get("parity", {"ok": True})["ok"] and t["restore_identical"]
          and t["last_loss"] < t["first_loss"])


def main(settings: CheckSettings, out: str | os.PathLike) -> int:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the device
  record = run_device_check(settings)
  pathlib.Path(out).write_text(json.dumps(record, indent=2))
  print(format_report(record))
  print(f"\nJSON record -> {out}")
  return 0 if passed(record) else 1

"""`hubert-ecg-jax pretrain CONFIG WORKDIR [--config.KEY=VALUE ...]`: masked-prediction pre-training."""
from __future__ import annotations

import argparse
import signal
from typing import Any


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "pretrain", help="pre-train HuBERT-ECG by masked prediction of k-means units",
      description="Trains on records with targets (see `targets`) following a config file "
      "(configs/pretrain_{small,base,large}.py, configs/demo_pretrain.py; `file.py:2` selects "
      "iteration 2). Data-parallel over all devices; checkpoints, TensorBoard logs and the final "
      "model go to WORKDIR. Rerunning the same command resumes from the latest checkpoint. "
      "SIGTERM or Ctrl-C checkpoints and stops. Override any setting with --config.KEY=VALUE "
      "(e.g. --config.data.train_dir=RECORDS --config.train.total_steps=1000).")
  p.add_argument("config", help="config file or name (e.g. configs/pretrain_base.py or pretrain_base:2)")
  p.add_argument("workdir", help="run directory: checkpoints/, tensorboard/, model/, model_best/")
  _add_options(p)
  p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--config.KEY=VALUE",
                 help="config overrides, after the positional arguments")
  p.set_defaults(func=run)


def _add_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  p.add_argument("--coordinator", default=None,
                 help="multi-host: address HOST:PORT of process 0 (with --num-processes, --process-id)")
  p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
  p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")


def pretrain_from_config(config: Any, workdir: str) -> Any:
  """Builds the model, data pipeline and `Pretrainer` from a pre-training ConfigDict and runs it."""
  import jax

  from hubert_ecg_jax.config import HubertECGConfig
  from hubert_ecg_jax.data import records
  from hubert_ecg_jax.data.pipeline import PipelineConfig, make_eval_iterator, make_train_iterator
  from hubert_ecg_jax.pretrained import load_pretrained
  from hubert_ecg_jax.train.loop import LoopConfig, Pretrainer
  from hubert_ecg_jax.train.optimizer import OptimizerConfig
  from hubert_ecg_jax.train.state import next_iteration_params

  m, d, o, t = config.model, config.data, config.optimizer, config.train
  if not d.train_dir:
    raise ValueError("set the training records: --config.data.train_dir=RECORDS (written by `targets`)")
  manifest = records.read_manifest(d.train_dir)
  record_vocab = tuple(manifest.targets_info.get("vocab_sizes", ()))
  if record_vocab and tuple(m.vocab_sizes) != record_vocab:
    raise ValueError(f"config.model.vocab_sizes is {tuple(m.vocab_sizes)} but the records in "
                     f"{d.train_dir} have targets with K = {record_vocab}: set "
                     f"--config.model.vocab_sizes={','.join(map(str, record_vocab))} or use other records")
  if manifest.target_codebooks not in (0, len(m.vocab_sizes)):  # 0: the pipeline explains
    raise ValueError(f"the records in {d.train_dir} have {manifest.target_codebooks} target codebooks "
                     f"but config.model.vocab_sizes has {len(m.vocab_sizes)}: {tuple(m.vocab_sizes)}")
  model_config = HubertECGConfig.preset(
      m.size, m.downsampling, vocab_sizes=tuple(m.vocab_sizes), compute_dtype=m.compute_dtype,
      hidden_dropout=m.dropout, attention_dropout=m.dropout, activation_dropout=m.dropout,
      layerdrop=m.layerdrop, mask_time_prob=d.mask_prob, mask_time_length=d.mask_span,
      mask_time_min_masks=d.min_masks)
  processes = jax.process_count()
  if d.batch_size % processes:
    raise ValueError(f"data.batch_size {d.batch_size} does not split over {processes} processes")
  local_batch = d.batch_size // processes
  optimizer_config = OptimizerConfig(
      total_steps=t.total_steps, learning_rate=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, decay_all_params=o.decay_all_params,
      warmup_fraction=o.warmup_fraction, grad_clip_norm=o.grad_clip_norm or None)
  loop_config = LoopConfig(
      total_steps=t.total_steps, alpha=t.alpha, micro_batches=t.micro_batches, launcher=t.launcher,
      seed=t.seed, log_every=t.log_every, val_every=t.val_every,
      checkpoint_every=t.checkpoint_every, keep_last=t.keep_last, keep_best=t.keep_best,
      max_nonfinite_streak=t.max_nonfinite_streak, eval_batch_size=local_batch, progress=t.progress)
  pipeline = PipelineConfig(batch_size=local_batch, seed=d.seed, train_crop="first", eval_crop="first",
                            with_targets=True, mask_prob=d.mask_prob, mask_span=d.mask_span,
                            min_masks=d.min_masks, honour_padding=d.honour_padding,
                            shuffle_buffer=d.shuffle_buffer, model_config=model_config)
  init_params = None
  if m.init_from:  # the next iteration: previous backbone and projection, new label embeddings
    _, previous = load_pretrained(m.init_from)
    init_params = next_iteration_params(previous, model_config, jax.random.PRNGKey(t.seed))
  trainer = Pretrainer(model_config, optimizer_config, loop_config)
  val_batches = (lambda: make_eval_iterator(d.val_dir, pipeline)) if d.val_dir else None
  return trainer.run(workdir, make_train_iterator(d.train_dir, pipeline), val_batches,
                     init_params=init_params)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.experiment import load_config, split_config_args

  overrides, rest = split_config_args(args.overrides)
  if rest:  # options given after the positional arguments, among the overrides
    options = argparse.ArgumentParser(prog="hubert-ecg-jax pretrain", add_help=False)
    _add_options(options)
    given, unknown = options.parse_known_args(rest)
    if unknown:
      raise ValueError(f"unexpected arguments {unknown}: overrides look like --config.KEY=VALUE")
    for name, value in vars(given).items():
      if value is not None and value is not False:  # 0 (process 0) is a value
        setattr(args, name, value)
  config = load_config(args.config, overrides)
  if args.print_config:
    print(config)
    return 0
  multi_host = (args.coordinator, args.num_processes, args.process_id)
  if any(value is not None for value in multi_host):
    if any(value is None for value in multi_host):
      raise ValueError("multi-host needs all of --coordinator, --num-processes and --process-id")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs use NCCL
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  result = pretrain_from_config(config, args.workdir)
  if result.stop_reason == "finished":
    return 0
  if result.stop_reason == "nonfinite":
    return 1
  return 128 + signal.Signals[result.stop_reason].value  # stopped by a signal, checkpointed

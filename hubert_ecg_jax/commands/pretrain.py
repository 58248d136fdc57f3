"""`hubert-ecg-jax pretrain CONFIG WORKDIR [--config.KEY=VALUE ...]`: masked-prediction pre-training."""
from __future__ import annotations

import argparse
import signal


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
  from hubert_ecg_jax.train.loop import pretrain

  result = pretrain(config, args.workdir)
  if result.stop_reason == "finished":
    return 0
  if result.stop_reason == "nonfinite":
    return 1
  return 128 + signal.Signals[result.stop_reason].value  # stopped by a signal, checkpointed

"""`hubert-ecg-jax demo OUT`: the whole journey on a tiny model, each step the command a user would run.

synthetic (or your) ECGs -> preprocess -> iteration-1 feature sample -> k-means -> units -> pretrain
-> finetune (from the pre-trained backbone) -> evaluate -> predict one ECG with a plot.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import shutil
import time

SPLITS = ("train", "val", "test")


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "demo", help="run the whole journey on a tiny model in a few minutes (synthetic ECGs by default)",
      description="Generates labelled synthetic 12-lead ECGs (or takes --data DIR of WFDB records), "
      "then runs, as the commands a user would type: preprocess, features, cluster, targets, "
      "pretrain (tiny model), finetune (from the pre-trained backbone), evaluate (AUROC table, ROC "
      "plot) and predict (one ECG, with a plot). Every output lands under OUT.")
  p.add_argument("out", nargs="?", default="demo_out", help="output folder (default: demo_out)")
  p.add_argument("--data", help="a folder of WFDB records with '# Dx:' labels to use instead of "
                 "synthetic ECGs (split 60/20/20 by record name)")
  p.add_argument("--records", type=int, default=360,
                 help="synthetic ECGs to generate, split 60/20/20 (default 360)")
  p.add_argument("--pretrain-steps", type=int, default=300, help="pre-training steps (default 300)")
  p.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps (default 300)")
  p.add_argument("--k", type=int, default=50, help="k-means clusters, the iteration-1 vocabulary")
  p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
  p.add_argument("--overwrite", action="store_true", help="delete OUT first if it exists")
  p.set_defaults(func=run)


def _step(title: str, argv: list[str]) -> None:
  """Prints the equivalent command line, then runs it in this process."""
  from hubert_ecg_jax.cli import main

  print(f"\n== {title}\n$ hubert-ecg-jax {shlex.join(argv)}", flush=True)
  start = time.perf_counter()
  code = main(argv)
  if code != 0:
    raise RuntimeError(f"demo step '{title}' failed with exit code {code}")
  print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def _split_folder(source: pathlib.Path, out: pathlib.Path) -> dict[str, pathlib.Path]:
  """Links the records of `source` into train/val/test folders, 60/20/20 by sorted name."""
  from hubert_ecg_jax.data.readers import find_records

  headers = find_records(source, extensions=(".hea",))
  if len(headers) < 10:
    raise ValueError(f"--data needs at least 10 WFDB records, found {len(headers)} in {source}")
  cut = [int(len(headers) * 0.6), int(len(headers) * 0.8)]
  parts = {"train": headers[:cut[0]], "val": headers[cut[0]:cut[1]], "test": headers[cut[1]:]}
  folders = {}
  for split, files in parts.items():
    folder = out / "raw" / split
    folder.mkdir(parents=True)
    for header in files:
      for sibling in header.parent.glob(header.stem + ".*"):
        (folder / sibling.name).symlink_to(sibling.resolve())
    folders[split] = folder
  return folders


def run(args: argparse.Namespace) -> int:
  out = pathlib.Path(args.out)
  if out.exists():
    if not args.overwrite:
      raise FileExistsError(f"{out} exists: pass --overwrite to replace it, or choose another folder")
    shutil.rmtree(out)
  out.mkdir(parents=True)
  started = time.perf_counter()

  print("== data", flush=True)
  if args.data:
    raw = _split_folder(pathlib.Path(args.data), out)
    print(f"   records from {args.data}, split 60/20/20 into {out / 'raw'}")
  else:
    from hubert_ecg_jax.data.synthetic import write_wfdb_folder
    sizes = {"train": args.records * 3 // 5, "val": args.records // 5, "test": args.records // 5}
    raw = {}
    for index, split in enumerate(SPLITS):
      raw[split] = out / "raw" / split
      write_wfdb_folder(raw[split], sizes[split], seed=args.seed * 10 + index)
    print(f"   {args.records} synthetic 12-lead ECGs (6 rhythm/morphology classes) in {out / 'raw'}")

  records = {split: out / "records" / split for split in SPLITS}
  for split in SPLITS:
    _step(f"preprocess the {split} records", ["preprocess", str(raw[split]), str(records[split]),
                                             "--shards", "2", "--quiet"])
  _step("a sample of iteration-1 frame features", ["features", str(records["train"]),
                                                   str(out / "features"), "--feature-set", "mixed"])
  _step("k-means targets", ["cluster", "--features", str(out / "features"), "--k", str(args.k),
                            "--out", str(out / "kmeans")])
  kmeans = out / "kmeans" / f"kmeans_k{args.k}.npz"
  _step("the units of every record (the pre-training targets)", [
      "targets", str(records["train"]), str(out / "units"), "--kmeans", str(kmeans),
      "--feature-set", "mixed", "--quiet"])
  _step("pre-train a tiny HuBERT-ECG", [
      "pretrain", "demo_pretrain", str(out / "pretrain"),
      f"--config.data.train_dir={records['train']}", f"--config.data.train_units={out / 'units'}",
      f"--config.model.vocab_sizes={args.k}",
      f"--config.train.total_steps={args.pretrain_steps}"])
  _step("fine-tune from the pre-trained backbone", [
      "finetune", "finetune_demo", str(out / "finetune"), "--no-test",
      "--config.model.init=pretrained", f"--config.model.pretrained={out / 'pretrain' / 'model'}",
      f"--config.data.train={records['train']}", f"--config.data.val={records['val']}",
      f"--config.train.steps={args.finetune_steps}"])
  model = out / "finetune" / "best_model"
  _step("evaluate on the held-out test records", [
      "evaluate", str(model), str(records["test"]), "--out", str(out / "evaluation"),
      "--n-boot", "200", "--quiet"])
  example = sorted(raw["test"].glob("*.hea"))[0]
  _step("predict one ECG and plot it", ["predict", str(model), str(example), "--out",
                                        str(out / "prediction"), "--plot", "--quiet"]
        + ([] if args.data else ["--explain", "AF", "--explain-steps", "32"]))

  report = json.loads((out / "evaluation" / "metrics.json").read_text())
  macro_auroc = report["evaluation"]["metrics"]["macro"]["auroc"]
  minutes = (time.perf_counter() - started) / 60
  print(f"""
== done in {minutes:.1f} min: macro AUROC on the held-out test records {macro_auroc:.3f} (chance 0.5)

Outputs under {out}/:
  raw/                 the ECGs (WFDB)              records/          preprocessed TFRecord shards
  features/, kmeans/   a feature sample, k-means    units/            the records' k-means units
  pretrain/            checkpoints, tensorboard/, model/
  finetune/            best_model/, tensorboard/    evaluation/       metrics.json, metrics.csv, ROC and AUROC plots
  prediction/          predictions.csv and the plotted ECG (with the attribution heat of AF)

Try next:
  tensorboard --logdir {out}                                    # training curves
  hubert-ecg-jax embed {model} {records['test']} --out {out}/embeddings.npy
  hubert-ecg-jax evaluate {model} {records['test']} --out {out}/evaluation_I_II --leads I,II
                                                                # what losing 10 leads costs
  hubert-ecg-jax features {records['train']} {out}/features_it2 --model {out}/pretrain/model --layer 1
                                                                # iteration 2: features of the model
  hubert-ecg-jax convert PATH/TO/hubert-ecg-small DIR         # the released weights (see README)""")
  return 0 if macro_auroc > 0.5 else 1


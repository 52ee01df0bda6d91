"""The `imagerec` argument parser: every subcommand's flags, help text and worked examples."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from imagerec import __version__
from imagerec.data.decode import DEFAULT_MAX_PIXELS
from imagerec.utils import ImageRecError

EXAMPLES = """\
examples:
  imagerec demo                                          train on the built-in MNIST subset
  imagerec train ../shared/datasets/mnist --out runs/mnist
  imagerec train photos/ --model resnet18 --epochs 20 --augment standard
  imagerec train data.tar.gz --config my.yaml --out runs/exp1
  imagerec train --resume runs/exp1 --epochs 30         continue (and extend) a run
  torchrun --nproc_per_node 2 -m imagerec train photos/ --batch-size 64   DDP: 2 processes x 64 per step
  imagerec eval runs/mnist --split test --format json
  imagerec robustness runs/mnist --limit 300            accuracy under corruptions and FGSM/PGD attacks
  imagerec predict runs/mnist digits/*.png --top-k 3
  imagerec check photos/ --html report.html            find bad, duplicate and leaking images
  imagerec check photos/ --fix quarantine quarantined/  move the broken files out (undo with --undo)
  imagerec ingest photos/ --dataset pets                 store images (SQLite, or --db postgresql://...)
  imagerec train store:pets --out runs/pets
  imagerec runs --compare 1 2
  imagerec export runs/mnist --format onnx --int8 --out bundles/mnist
  imagerec predict bundles/mnist digits/                runs the fastest runtime that passed parity
  imagerec benchmark bundles/mnist
  imagerec serve runs/mnist --port 8000                 then open http://127.0.0.1:8000/
  imagerec models
"""

TRAIN_HELP = {
    "model": "architecture: a registry name (see 'imagerec models') or timm/<name>; auto = cnn for <=64 px, else resnet18",
    "pretrained": "initial weights: a .safetensors file, a run directory, or hf-hub:ORG/NAME",
    "freeze_backbone": "train only the classifier head",
    "backbone_lr_scale": "learning-rate multiplier for everything but the head (discriminative fine-tuning)",
    "epochs": "number of epochs (may be raised when resuming; with --time-limit, the most to plan)",
    "time_limit": "train for about this long from the start of the command (data loading included), in minutes "
                  "or with a unit (20, 20m, 90s, 1.5h): "
                  "the epoch count and schedule are planned from the measured speed, and training stops at the limit "
                  "(the final test evaluation comes after it; 0 = off)",
    "optimizer": "sgd | adam | adamw | adagrad",
    "lr": "peak learning rate (default per optimizer: sgd 0.02, adam 1e-3, adamw 3e-3, adagrad 1e-2)",
    "weight_decay": "weight decay (default per optimizer)",
    "schedule": "onecycle | cosine (with warm-up) | constant | triangle (airbench's: up, then down to 0.07)",
    "label_smoothing": "label smoothing for cross-entropy",
    "grad_clip": "clip the gradient norm to this value (0 = off)",
    "augment": "augmentation preset: none | light | standard | strong",
    "hflip": "random horizontal flips (default: on for standard/strong)",
    "mixup": "mixup alpha (0 = off; default: 0.2 with --augment strong, else off); on multi-label data it mixes the "
             "label sets too",
    "cutmix": "cutmix alpha (0 = off; default: 1.0 with --augment strong, else off)",
    "image_size": "model input size in pixels (default: native size up to 64 px, else 224)",
    "channels": "1 or 3 (default: 1 when every image is grayscale)",
    "ops": "preprocessing op, repeatable: median[:k] gaussian[:sigma] equalize clahe[:clip] grayscale sobel canny[:lo:hi]",
    "val_fraction": "fraction of train held out for validation when the data has no val split",
    "seed": "random seed: the whole run is a function of it",
    "deterministic": "use deterministic algorithms only (slower on GPU)",
    "precision": "auto (bf16 on CPUs with AVX512-BF16/AMX, AMP on CUDA) | fp32 | bf16 | fp16",
    "device": "auto | cpu | cuda | cuda:N",
    "recipe": "default | fast: fast = airbench-style net and schedule for small images (MNIST/CIFAR-like); "
              "it fills in every setting you leave at its default",
    "norm_lr_scale": "learning-rate multiplier for normalisation-layer shifts (the fast recipe uses 64)",
    "lookahead": "lookahead weight averaging every 5 steps (airbench's schedule)",
    "translate": "random translation in pixels for small images (default: size/8)",
    "cutout": "blank one random square of this side (pixels) per training image, filled with the mean colour (0 = off)",
    "channels_last": "channels_last memory format (faster convolutions)",
    "workers": "decode worker processes (-1 = auto)",
    "cache": "auto | ram | none: decode the dataset once into RAM when it fits",
    "early_stopping": "stop after this many epochs without improvement of --metric (0 = off; needs validation images)",
    "warmup_epochs": "epochs of learning-rate warm-up, fractions allowed (default: the schedule's own: onecycle 25%% "
                     "of the steps, triangle 23%%, cosine/constant 1 epoch)",
    "metric": "validation metric for the best checkpoint and early stopping: auto (macro_f1 on imbalanced data, "
              "map for multi-label, else accuracy) | accuracy | loss | macro_f1 | balanced_accuracy | map",
    "balance": "class imbalance: auto (class weights when the largest/smallest class ratio > 3) | weights | sampler | none",
    "max_pixels": "refuse images with more pixels than this (decompression bombs)",
    "save_every_steps": "also save the last checkpoint every N steps (0 = once per epoch)",
    "num_threads": "CPU threads (0 = one per available core)",
    "limit_train": "use only N training images (a seeded subset, stratified by class; 0 = all)",
    "sync_bn": "under torchrun on CUDA: SyncBatchNorm (statistics over all processes' batches); a no-op in one process",
}


def _minutes(value: str) -> float:
    from imagerec.config import parse_minutes

    try:
        return parse_minutes(value)
    except ImageRecError as e:
        raise argparse.ArgumentTypeError(str(e).replace("time_limit=", "")) from e


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from imagerec.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "out") or f.metadata.get("internal"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": TRAIN_HELP.get(f.name, "")}
        if f.name == "time_limit":
            p.add_argument(flag, type=_minutes, metavar="DURATION", **kw)
        elif "bool" in kind:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif "list" in kind:
            p.add_argument(flag.rstrip("s") if f.name == "ops" else flag, action="append", metavar="OP", **kw)
        elif "float" in kind:
            p.add_argument(flag, type=float, metavar="X", **kw)
        elif "int" in kind:
            p.add_argument(flag, type=int, metavar="N", **kw)
        else:
            p.add_argument(flag, type=str, metavar="S", **kw)


DATA_DIR_HELP = ("folder holding named datasets as DIR/mnist/, DIR/cifar10/, ... "
                 "(searched before $IMAGEREC_DATA and ~/.cache/imagerec/datasets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagerec", description="Train, evaluate and run image classifiers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imagerec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a classifier", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", help="image folder, archive, manifest, IDX/CIFAR folder or dataset name")
    p.add_argument("--out", default=argparse.SUPPRESS, help="run directory (default runs/exp, runs/exp2, ...)")
    p.add_argument("--config", help="YAML file of training settings (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    p.add_argument("--db", help="the store: where store:NAME data is read from and the run is recorded "
                   "(default $IMAGEREC_DB or ~/.local/share/imagerec/store.db)")
    p.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    _add_train_flags(p)

    p = sub.add_parser("eval", help="evaluate a trained run on a data split")
    p.add_argument("run", help="run directory")
    p.add_argument("data", nargs="?", help="data to evaluate on (default: the data the run was trained on; "
                   "DATA without a test split, e.g. a plain <class>/<image> folder, is evaluated whole)")
    p.add_argument("--split", help="train | val | test | all (default: test, or all of a DATA without test images; "
                   "--split test of a DATA that names its splits (split folders, a manifest split column, a store dataset, IDX/CIFAR files) but has no test images is refused)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype (default: the run's own training precision, so eval repeats its numbers)")
    p.add_argument("--db", help="the store: where store:NAME data is read from and the evaluation is recorded")
    p.add_argument("--out", metavar="DIR", help="folder for eval-<split>.json and confusion-<split>.png (default: the "
                   "run directory; an evaluation saved elsewhere is not recorded in the store)")
    p.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)

    p = sub.add_parser("robustness", help="accuracy under common corruptions (CIFAR-10-C style) and FGSM/PGD attacks")
    p.add_argument("run", help="run directory (corruptions and attacks) or exported bundle folder (corruptions only)")
    p.add_argument("data", nargs="?", help="data to evaluate on (default: the data the run was trained on; "
                   "DATA without a test split, e.g. a plain <class>/<image> folder, is evaluated whole)")
    p.add_argument("--split", help="train | val | test | all (default: test, or all of a DATA without test images; "
                   "--split test of a DATA that names its splits (split folders, a manifest split column, a store dataset, IDX/CIFAR files) but has no test images is refused)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="a stratified, seeded subset of N images (0 = all; default 300: under a minute for a small CNN on 2 cores)")
    p.add_argument("--corruptions", default="all", help="all | none | comma list, e.g. gaussian_noise,fog,jpeg_compression")
    p.add_argument("--severities", default="1..5", help="severities 1..5: a range 1..5, one value 3, or a list 1,3,5")
    p.add_argument("--attacks", default="fgsm,pgd", help="fgsm,pgd | fgsm | pgd | none (run directories only)")
    p.add_argument("--eps", help="L-inf budgets as fractions of the pixel range, e.g. 2/255,8/255 "
                   "(default: 0.1,0.2,0.3 for grayscale <= 64 px, else 1/255,2/255,4/255,8/255)")
    p.add_argument("--seed", type=int, default=0, help="seed for the subset, the corruption noise and PGD's random start")
    p.add_argument("--db", help="store URL (SQLite path or postgresql://...) that store:NAME data is read from (default $IMAGEREC_DB)")
    p.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("predict", help="classify images, folders or globs")
    p.add_argument("run", help="run directory or exported bundle folder")
    p.add_argument("paths", nargs="+", help="image files, folders, glob patterns, store:NAME, or videos (mp4/avi/mkv/mov/webm)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--format", choices=("table", "json", "csv", "parquet"), default="table")
    p.add_argument("--output", help="write results to this file instead of stdout (needed for parquet)")
    p.add_argument("--resume", action="store_true", help="skip images already predicted in --output")
    p.add_argument("--every", type=int, default=1, metavar="N", help="videos: classify every N-th frame")
    p.add_argument("--db", help="store URL (SQLite path or postgresql://...) that store:NAME data is read from (default $IMAGEREC_DB)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse images with more pixels than this (default: the run's own --max-pixels, as eval uses)")

    p = sub.add_parser("check", help="find corrupt, odd, duplicate and leaking images before training")
    p.add_argument("data", nargs="?", help="any DATA that train accepts")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--html", metavar="FILE", help="also write an HTML report with thumbnails of the problem images")
    p.add_argument("--fix", nargs=2, metavar=("quarantine", "DIR"), help="move problem files (errors) to DIR; never deletes")
    p.add_argument("--undo", metavar="MANIFEST", help="move quarantined files back (DIR/quarantine-manifest.json)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="report images above this many pixels as bombs")
    p.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    p.add_argument("--db", help="store URL (SQLite path or postgresql://...) that store:NAME data is read from (default $IMAGEREC_DB)")

    p = sub.add_parser("ingest", help="add images from any DATA source to the image store")
    p.add_argument("source", help="any DATA that train accepts")
    p.add_argument("--dataset", required=True, help="dataset name in the store (then train on store:NAME)")
    p.add_argument("--split", help="ingest only this split (or put a split-less source under it)")
    p.add_argument("--update", action="store_true",
                   help="give images already stored with other labels/split the source's (default: keep and report them)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help=f"skip images with more pixels than this as possible decompression bombs (default {DEFAULT_MAX_PIXELS:,}); "
                        "training on them then needs the same --max-pixels")
    p.add_argument("--db", help="store URL: a SQLite path or postgresql://... (default $IMAGEREC_DB)")
    p.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)

    p = sub.add_parser("datasets", help="list the store's datasets with counts per split and label")
    p.add_argument("--db")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("runs", help="list recorded training runs, or compare some side by side")
    p.add_argument("--db")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--compare", type=int, nargs="+", metavar="ID", help="run ids to compare")

    p = sub.add_parser("export-dataset", help="write a stored dataset back to an image folder (byte-identical)")
    p.add_argument("name", help="store:NAME or NAME")
    p.add_argument("out", help="an empty or new folder")
    p.add_argument("--db")

    p = sub.add_parser("export", help="export a run to a parity-gated ONNX/TorchScript bundle folder")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--int8", action="store_true", help="also quantize to int8 (static, calibrated on training images)")
    p.add_argument("--parity-images", type=int, default=256, help="validation images for the parity check")
    p.add_argument("--max-drop", type=float, default=1.0, help="refuse int8 if accuracy drops by more points than this")
    p.add_argument("--min-agreement", type=float, default=0.97, metavar="F",
                   help="refuse int8 if its top-1 label agrees with fp32's on fewer than this fraction of images")
    p.add_argument("--data", help="images for parity/calibration (default: the run's own data)")
    p.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    p.add_argument("--db", help="store URL (SQLite path or postgresql://...) that store:NAME data is read from (default $IMAGEREC_DB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")

    p = sub.add_parser("benchmark", help="latency and throughput of every runtime available for a run or bundle")
    p.add_argument("source", help="run directory or bundle folder")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=2.0, help="time per runtime and batch size")

    p = sub.add_parser("serve", help="HTTP API + web page for one or more runs/bundles (micro-batched)")
    p.add_argument("models", nargs="+", help="PATH, NAME=PATH or NAME@VERSION=PATH (run dir or bundle); the first is the default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="largest micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest wait to fill a micro-batch; the server waits less where the model's measured "
                        "per-batch overhead is smaller (shown in GET /v1/models)")
    p.add_argument("--fixed-wait", action="store_true",
                   help="always wait up to --max-wait-ms for a micro-batch to fill, whatever the measured cost "
                        "and even when no other request is on its way")
    p.add_argument("--queue-size", type=int, default=256, help="queued images before answering 503")
    p.add_argument("--instances", type=int, default=0,
                   help="model instances per version, sharing the cores (default: 2 for a bundle on 2+ cores, else 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port, each with its own copy of the models and pinned to "
                        "its share of the cores (README: Serving); admin actions reach all of them")
    p.add_argument("--api-key-file", help="file with one API key per line; keys are then required")
    p.add_argument("--max-body-mb", type=float, default=20.0)
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout")
    p.add_argument("--cors-origin", action="append", help="allowed CORS origin (repeatable); off by default")
    p.add_argument("--db", help="record predictions in this store")

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'res*'")

    p = sub.add_parser("demo", help="train and evaluate on the built-in MNIST subset (no network needed)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=4)
    return parser

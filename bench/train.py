"""Training-speed bench (issue 6): one JSON line per result, each against a baseline run in the
same invocation, on the machine it runs on.

    python bench/train.py throughput          # (a) ResNet-18 step vs stock eager fp32 and the matmul peak
    python bench/train.py mnist --runs 3      # (b) --recipe fast vs the pytorch/examples MNIST recipe
    python bench/train.py cifar --runs 3      # (c) --recipe fast vs the seed recipe, CIFAR-10-jpg
    python bench/train.py cifar --train-args "--model airbench94 --time-limit 19"   # (c) with more settings
    python bench/train.py loader              # (d) our loader vs ImageFolder + DataLoader, RSS per epoch
    python bench/train.py throughput --device cuda   # any job on a GPU, baselines on the same GPU
                                                     # (scripts/gpu_check.sh runs them all there)

Precision: the trainer uses bf16 autocast only where the CPU has native bf16 (AVX512-BF16/AMX)
and fp32 elsewhere; the "peak" here is the matmul peak of that same precision, so the ratio
means the same thing on either kind of machine. Every line carries the CPU and its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CIFAR = SHARED / "cifar10-jpg.tar.gz"
MNIST = SHARED / "mnist"
DEVICE = torch.device("cpu")  # --device: where every case of the job runs, baselines included


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# --- machine facts ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from imagerec.utils import cpu_supports_bf16

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"cpu": model or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
             "native_bf16": cpu_supports_bf16(), "torch": torch.__version__, "device": str(DEVICE)}
    if DEVICE.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(DEVICE)
    return facts


def train_dtype() -> torch.dtype:
    from imagerec.utils import resolve_precision

    return resolve_precision("auto", DEVICE) or torch.float32


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 6) -> float:
    """GFLOP/s of a large square matmul in `dtype`: the compute ceiling for training steps."""
    if DEVICE.type == "cuda":
        n, reps = 8192, 20
    a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
    a @ b
    best = 0.0
    for _ in range(3):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_cli(args: list[str], tmp: Path) -> tuple[dict[str, Any], float]:
    """Run `imagerec ARGS --out tmp/run` in a fresh process and cache; (metrics.json, wall seconds)."""
    out = tmp / "run"
    env = dict(os.environ, IMAGEREC_CACHE=str(tmp / "cache"), IMAGEREC_HOME=str(tmp / "home"))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imagerec.cli", *args, "--device", str(DEVICE), "--out", str(out)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"imagerec {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text()), wall


def fast_recipe_runs(job: str, data: Path, runs: int, first_seed: int, target: float, target_s: float,
                     extra: list[str]) -> dict[str, Any]:
    accs, walls, trains = [], [], []
    for seed in range(first_seed, first_seed + runs):
        with tempfile.TemporaryDirectory() as tmp:
            m, wall = run_cli(["train", str(data), "--recipe", "fast", "--seed", str(seed), *extra], Path(tmp))
        accs.append(m["test"]["accuracy"])
        walls.append(wall)
        trains.append(m["train_seconds"])
        emit({"bench": "train", "job": job, "case": "fast", "seed": seed, "test_accuracy": round(accs[-1], 4),
              "wall_s": round(wall, 1), "train_s": m["train_seconds"], "epochs": m["epochs_run"]})
    (acc, acc_sd), (wall, wall_sd) = mean_std(accs), mean_std(walls)
    return {"bench": "train", "job": job, "case": "fast-summary", "runs": runs,
            "command": " ".join(["imagerec train", str(data.relative_to(SHARED.parent.parent)), "--recipe fast", *extra]),
            "test_accuracy_mean": round(acc, 4), "test_accuracy_std": round(acc_sd, 4),
            "min_accuracy": round(min(accs), 4), "wall_s_mean": round(wall, 1), "wall_s_std": round(wall_sd, 1),
            "train_s_mean": round(statistics.fmean(trains), 1),
            "target_accuracy": target, "target_wall_s": target_s,
            "pass": acc >= target and min(accs) >= target and wall <= target_s}


# --- (c) CIFAR-10 -----------------------------------------------------------------------------


class SeedCNN(nn.Module):
    """The seed recipe's net: three conv(3x3)-ReLU-maxpool stages 32-64-128, fc 512, fc 10."""

    def __init__(self) -> None:
        super().__init__()
        convs = []
        for i, o in ((3, 32), (32, 64), (64, 128)):
            convs += [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*convs)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def image_folder_loaders(root: Path, batch_size: int, workers: int, normalize: tuple) -> tuple:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*normalize)])
    train = datasets.ImageFolder(str(root / "train"), tf)
    test = datasets.ImageFolder(str(root / "test"), tf)
    kw = {"num_workers": workers, "persistent_workers": workers > 0}
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, **kw),
            torch.utils.data.DataLoader(test, batch_size=1000, **kw))


@torch.no_grad()
def loader_accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x.to(DEVICE)).argmax(1).cpu() == y).sum())
        total += len(y)
    return right / total


def cifar_seed_recipe(seed: int) -> dict[str, Any]:
    """The plain tutorial loop: torchvision ImageFolder + DataLoader, SGD lr 0.01 momentum 0.9,
    batch 64, 10 epochs, fp32 eager, no augmentation. Timed from the archive to the test accuracy."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(CIFAR) as tar:
            tar.extractall(tmp, filter="data")
        torch.manual_seed(seed)
        norm = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
        train_loader, test_loader = image_folder_loaders(Path(tmp) / "cifar10-jpg", 64, 2, norm)
        model = SeedCNN().to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(10):
            model.train()
            for x, y in train_loader:
                x, y = x.to(DEVICE), y.to(DEVICE)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        acc = loader_accuracy(model, test_loader)
    return {"bench": "train", "job": "cifar10", "case": "seed-recipe", "seed": seed, "test_accuracy": round(acc, 4),
            "wall_s": round(time.perf_counter() - t, 1), "epochs": 10}


def bench_cifar(runs: int, first_seed: int, baseline_runs: int, extra: list[str]) -> None:
    summary = fast_recipe_runs("cifar10", CIFAR, runs, first_seed, 0.93, 20 * 60, extra)
    base = [cifar_seed_recipe(s) for s in range(baseline_runs)]
    for b in base:
        emit(b)
    if base:
        summary["seed_recipe_accuracy_mean"] = round(statistics.fmean(b["test_accuracy"] for b in base), 4)
        summary["seed_recipe_wall_s_mean"] = round(statistics.fmean(b["wall_s"] for b in base), 1)
        summary["speedup_vs_seed_recipe"] = round(summary["seed_recipe_wall_s_mean"] / summary["wall_s_mean"], 2)
    emit({**summary, **machine()})


# --- (b) MNIST ------------------------------------------------------------------------------


class ExamplesNet(nn.Module):
    """pytorch/examples mnist/main.py: conv32-conv64-maxpool-dropout-fc128-dropout-fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def mnist_examples_recipe(seed: int, target: float) -> dict[str, Any]:
    """pytorch/examples' recipe as written (torchvision MNIST, ToTensor + Normalize, batch 64,
    Adadelta lr 1.0, StepLR gamma 0.7, test after each epoch), stopped at the first epoch whose
    test accuracy reaches the target. The one-off gunzip into torchvision's layout is not timed."""
    import gzip
    import shutil

    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for gz in MNIST.glob("*.gz"):
            with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        t = time.perf_counter()
        torch.manual_seed(seed)
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train = torch.utils.data.DataLoader(datasets.MNIST(tmp, train=True, transform=tf), batch_size=64, shuffle=True)
        test = torch.utils.data.DataLoader(datasets.MNIST(tmp, train=False, transform=tf), batch_size=1000)
        model = ExamplesNet().to(DEVICE)
        opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        acc, epoch = 0.0, 0
        while acc < target and epoch < 14:
            model.train()
            for x, y in train:
                x, y = x.to(DEVICE), y.to(DEVICE)
                opt.zero_grad()
                F.nll_loss(model(x), y).backward()
                opt.step()
            sched.step()
            epoch += 1
            acc = loader_accuracy(model, test)
        wall = time.perf_counter() - t
    return {"bench": "train", "job": "mnist", "case": "pytorch-examples", "seed": seed,
            "test_accuracy": round(acc, 4), "epochs": epoch, "wall_s": round(wall, 1)}


def mnist_fast(seed: int) -> dict[str, Any]:
    """`imagerec.train(..., recipe="fast")` in this process (as the baseline runs in this process):
    from the .gz files to the test accuracy, checkpoints, report and confusion figure included."""
    from imagerec import train

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = train(data=str(MNIST), out=str(Path(tmp) / "run"), recipe="fast", seed=seed, device=str(DEVICE))
        wall = time.perf_counter() - t
    return {"bench": "train", "job": "mnist", "case": "fast", "seed": seed, "test_accuracy": round(r.metrics["test"]["accuracy"], 4),
            "epochs": r.metrics["epochs_run"], "wall_s": round(wall, 1), "train_s": r.metrics["train_seconds"]}


def bench_mnist(runs: int, baseline_runs: int) -> None:
    target = 0.99
    fast = [mnist_fast(s) for s in range(runs)]
    base = [mnist_examples_recipe(s, target) for s in range(baseline_runs)]
    for row in fast + base:
        emit(row)
    (acc, acc_sd), (wall, wall_sd) = mean_std([r["test_accuracy"] for r in fast]), mean_std([r["wall_s"] for r in fast])
    base_wall = statistics.fmean(r["wall_s"] for r in base)
    emit({"bench": "train", "job": "mnist", "case": "summary", "runs": runs, "baseline_runs": baseline_runs,
          "fast_accuracy_mean": round(acc, 4), "fast_accuracy_std": round(acc_sd, 4),
          "fast_min_accuracy": round(min(r["test_accuracy"] for r in fast), 4),
          "fast_wall_s_mean": round(wall, 2), "fast_wall_s_std": round(wall_sd, 2),
          "baseline_accuracy_mean": round(statistics.fmean(r["test_accuracy"] for r in base), 4),
          "baseline_wall_s_mean": round(base_wall, 1), "speedup": round(base_wall / wall, 1),
          "target": "fast >= 99.0% in <= 10 s and >= 8x faster than the baseline",
          "pass": min(r["test_accuracy"] for r in fast) >= target and wall <= 10 and base_wall / wall >= 8
          and all(r["test_accuracy"] >= target for r in base), **machine()})


# --- (a) ResNet-18 step throughput --------------------------------------------------------------


def resnet_step_rate(fast: bool, compile_: bool = False, batch: int = 128, steps: int = 6) -> tuple[float, float]:
    """(img/s, training FLOPs per image) of a ResNet-18 (CIFAR stem) step on random 32x32 data.
    fast = imagerec's trainer settings (channels_last, autocast dtype resolved for this CPU,
    foreach SGD; bench_throughput also turns on the trainer's retain_freed_memory before the fast
    runs); stock = NCHW fp32 eager with torch.optim.SGD's defaults."""
    from torch.utils.flop_counter import FlopCounterMode

    from imagerec.config import TrainConfig
    from imagerec.engine.optim import create_optimizer
    from imagerec.engine.pipeline import autocast
    from imagerec.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=3, img_size=32).to(DEVICE)
    x, y = torch.randn(batch, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (batch,), device=DEVICE)
    dtype = train_dtype() if fast else torch.float32
    amp = dtype if dtype != torch.float32 else None
    if fast:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        opt = create_optimizer(model, TrainConfig(optimizer="sgd"), DEVICE)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def step() -> None:
        with autocast(DEVICE, amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    run = torch.compile(step) if compile_ else step
    for _ in range(3):
        run()
    with FlopCounterMode(display=False) as counter:
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    return batch * steps / (time.perf_counter() - t), counter.get_total_flops() / batch


def bench_throughput(runs: int) -> None:
    from imagerec.utils import retain_freed_memory

    dtype = train_dtype()
    batch, steps = (128, 6) if DEVICE.type == "cpu" else (512, 50)  # a GPU needs a larger batch to fill
    peaks, rates = [], {"stock": [], "fast": [], "fast+compile": []}
    flops = 0.0
    # Stock first, with the C library's default allocator settings, as a plain script runs; then
    # the trainer's retain_freed_memory (no page faults per step), which stays on for the process.
    for phase in (("stock",), ("fast", "fast+compile")):
        if phase[0] != "stock":
            retain_freed_memory()
        for _ in range(runs):
            peaks.append(matmul_peak(dtype))
            for case in phase:
                rate, flops = resnet_step_rate(case != "stock", case.endswith("compile"), batch, steps)
                rates[case].append(rate)
    peak = statistics.fmean(peaks)
    row = {"bench": "train", "job": "resnet18-throughput", "runs": runs, "batch": batch, "image": "3x32x32",
           "train_dtype": str(dtype).replace("torch.", ""), "gflop_per_image": round(flops / 1e9, 3),
           "matmul_peak_gflops": round(peak, 1)}
    for case, values in rates.items():
        m, sd = mean_std(values)
        row[f"{case}_img_per_s"] = round(m, 1)
        row[f"{case}_img_per_s_std"] = round(sd, 1)
        row[f"{case}_fraction_of_peak"] = round(m * flops / 1e9 / peak, 3)
    row["fast_vs_stock"] = round(row["fast_img_per_s"] / row["stock_img_per_s"], 2)
    row["target"] = "fast >= 0.80 of the matmul peak"
    row["pass"] = row["fast_fraction_of_peak"] >= 0.8
    emit({**row, **machine()})


# --- (d) loader ----------------------------------------------------------------------------------


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process and its children (DataLoader workers), MB."""
    pids = [pid or os.getpid()]
    try:
        pids += [int(c) for c in Path(f"/proc/{pids[0]}/task/{pids[0]}/children").read_text().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def bench_loader(epochs: int, baseline_epochs: int) -> None:
    """Images/s delivered to the training step (augmented uint8 -> normalised float batches),
    ours (decode once into a RAM tensor, batch augmentation) vs ImageFolder + DataLoader (decode
    and augment per item, 2 workers), on the same 50k CIFAR-10 JPEG training images."""
    from torchvision import transforms

    from imagerec.config import PreprocessConfig
    from imagerec.data import read_data
    from imagerec.data.loader import ImageLoader, targets_tensor
    from imagerec.transforms import BatchAugment, base_transform, normalize_batch

    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(CIFAR) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp) / "cifar10-jpg"
        # ours
        rss0 = rss_mb()
        t = time.perf_counter()
        spec = read_data(str(root))
        items = spec.splits["train"]
        pre = PreprocessConfig(32, 3, mean, std, 32, tuple(spec.class_names))
        loader = ImageLoader(items, spec.arrays, 3, 32, base_transform(pre), 512, targets_tensor(items, 10, False),
                             shuffle=True, cache="ram")
        build = time.perf_counter() - t
        ours, rss, with_cutout = [], [], []
        for cutout, rates in ((0, ours), (12, with_cutout)):  # airbench's translate + flip, then also cutout
            aug = BatchAugment(pre, "light", True, 0.0, 0.0, translate=2, cutout=cutout)
            for e in range(epochs):
                t, n = time.perf_counter(), 0
                for b in loader.epoch(e):
                    x = normalize_batch(aug.geometric(b.x), mean, std)
                    n += len(x)
                rates.append(n / (time.perf_counter() - t))
                if not cutout:
                    rss.append(round(rss_mb() - rss0, 1))
        # torchvision
        from torchvision import datasets

        tf = transforms.Compose([transforms.RandomCrop(32, padding=2), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(mean, std)])
        ds = datasets.ImageFolder(str(root / "train"), tf)
        dl = torch.utils.data.DataLoader(ds, batch_size=512, shuffle=True, num_workers=2, persistent_workers=True)
        theirs, their_rss = [], []
        for _ in range(baseline_epochs):
            t, n = time.perf_counter(), 0
            for x, _y in dl:
                n += len(x)
            theirs.append(n / (time.perf_counter() - t))
            their_rss.append(round(rss_mb(), 1))
    emit({"bench": "train", "job": "loader", "images": len(items), "batch": 512,
          "ours_first_pass_s": round(build, 1), "ours_img_per_s_per_epoch": [round(v) for v in ours],
          "ours_rss_growth_mb_per_epoch": rss, "ours_rss_growth_epoch10_minus_epoch1_mb": round(rss[-1] - rss[0], 1),
          "ours_with_cutout12_img_per_s_per_epoch": [round(v) for v in with_cutout],
          "imagefolder_img_per_s_per_epoch": [round(v) for v in theirs], "imagefolder_rss_mb": their_rss,
          "ours_first_pass_img_per_s": round(len(items) / build),
          "steady_speedup": round(statistics.fmean(ours[1:]) / statistics.fmean(theirs), 1),
          "ten_epoch_speedup": round((epochs * len(items) / (build + sum(len(items) / v for v in ours)))
                                     / statistics.fmean(theirs), 1), **machine()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=("throughput", "mnist", "cifar", "loader"))
    p.add_argument("--runs", type=int, default=3, help="runs of the fast recipe (seeds 0..N-1)")
    p.add_argument("--first-seed", type=int, default=0, help="cifar: seeds first..first+runs-1")
    p.add_argument("--baseline-runs", type=int, default=1, help="runs of the baseline recipe")
    p.add_argument("--train-args", default="", help="cifar: more `imagerec train` flags for the fast-recipe runs")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where the job runs, baselines included")
    args = p.parse_args()
    global DEVICE
    from imagerec.utils import resolve_device

    DEVICE = resolve_device(args.device)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    jobs = {
        "cifar": lambda: bench_cifar(args.runs, args.first_seed, args.baseline_runs, shlex.split(args.train_args)),
        "mnist": lambda: bench_mnist(args.runs, args.baseline_runs),
        "throughput": lambda: bench_throughput(args.runs),
        "loader": lambda: bench_loader(10, 2),
    }
    jobs[args.job]()


if __name__ == "__main__":
    main()

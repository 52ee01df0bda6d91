"""Parity: does the exported model compute what the PyTorch model computes, on real images?

The reference is eager PyTorch in fp32 (no autocast) on the same uint8 batches, normalised by
`transforms.normalize_batch` (independently of the exported graph's own normalisation, so a wrong
mean/std inside the graph is caught too). Images come from the run's own validation split,
re-created with the run's val_fraction/seed and read through `create_eval_loader`: the exact
eval preprocessing.

Gates:
- fp32: top-1 agreement >= 99.5% and max |dprob| <= 1e-3.
- bf16 (OpenVINO running the fp32 graph in bf16, offered beside an fp32 export): top-1 agreement
  >= 99.5%, as for fp32, and max |dprob| <= 1e-2 (bf16 keeps 8 bits of mantissa, ~3 significant
  digits). `max_drop` does not loosen it: an accuracy-only gate passes even when predictions flip,
  as long as as many flip right as wrong.
- int8: accuracy may drop by at most `max_drop` points (on labelled images; without labels the
  fp32 reference's top-1 stands in for the labels, so the drop is 100 - agreement%), and top-1
  agreement must be at least `min_agreement` (default 97%): accuracy alone passed an int8 runtime
  that agreed with its fp32 model on 78% of images (a barely trained model whose flips cancelled).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from imagerec.config import PreprocessConfig
from imagerec.data import DataSpec, display_name, read_data, split_train_val
from imagerec.data.decode import DEFAULT_MAX_PIXELS
from imagerec.engine.evaluate import create_eval_loader, remap_items
from imagerec.export.runtime import Runtime
from imagerec.transforms import normalize_batch
from imagerec.utils import ImageRecError, check_count

FP32_MIN_AGREEMENT = 0.995
FP32_MAX_ABS_DIFF = 1e-3
BF16_MIN_AGREEMENT = FP32_MIN_AGREEMENT
BF16_MAX_ABS_DIFF = 1e-2
INT8_MIN_AGREEMENT = 0.97
# Agreement-gated precisions: (min top-1 agreement, max |dprob|); any other (int8) is gated on accuracy drop.
AGREEMENT_GATES = {"fp32": (FP32_MIN_AGREEMENT, FP32_MAX_ABS_DIFF), "bf16": (BF16_MIN_AGREEMENT, BF16_MAX_ABS_DIFF)}


@dataclass
class ImageSet:
    """Preprocessed images for parity or calibration: uint8 (N, C, H, W), targets, source names."""

    x: torch.Tensor
    targets: torch.Tensor | None
    names: list[str]
    origin: str
    split: str = ""


def _evenly(n_total: int, n: int) -> list[int]:
    """`n` indices spread over the whole list, so a class-sorted listing still gives every class."""
    if n >= n_total:
        return list(range(n_total))
    return sorted(set(np.linspace(0, n_total - 1, n).round().astype(int).tolist()))


def load_images(data: str | DataSpec, pre: PreprocessConfig, splits: tuple[str, ...], n: int, val_fraction: float = 0.1,
                seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageSet:
    """Up to `n` images of the first of `splits` that `data` has, through the eval transform. A
    `DataSpec` is used as it is (already read and split, e.g. by `read_run_data`)."""
    check_count(n, "the number of images to load")  # 0 or -5 once silently meant every image
    spec = data if isinstance(data, DataSpec) else split_train_val(read_data(data), val_fraction, seed)
    split = next((s for s in splits if spec.splits.get(s)), None)
    if split is None:
        raise ImageRecError(f"{spec.origin} has none of the splits {', '.join(splits)} (it has: {', '.join(sorted(spec.splits))})")
    items = remap_items(spec, split, list(pre.class_names))
    items = [items[i] for i in _evenly(len(items), n)]
    loader = create_eval_loader(spec, items, pre, batch_size=128, workers=0, max_pixels=max_pixels)
    xs, ys, idx = [], [], []
    for batch in loader.epoch(0):
        xs.append(batch.x)
        ys.append(batch.y)
        idx.append(batch.index)
    if not xs:
        raise ImageRecError(f"{spec.origin}: none of the {len(items)} '{split}' images could be read")
    names = [display_name(items[i].source) for i in torch.cat(idx).tolist()]
    return ImageSet(torch.cat(xs), torch.cat(ys), names, spec.origin, split)


def synthetic_images(pre: PreprocessConfig, n: int = 32, seed: int = 0) -> ImageSet:
    """Random uint8 images without labels: for models that have no run (tests, fresh exports)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, pre.channels, pre.input_size, pre.input_size), dtype=torch.uint8, generator=g)
    return ImageSet(x, None, [f"<synthetic {i}>" for i in range(n)], "synthetic", "")


@torch.no_grad()
def reference_probs(model: nn.Module, pre: PreprocessConfig, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Eager PyTorch fp32 probabilities (N, K): the ground truth an export must match."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        logits = model(normalize_batch(x[i : i + batch_size], pre.mean, pre.std)).float()
        out.append(torch.sigmoid(logits) if pre.multi_label else torch.softmax(logits, dim=1))
    return torch.cat(out)


def run_batched(runtime: Runtime, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([runtime.run(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def _accuracy(probs: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> float:
    if multi_label:  # per-label accuracy at the 0.5 threshold
        return float(((probs >= 0.5) == (targets >= 0.5)).float().mean())
    return float((probs.argmax(1) == targets).float().mean())


def compare(reference: torch.Tensor, probs: torch.Tensor, images: ImageSet, precision: str, multi_label: bool = False,
            max_drop: float = 1.0, min_agreement: float = INT8_MIN_AGREEMENT) -> dict[str, Any]:
    """Parity figures of `probs` against `reference` and whether the gate for `precision` passes."""
    if probs.shape != reference.shape:
        raise ImageRecError(f"the exported model returns shape {tuple(probs.shape)}, PyTorch {tuple(reference.shape)}")
    agree = probs.argmax(1) == reference.argmax(1)
    diff = (probs - reference).abs().amax(1)  # (N,) worst class per image
    res: dict[str, Any] = {
        "precision": precision,
        "images": len(reference),
        "data": images.origin,
        "split": images.split,
        "top1_agreement": round(float(agree.float().mean()), 6),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float((probs - reference).abs().mean()),
    }
    if images.targets is not None:
        before = _accuracy(reference, images.targets, multi_label)
        after = _accuracy(probs, images.targets, multi_label)
    else:
        before, after = 1.0, res["top1_agreement"]
    res.update(accuracy_before=round(before, 6), accuracy_after=round(after, 6),
               accuracy_drop_points=round((before - after) * 100, 4), labelled=images.targets is not None)
    if precision in AGREEMENT_GATES:
        min_agree, max_diff = AGREEMENT_GATES[precision]
        res["gate"] = {"min_top1_agreement": min_agree, "max_abs_diff": max_diff}
        res["passed"] = res["top1_agreement"] >= min_agree and res["max_abs_diff"] <= max_diff
        bad = (~agree) | (diff > max_diff)
    else:
        res["gate"] = {"max_accuracy_drop_points": max_drop, "min_top1_agreement": min_agreement}
        res["passed"] = res["accuracy_drop_points"] <= max_drop and res["top1_agreement"] >= min_agreement
        bad = ~agree
    order = sorted(torch.nonzero(bad).flatten().tolist(), key=lambda i: -float(diff[i]))
    res["num_differing"] = len(order)
    res["differing"] = [images.names[i] for i in order[:10]]
    return res


def refusal_message(runtime: str, res: dict[str, Any], source: str) -> str:
    """The error a refused export raises: what failed, by how much, on which images, what to do."""
    n, k = res["images"], res["num_differing"]
    gate = res["gate"]
    if "max_accuracy_drop_points" not in gate:
        why = (f"top-1 agreement {res['top1_agreement']:.2%} (needs >= {gate['min_top1_agreement']:.1%}), "
               f"max |dprob| {res['max_abs_diff']:.3g} (needs <= {gate['max_abs_diff']:g})")
        hint = "the exported graph does not compute what the PyTorch model computes; report this with the model name"
    else:
        why = (f"accuracy {res['accuracy_before']:.2%} -> {res['accuracy_after']:.2%}, a drop of "
               f"{res['accuracy_drop_points']:.2f} points (allowed: {gate['max_accuracy_drop_points']:g}); top-1 "
               f"agreement with fp32 {res['top1_agreement']:.2%} (needs >= {gate.get('min_top1_agreement', 0):.1%})")
        hint = "export without --int8, or loosen the gate with --max-drop / --min-agreement"
    names = ", ".join(res["differing"]) or "(none by top-1; the probabilities differ)"
    return (f"export refused: {runtime} differs from PyTorch on {k}/{n} {res['split'] + ' ' if res['split'] else ''}images of {res['data']} "
            f"from {source}: {why}. Differing images: {names}. No bundle was written; {hint}.")


def throughputs(runtimes: list[Runtime], x: torch.Tensor, seconds: float = 0.5, rounds: int = 5) -> list[float]:
    """Images per second of each runtime's `run` on the batch `x`: one warm-up call each, then
    `rounds` turns of about seconds/rounds each, the runtimes taking turns, the best turn kept.
    Taking turns matters on a shared VM: timed one after the other for 1 s each, ONNX Runtime int8
    and OpenVINO int8 came out tied (296.7 vs 293.6 img/s, ResNet-18 at 224 px, batch 32) on a
    machine where OpenVINO was 12% faster over 40 calls each in one process (82 vs 92 ms a batch),
    and the tie went to ONNX Runtime."""
    for rt in runtimes:
        rt.run(x)
    best = [0.0] * len(runtimes)
    for _ in range(rounds):
        for i, rt in enumerate(runtimes):
            n, t0 = 0, time.perf_counter()
            while True:
                rt.run(x)
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / rounds:
                    break
            best[i] = max(best[i], n * len(x) / elapsed)
    return best

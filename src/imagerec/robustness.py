"""`evaluate_robustness()`: accuracy under common corruptions and adversarial attacks (`imagerec robustness`).

Corruptions (`imagerec.corruptions`, CIFAR-10-C definitions) are applied to the preprocessed
uint8 images the model sees, at severities 1-5; attacks (`imagerec.engine.attacks`: FGSM and PGD,
L-infinity) perturb the same images with gradients through the model's own normalisation. Both run
the model in fp32. Images are the run's eval images (`imagerec eval`'s loader), so the clean
accuracy here is `imagerec eval`'s on the same images (in fp32: on a CPU with bf16 instructions,
`imagerec eval` runs bf16 and may disagree on a near-tied image or two).

An exported bundle (ONNX/OpenVINO/TorchScript) has no gradients: it gets the corruptions only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from imagerec.config import write_json
from imagerec.corruptions import SEVERITIES, check_severities, corrupt, resolve_corruptions
from imagerec.data.decode import DEFAULT_MAX_PIXELS
from imagerec.engine.attacks import ATTACKS, PGD_STEP_FRACTION, PGD_STEPS, run_attack
from imagerec.engine.checkpoint import find_run_checkpoint, read_checkpoint_meta
from imagerec.engine.evaluate import (
    create_eval_loader,
    non_finite_message,
    normalize_split,
    read_run_split,
    unreadable_split_message,
)
from imagerec.predict import Predictor, load
from imagerec.utils import ImageRecError, did_you_mean, mix_seed

log = logging.getLogger("imagerec")

# Each image costs ~170 forward passes' worth of compute: 65 corrupted copies (13 corruptions x 5
# severities), and per eps one FGSM gradient and ten PGD gradients (a backward pass ~ two forwards).
# 300 images take ~30 s for the `cnn` on 28 px digits on 2 idle CPU cores (~60 s on a busy machine);
# the stratified subset keeps every class in proportion.
DEFAULT_LIMIT = 300
# Images per batch. Fixed, because corruption noise is seeded per batch: the numbers then depend
# only on the images and the seed, never on a batch-size flag.
CHUNK = 128
# eps in [0, 1] pixel units. Natural images: the CIFAR/ImageNet convention (8/255 is the CIFAR-10
# standard). Small grayscale images (MNIST-like digits on a blank background) withstand far more:
# 0.1-0.3 is that convention (Madry et al. 2018 use 0.3).
DEFAULT_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
DEFAULT_EPS_DIGITS = (0.1, 0.2, 0.3)


def default_eps(channels: int, input_size: int) -> tuple[float, ...]:
    """The default eps list for a model's input: digit-like (1 channel, <= 64 px) or natural images."""
    return DEFAULT_EPS_DIGITS if channels == 1 and input_size <= 64 else DEFAULT_EPS


def stratified_subset(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Indices of `n` items with each class in proportion (largest remainders), chosen by a seeded
    shuffle within each class, in listing order. n <= 0 or n >= len: all."""
    if n <= 0 or n >= len(targets):
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    classes = sorted(by_class)
    exact = np.array([n * len(by_class[c]) / len(targets) for c in classes])
    quota = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - quota), kind="stable")[: n - int(quota.sum())]:
        quota[j] += 1
    rng = np.random.default_rng(seed)
    picked = [by_class[c][k] for c, q in zip(classes, quota, strict=True) for k in rng.permutation(len(by_class[c]))[:q]]
    return sorted(picked)


def _training_config(predictor: Predictor) -> dict[str, Any]:
    """The run's training settings (data, val_fraction, seed); for a bundle, its source run's if still there."""
    if predictor.model is not None:
        return dict(predictor.meta.get("train_config", {}))
    run_dir = (predictor.meta.get("source") or {}).get("run_dir")
    try:
        return dict(read_checkpoint_meta(find_run_checkpoint(run_dir)).get("train_config", {})) if run_dir else {}
    except ImageRecError:
        return {}


def _data_fingerprint(predictor: Predictor) -> str | None:
    """The fingerprint of the data the model was trained on, from its checkpoint or bundle manifest."""
    if predictor.model is not None:
        return (predictor.meta.get("data") or {}).get("fingerprint")
    return (predictor.meta.get("source") or {}).get("data_fingerprint")


def _check_eps(eps: Sequence[float]) -> list[float]:
    for e in eps:
        if not 0 <= e <= 1:  # also refuses NaN
            raise ImageRecError(f"eps {e:g} is out of range: eps is a fraction of the pixel range [0, 1], e.g. "
                                f"--eps 2/255,8/255 or --eps 0.1,0.3")
    return sorted(set(float(e) for e in eps))


def _alone(names: Sequence[str], words: Sequence[str], flag: str) -> list[str]:
    """`names` lowered; a word such as 'all' or 'none' is refused beside names (it means all or nothing)."""
    lowered = [n.strip().lower() for n in names]
    for word in words:
        if word in lowered and len(lowered) > 1:
            raise ImageRecError(f"'{word}' cannot be combined with names ({', '.join(names)}): use {flag} {word}, "
                                f"or a list of names")
    return lowered


def _resolve_corruptions(corruptions: Sequence[str] | None) -> list[str]:
    """Corruption names to run: None or ['all'] = all, [] or ['none'] = none, else the names, checked."""
    if corruptions is None:
        return resolve_corruptions(None)
    lowered = _alone(list(corruptions), ("all", "none"), "--corruptions")
    return [] if lowered in ([], ["none"]) else resolve_corruptions(["all"] if lowered == ["all"] else list(corruptions))


def _resolve_attacks(attacks: Sequence[str]) -> list[str]:
    if _alone(list(attacks), ("none",), "--attacks") == ["none"]:
        return []
    out = []
    for raw in attacks:
        a = raw.strip().lower()
        if a not in ATTACKS:
            raise ImageRecError(f"unknown attack '{raw}': use some of {', '.join(ATTACKS)}, or none.{did_you_mean(a, ATTACKS)}")
        if a not in out:
            out.append(a)
    return out


def _correct(predictor: Predictor, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((predictor.predict_batch(x).argmax(1) == y).sum())


def evaluate_robustness(
    source: str | Path,
    data: str | None = None,
    split: str | None = None,
    limit: int = DEFAULT_LIMIT,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    attacks: Sequence[str] = ATTACKS,
    eps: Sequence[float] | None = None,
    seed: int = 0,
    device: str = "auto",
    write: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of a run (or exported bundle) on `split` of `data`: clean, under each corruption at
    each severity, and under FGSM/PGD at each eps (runs only). `split` None: test, or all of a `data`
    without test images (`read_run_split`). `limit` images (a stratified, seeded subset; 0 = all);
    `corruptions` None = all, [] = none; `eps` None = `default_eps` for the input. Writes
    RUN/robustness-<split>.json (for a bundle: BUNDLE.robustness-<split>.json beside it) unless write=False.

    Example:
        >>> r = evaluate_robustness("runs/mnist", limit=500)
        >>> r["clean_accuracy"], r["mean_corruption_accuracy"], r["attacks"]["pgd"][-1]
    """
    split = normalize_split(split)  # 'VAL', 'validation', 'ALL'
    names = _resolve_corruptions(corruptions)
    sevs = check_severities(severities)
    atks = _resolve_attacks(attacks)
    if limit < 0:
        raise ImageRecError(f"limit must be >= 0 (0 = every image of the split), got {limit}")
    predictor = load(source, device=device, precision="fp32")
    pre = predictor.pre
    if pre.multi_label:
        raise ImageRecError(f"{source} is a multi-label model; robustness measures single-label accuracy only")
    eps_list = _check_eps(default_eps(pre.channels, pre.input_size) if eps is None else eps) if atks else []
    notes = []
    if atks and predictor.model is None:
        notes.append(f"attacks skipped: {source} is an exported bundle, which has no gradients; "
                     f"FGSM/PGD need the run directory it was exported from (a PyTorch checkpoint)")
        atks, eps_list = [], []
    cfg = _training_config(predictor)
    spec, items, split = read_run_split(cfg, data, split, list(pre.class_names), source, _data_fingerprint(predictor),
                                        multi_label=False)
    picked = stratified_subset([int(it.target) for it in items], limit, seed)  # type: ignore[arg-type]  # single-label
    loader = create_eval_loader(spec, [items[i] for i in picked], pre, CHUNK, max_pixels=cfg.get("max_pixels", DEFAULT_MAX_PIXELS))

    n = clean = 0
    hits = {c: dict.fromkeys(sevs, 0) for c in names}
    adv_hits = {a: [0] * len(eps_list) for a in atks}
    seconds = {"clean": 0.0, "corruptions": 0.0, "attacks": 0.0}
    for k, batch in enumerate(loader.epoch(0)):
        x, y = batch.x, batch.y
        t0 = time.perf_counter()
        probs = predictor.predict_batch(x)
        if bad := int((~torch.isfinite(probs).all(dim=1)).sum()):  # argmax of NaN is class 0: no accuracy at all
            raise ImageRecError(non_finite_message(source, bad, len(y), split or "test", None))
        n, clean = n + len(y), clean + int((probs.argmax(1) == y).sum())
        t1 = time.perf_counter()
        for c in names:
            for s in sevs:
                hits[c][s] += _correct(predictor, corrupt(x, c, s, mix_seed(seed, k)), y)
        t2 = time.perf_counter()
        for a in atks:
            assert predictor.model is not None
            xd, yd = x.to(predictor.device), y.to(predictor.device)
            for j, e in enumerate(eps_list):
                adv = run_attack(a, predictor.model, pre, xd, yd, e, seed=mix_seed(seed, k, j))
                adv_hits[a][j] += _correct(predictor, adv, y)
        t3 = time.perf_counter()
        for key, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            seconds[key] += dt
        log.info("robustness: %d/%d images", n, loader.num_items)
        if progress is not None:
            progress(n, loader.num_items)
    if n == 0:
        raise ImageRecError(unreadable_split_message(len(picked), split, spec.origin))

    clean_acc = clean / n
    per = {c: {"accuracy": {str(s): hits[c][s] / n for s in sevs}, "mean": float(np.mean([hits[c][s] / n for s in sevs]))}
           for c in names}
    mca = float(np.mean([v["mean"] for v in per.values()])) if per else None
    result: dict[str, Any] = {
        "source": str(source),
        "kind": "run" if predictor.model is not None else "bundle",
        "data": spec.origin,
        "split": split,
        "num_images": n,
        "limit": limit,
        "seed": seed,
        "clean_accuracy": clean_acc,
        "mean_corruption_accuracy": mca,
        # (clean - mean corruption accuracy) / clean: the share of the clean accuracy that corruption costs
        "relative_drop": (clean_acc - mca) / clean_acc if mca is not None and clean_acc > 0 else None,
        "corruptions": per,
        "severities": sevs,
        "attacks": {a: [{"eps": e, "accuracy": adv_hits[a][j] / n} for j, e in enumerate(eps_list)] for a in atks},
        "attack_settings": {"norm": "linf", "eps_units": "fraction of the pixel range [0, 1]", "precision": "fp32",
                            "pgd": {"steps": PGD_STEPS, "step_size": f"eps*{PGD_STEP_FRACTION:g}", "random_start": True}},
        "corruption_definitions": "CIFAR-10-C (Hendrycks & Dietterich 2019), applied to the preprocessed uint8 input",
        "skipped_files": sorted(loader.skipped.values()),
        "notes": notes,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if write:
        write_json(robustness_path(source, split), result)
    return result


def robustness_path(source: str | Path, split: str) -> Path:
    """Where the result is written: RUN/robustness-<split>.json for a run; beside a bundle, as
    BUNDLE.robustness-<split>.json, for a bundle (a bundle folder holds only what export wrote, so
    `export --overwrite` can replace it and its hashes describe all of it)."""
    from imagerec.export.bundle import is_bundle

    src = Path(source)
    if is_bundle(src):
        return src.resolve().parent / f"{src.resolve().name}.robustness-{split}.json"
    return src / f"robustness-{split}.json"


# --- the command ------------------------------------------------------------------------------------


def parse_severities(text: str) -> list[int]:
    """'1..5' -> [1, 2, 3, 4, 5]; '3' -> [3]; '1,3,5' -> [1, 3, 5]."""
    try:
        if ".." in text:
            lo, hi = (int(v) for v in text.split("..", 1))
            if lo > hi:
                raise ImageRecError(f"--severities '{text}' is an empty range: write it low to high, {hi}..{lo}")
            values = list(range(lo, hi + 1))
        else:
            values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ImageRecError(f"--severities '{text}' is not understood: write 1..5, 3 or 1,3,5") from e
    if not values:
        raise ImageRecError(f"--severities '{text}' names no severity: write 1..5, 3 or 1,3,5")
    return check_severities(values)


def parse_eps(text: str) -> list[float]:
    """'2/255,8/255' or '0.1,0.3' -> floats (fractions of the pixel range)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            num, _, den = part.partition("/")
            out.append(float(num) / float(den) if den else float(num))
        except (ValueError, ZeroDivisionError) as e:
            raise ImageRecError(f"--eps '{part}' is not a number: write e.g. --eps 2/255,8/255 or --eps 0.1,0.3") from e
    return _check_eps(out)


def _names(text: str, flag: str, usage: str) -> list[str]:
    """A comma list of names as given ('none' stays a name). An empty one is refused: it is what an unset
    shell variable gives (`--corruptions "$C"`), not a choice of none."""
    names = [v for v in (p.strip() for p in text.split(",")) if v]
    if not names:
        raise ImageRecError(f"{flag} '{text}' names nothing: use {usage}")
    return names


def _title(text: str) -> Text:
    """A table title as plain text (never Rich markup), in the style Rich gives titles."""
    return Text(text, style="table.title")


def robustness_tables(r: dict[str, Any]) -> list[Table]:
    """Rich tables of a result: corruption x severity accuracy, and attack x eps accuracy."""
    tables = []
    if r["corruptions"]:
        t = Table(title=_title(f"corruption accuracy on {r['num_images']} {r['split']} images (clean {r['clean_accuracy']:.2%})"))
        t.add_column("corruption")
        for s in r["severities"]:
            t.add_column(f"sev {s}", justify="right")
        t.add_column("mean", justify="right")
        for name, v in r["corruptions"].items():
            t.add_row(Text(name), *(f"{a:.2%}" for a in v["accuracy"].values()), f"{v['mean']:.2%}")
        tables.append(t)
    if r["attacks"]:
        eps = [e["eps"] for e in next(iter(r["attacks"].values()))]
        t = Table(title=_title(f"accuracy under attack (L-inf, fp32; clean {r['clean_accuracy']:.2%})"))
        t.add_column("attack")
        for e in eps:
            t.add_column(f"eps {e:.3g}" + (f" ({e * 255:.3g}/255)" if e * 255 < 16 else ""), justify="right")
        for a, rows in r["attacks"].items():
            t.add_row(a.upper() + (f" ({r['attack_settings']['pgd']['steps']} steps)" if a == "pgd" else ""),
                      *(f"{row['accuracy']:.2%}" for row in rows))
        tables.append(t)
    return tables


def robustness_command(source: str, data: str | None = None, split: str | None = None, limit: int | None = None,
                       corruptions: str = "all", severities: str = "1..5", attacks: str = "fgsm,pgd",
                       eps: str | None = None, fmt: str = "table", seed: int = 0, device: str = "auto") -> int:
    """`imagerec robustness`: parse the flags, run `evaluate_robustness`, print a table or one JSON object,
    then save it. Names and paths are printed as written (never as Rich markup). The result is shown
    before it is saved: a run folder that cannot be written to (read-only, another user's) costs the
    file, never the minutes of measurement."""
    limit = DEFAULT_LIMIT if limit is None else limit
    kwargs: dict[str, Any] = {
        "corruptions": _names(corruptions, "--corruptions", "all, none or a comma list, e.g. fog,contrast"),
        "severities": parse_severities(severities),
        "attacks": _names(attacks, "--attacks", "fgsm,pgd, fgsm, pgd or none"),
        "eps": parse_eps(eps) if eps else None}
    err = Console(stderr=True, soft_wrap=True)
    if fmt == "json" or not err.is_terminal:
        r = evaluate_robustness(source, data, split, limit, seed=seed, device=device, write=False, **kwargs)
    else:
        with err.status("robustness: loading") as status:
            r = evaluate_robustness(source, data, split, limit, seed=seed, device=device, write=False,
                                    progress=lambda done, total: status.update(f"robustness: {done}/{total} images"), **kwargs)
    if fmt == "json":
        print(json.dumps(r), flush=True)
        _save(source, r, "the JSON printed above is the whole result: redirect it (> result.json) to keep it")
        return 0
    console = Console(soft_wrap=True)
    for t in robustness_tables(r):
        console.print(t)
    console.print(summary_text(r), markup=False, highlight=False)
    for note in r["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    if r["skipped_files"]:
        console.print(f"skipped {len(r['skipped_files'])} unreadable file(s)")
    _save(source, r, "make the folder writable, or use --format json and redirect it (> result.json)")
    console.print(f"written: {robustness_path(source, r['split'])}", markup=False, highlight=False)
    return 0


def _save(source: str, r: dict[str, Any], hint: str) -> None:
    """Write the printed result to `robustness_path`; a failure says the numbers above were not saved."""
    try:
        write_json(robustness_path(source, r["split"]), r)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise ImageRecError(f"the result above was not saved: {where}{e.strerror or e}; {hint}") from e


def summary_text(r: dict[str, Any]) -> str:
    """The result's headline in one line: clean accuracy, mean corruption accuracy and its relative
    drop (n/a when the clean accuracy is 0: there is nothing to drop from)."""
    line = f"clean accuracy {r['clean_accuracy']:.2%} on {r['num_images']} {r['split']} images of {r['data']} (seed {r['seed']})"
    if r["mean_corruption_accuracy"] is not None:
        drop = "n/a: clean accuracy is 0" if r["relative_drop"] is None else f"{r['relative_drop']:.1%}"
        line += f"; mean corruption accuracy {r['mean_corruption_accuracy']:.2%} (relative drop {drop})"
    return line

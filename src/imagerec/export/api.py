"""`export_run` / `export_model`: a parity-gated bundle folder from a run or from a (model, preprocess) pair."""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagerec.config import PreprocessConfig
from imagerec.data.decode import DEFAULT_MAX_PIXELS
from imagerec.engine.checkpoint import find_run_checkpoint, load_model
from imagerec.engine.evaluate import read_run_data
from imagerec.export.bundle import check_out, create_runtime, finalize_bundle, recover_interrupted_replace
from imagerec.export.onnx import export_onnx
from imagerec.export.parity import (
    INT8_MIN_AGREEMENT,
    ImageSet,
    compare,
    load_images,
    reference_probs,
    refusal_message,
    run_batched,
    synthetic_images,
    throughputs,
)
from imagerec.export.quantize import quantize_onnx
from imagerec.export.runtime import OpenVinoRuntime, OrtRuntime, Runtime, TorchScriptRuntime, openvino_available
from imagerec.export.torchscript import export_torchscript
from imagerec.utils import (
    ImageRecError,
    available_cpus,
    check_count,
    cpu_supports_bf16,
    is_finite_number,
    library_versions,
    staging_dir,
    write_error_text,
)

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "int8": "model.int8.onnx"}


def openvino_runtimes(folder: Path, int8: bool) -> list[tuple[dict[str, Any], Runtime]]:
    """OpenVINO variants of the ONNX files in `folder`: bf16 where the CPU has bf16 units, and the
    int8 graph when there is one. Each still has to pass its parity gate (`parity.compare`): bf16
    the agreement gate (top-1 agreement >= 99.5%, max |dprob| <= 1e-2), never `max_drop`, so an
    fp32 export is only ever predicted with a runtime that agrees with it image by image."""
    hint = "bf16" if cpu_supports_bf16() else "f32"
    variants = [("openvino-bf16", FILES["onnx"], "bf16")] if hint == "bf16" else []
    if int8:
        variants.append(("openvino-int8", FILES["int8"], "int8"))
    out: list[tuple[dict[str, Any], Runtime]] = []
    for name, file, precision in variants:
        rt = OpenVinoRuntime(folder / file, name, hint)
        out.append(({"name": name, "file": file, "engine": "openvino", "precision": precision, "hint": hint}, rt))
    return out


def _versions() -> dict[str, str]:
    v = library_versions()
    for mod in ("onnx", "onnxruntime", "openvino"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return v


def check_min_agreement(min_agreement: float) -> None:
    if not is_finite_number(min_agreement) or not 0.0 <= min_agreement <= 1.0:
        shown = f"{min_agreement:g}" if isinstance(min_agreement, float) else repr(min_agreement)
        raise ImageRecError(f"--min-agreement (min_agreement) {shown}: a fraction of images, from 0 to 1 (e.g. 0.97)")


def check_max_drop(max_drop: float) -> None:
    """Refuse a NaN or negative accuracy drop up front: the gate compared against it only after the
    whole export, then refused the int8 runtime as if the model were at fault ("allowed: nan")."""
    if not is_finite_number(max_drop) or not max_drop >= 0.0:
        raise ImageRecError(f"--max-drop (max_drop) must be a number of points >= 0, got {max_drop!r}: the accuracy "
                            f"an int8 runtime may lose, e.g. 1.0")


def check_image_count(value: int, name: str, flag: str | None = None) -> None:
    """Refuse an image count below 1 or not a whole number: 0 and negatives used to mean every
    image (600 parity images instead of 256, int8 calibrated on all 5,400 training images), and a
    string failed as a TypeError deep in the image selection."""
    check_count(value, f"{flag} ({name})" if flag else name)


def export_model(
    model: nn.Module,
    pre: PreprocessConfig,
    fmt: str,
    out: str | Path,
    *,
    int8: bool = False,
    images: ImageSet | None = None,
    calibration: torch.Tensor | None = None,
    calibration_origin: str = "training images",
    max_drop: float = 1.0,
    min_agreement: float = INT8_MIN_AGREEMENT,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    timing_seconds: float = 0.5,
) -> dict[str, Any]:
    """Export `model` with its preprocessing to a bundle folder `out`, gated on parity with PyTorch.

    `images` are the parity images (default: 32 synthetic ones); `calibration` the uint8 images
    int8 is calibrated on (default: the parity images), which the manifest names as `calibration_origin`; int8 runtimes may lose at most `max_drop`
    points of accuracy and must agree with fp32 on at least `min_agreement` of the images. A runtime that fails its gate raises
    ImageRecError naming the differing images, and nothing is left at `out`. An existing `out` is
    replaced only with `overwrite`, and only when it is an imagerec bundle (`bundle.replace_refusal`).

    Example:
        >>> model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
        >>> export_model(model, pre, "onnx", "exports/cnn")["runtimes"][0]["parity"]["passed"]
        True
    """
    if fmt not in FORMATS:
        raise ImageRecError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise ImageRecError("int8 export uses ONNX Runtime quantization: use format onnx with int8")
    check_min_agreement(min_agreement)
    check_max_drop(max_drop)
    out = Path(out)
    recover_interrupted_replace(out)
    check_out(out, overwrite, (source or {}).get("run_dir"))  # before the slow part; finalize_bundle checks again
    # Export a private fp32 copy: tracing must not change the caller's model (memory format, dtype, mode).
    model = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    images = images or synthetic_images(pre)
    src = (source or {}).get("run_dir", "the given model")
    t0 = time.perf_counter()
    reference = reference_probs(model, pre, images.x)  # (N, K)
    if reference.shape[1] != pre.num_classes:
        raise ImageRecError(f"{src}: the model outputs {reference.shape[1]} classes but its preprocessing config names "
                            f"{pre.num_classes} class names; a bundle would print wrong labels")
    tmp = staging_dir(out, "an export")
    try:
        if fmt == "onnx":
            info = export_onnx(model, pre, tmp / FILES["onnx"])
            runtime: Runtime = OrtRuntime(tmp / FILES["onnx"], "onnx-fp32")
            entries = [{"name": "onnx-fp32", "file": FILES["onnx"], "engine": "onnxruntime", "precision": "fp32"}]
        else:
            info = export_torchscript(model, pre, tmp / FILES["torchscript"])
            runtime = TorchScriptRuntime(tmp / FILES["torchscript"], "torchscript-fp32")
            entries = [{"name": "torchscript-fp32", "file": FILES["torchscript"], "engine": "torchscript", "precision": "fp32"}]
        runtimes = [runtime]
        entries[0]["parity"] = compare(reference, run_batched(runtime, images.x), images, "fp32", pre.multi_label)
        if not entries[0]["parity"]["passed"]:
            raise ImageRecError(refusal_message(runtime.name, entries[0]["parity"], src))
        quant = None
        if int8:
            calib = calibration if calibration is not None else images.x
            quant = quantize_onnx(tmp / FILES["onnx"], tmp / FILES["int8"], calib)
            quant["calibration_data"] = calibration_origin if calibration is not None else f"parity images ({images.origin})"
            rt8 = OrtRuntime(tmp / FILES["int8"], "onnx-int8")
            res = compare(reference, run_batched(rt8, images.x), images, "int8", pre.multi_label, max_drop, min_agreement)
            entries.append({"name": "onnx-int8", "file": FILES["int8"], "engine": "onnxruntime", "precision": "int8",
                            "parity": res})
            if not res["passed"]:
                raise ImageRecError(refusal_message("onnx-int8", res, src))
            runtimes.append(rt8)
        rejected = []
        requested = entries[-1]["name"]  # without timing, predict uses what the user asked for
        if fmt == "onnx" and openvino_available():
            for entry, rt in openvino_runtimes(tmp, int8):
                entry["parity"] = compare(reference, run_batched(rt, images.x), images, entry["precision"],
                                          pre.multi_label, max_drop, min_agreement)
                # Optional runtimes that miss their gate are left out, not fatal: the export still
                # has the ones the user asked for.
                if entry["parity"]["passed"]:
                    entries.append(entry)
                    runtimes.append(rt)
                else:
                    rejected.append(entry)
        # predict uses the fastest runtime that passed, timed here on this machine.
        preferred_1thread = None
        if timing_seconds > 0:
            batch = images.x[:32]
            for entry, rate in zip(entries, throughputs(runtimes, batch, timing_seconds), strict=True):
                entry["images_per_s"] = round(rate, 1)
                entry["timed_batch_size"] = len(batch)
            preferred = max(entries, key=lambda e: e["images_per_s"])["name"]
            if fmt == "onnx" and available_cpus() > 1:
                # `imagerec serve` runs one single-thread copy per core, and a lone request is a
                # batch of 1: timed that way too, since the ranking can differ from all cores at 32.
                singles = [create_runtime(tmp, entry, threads=1) for entry in entries]
                for entry, rate in zip(entries, throughputs(singles, images.x[:1], timing_seconds), strict=True):
                    entry["images_per_s_1thread"] = round(rate, 1)
                preferred_1thread = max(entries, key=lambda e: e["images_per_s_1thread"])["name"]
                del singles
        else:
            preferred = requested
        del runtimes, runtime  # close sessions before the folder is renamed
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "export_format": fmt,
            "model": (source or {}).get("model", type(model).__name__),
            "preprocess": pre.to_dict(),
            "class_names": list(pre.class_names),
            "input": {"name": info.get("input", "image"), "dtype": "uint8", "layout": "NCHW",
                      "shape": ["batch", pre.channels, pre.input_size, pre.input_size],
                      "normalisation": "inside the graph: (x - mean*255) / (std*255); feed the uint8 output of the "
                                       "preprocess transform: decode, EXIF orientation, convert to `channels`, resize "
                                       "the shorter side to `resize_size`, centre crop `input_size`, then the `ops`"},
            "output": {"name": info.get("output", "probs"), "activation": "sigmoid" if pre.multi_label else "softmax",
                       "classes": int(reference.shape[1])},
            "runtimes": entries,
            "preferred_runtime": preferred,
            **({"preferred_runtime_1thread": preferred_1thread} if preferred_1thread else {}),
            "rejected_runtimes": rejected,
            "source": source or {"model": type(model).__name__, "run_dir": None},
            "export": info,
            "quantization": quant,
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        manifest = finalize_bundle(tmp, out, manifest, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a file size limit: the disk's problem, not the model's
            raise ImageRecError(f"cannot write the export {out}: {write_error_text(e)}; {out} was left as it was") from e
        raise
    manifest["path"] = str(out)
    return manifest


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    int8: bool = False,
    parity_images: int = 256,
    max_drop: float = 1.0,
    min_agreement: float = INT8_MIN_AGREEMENT,
    data: str | None = None,
    calibration_images: int = 300,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a run's best checkpoint to a bundle folder, gated on its own validation images.

    Parity images are the run's validation split, re-created from its training data with its
    val_fraction and seed (or the val/test/train split of `data`), through the eval transform.
    int8 is calibrated on `calibration_images` of the run's training images (those of `data` when
    the run's own can no longer be read: moved, deleted). Returns the bundle's manifest.

    Example:
        >>> m = export_run("runs/mnist", "onnx", "exports/mnist", int8=True)
        >>> m["runtimes"][1]["parity"]["accuracy_after"]
    """
    check_image_count(parity_images, "parity_images", "--parity-images")
    check_image_count(calibration_images, "calibration_images")
    check_max_drop(max_drop)
    check_min_agreement(min_agreement)
    recover_interrupted_replace(Path(out))
    check_out(Path(out), overwrite, run_dir)  # before loading any images; export_model checks again
    model, meta = load_model(run_dir)
    pre = PreprocessConfig.from_dict(meta["preprocess"])
    cfg = meta.get("train_config", {})
    if not data and not cfg.get("data"):
        raise ImageRecError(f"{run_dir}: the checkpoint does not say what data it was trained on; pass data=... / --data")
    kw = {"val_fraction": cfg.get("val_fraction", 0.1), "seed": cfg.get("seed", 0), "max_pixels": cfg.get("max_pixels", DEFAULT_MAX_PIXELS)}
    fingerprint = (meta.get("data") or {}).get("fingerprint")
    # the run's own data is checked against the checkpoint's fingerprint: never other data at its saved path
    trained_on = None
    if data is None:
        try:
            trained_on = read_run_data(cfg, None, run_dir, fingerprint)
        except ImageRecError as e:
            raise ImageRecError(f"{e}. Parity images come from the run's data; pass data=... / --data to use other images") from e
    elif int8 and cfg.get("data"):
        # int8 is best calibrated on the images the model trained on; when they are gone (moved,
        # deleted, changed since), on those of `data` (its train split first), as --help promises
        try:
            trained_on = read_run_data(cfg, None, run_dir, fingerprint)
        except ImageRecError as e:
            logging.getLogger("imagerec").warning("calibrating int8 on %s instead of the run's own training images: %s",
                                                  data, e)
    where = data or trained_on
    assert where is not None
    try:
        images = load_images(where, pre, ("val", "test") if data is None else ("val", "test", "train"), parity_images, **kw)
        # `data` may hold no train split (a test/ folder): then int8 is calibrated on the images it has
        calib_splits = ("train",) if trained_on is not None else ("train", "val", "test")
        calib_set = load_images(trained_on or where, pre, calib_splits, calibration_images, **kw) if int8 else None
    except ImageRecError as e:
        if data is None:
            raise ImageRecError(f"{e}. Parity images come from the run's data; pass data=... / --data to use other images") from e
        raise ImageRecError(f"{e} (data={data!r} / --data: the images to check the export with"
                            f"{' and to calibrate int8 on' if int8 else ''})") from e
    stem = find_run_checkpoint(run_dir)
    source = {"run_dir": str(Path(run_dir).resolve()), "checkpoint": stem.name + ".json", "model": meta.get("model"),
              "model_kwargs": meta.get("model_kwargs", {}), "data_origin": (meta.get("data") or {}).get("origin"),
              "data_fingerprint": (meta.get("data") or {}).get("fingerprint"),
              "weights_id": meta.get("weights_id"),  # which save: `benchmark` times only that one beside the bundle
              "max_pixels": kw["max_pixels"]}  # the run's pixel limit, which predict and serve apply to the bundle
    calib_origin = (f"training images ({calib_set.origin})" if trained_on is not None
                    else f"{calib_set.origin} (the run's own training images were not readable)"
                    ) if calib_set is not None else ""
    return export_model(model, pre, fmt, out, int8=int8, images=images, calibration=calib_set.x if calib_set else None,
                        calibration_origin=calib_origin, max_drop=max_drop,
                        min_agreement=min_agreement, source=source, overwrite=overwrite)


def summarize_export(manifest: dict[str, Any]) -> str:
    """A few human lines about a written bundle (for the CLI)."""
    single = manifest.get("preferred_runtime_1thread")
    serve = f"; serve's one-thread copies use {single}" if single and single != manifest["preferred_runtime"] else ""
    lines = [f"wrote {manifest['path']} ({manifest['export_format']}; predict uses {manifest['preferred_runtime']}{serve})"]
    for r in manifest["runtimes"]:
        p = r["parity"]
        speed = f", {r['images_per_s']:.0f} img/s at batch {r['timed_batch_size']}" if "images_per_s" in r else ""
        if "images_per_s_1thread" in r:
            speed += f" ({r['images_per_s_1thread']:.0f} on one thread at batch 1)"
        lines.append(f"  {r['name']}: top-1 agreement {p['top1_agreement']:.2%}, max |dprob| {p['max_abs_diff']:.2g}, "
                     f"accuracy {p['accuracy_before']:.2%} -> {p['accuracy_after']:.2%} on {p['images']} {p['split']} images{speed}")
    return "\n".join(lines)


def export_command(run_dir: str, fmt: str, out: str, int8: bool = False, parity_images: int = 256, max_drop: float = 1.0,
                   data: str | None = None, overwrite: bool = False, min_agreement: float = INT8_MIN_AGREEMENT) -> int:
    """`imagerec export`: export_run plus a printed summary; returns the exit code."""
    manifest = export_run(run_dir, fmt, out, int8=int8, parity_images=parity_images, max_drop=max_drop, data=data,
                          overwrite=overwrite, min_agreement=min_agreement)
    print(summarize_export(manifest))
    return 0

"""Bundles: a folder with the model file(s) and imagerec.json, written atomically, verified on load.

imagerec.json holds the format and format_version, the preprocessing config and class names,
the source run and its data fingerprint, library/opset versions, the parity results of every
runtime in the bundle, the sha256 of every other file, and `manifest_sha256`, the sha256 of its own
canonical JSON (sorted keys, no whitespace) without that field. `load_bundle` checks the manifest's
own hash, that its fields agree with each other, and every file's hash before anything is loaded,
and loads nothing with pickle.

`--overwrite` (`finalize_bundle`) replaces only a bundle: see `replace_refusal` for the exact rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagerec.config import INTERPOLATIONS, PreprocessConfig, write_json
from imagerec.export.runtime import OpenVinoRuntime, OrtRuntime, Runtime, TorchScriptRuntime, openvino_available
from imagerec.transforms import parse_op
from imagerec.utils import ImageRecError, int8_may_saturate, is_finite_number, orphaned_siblings, sha256_file

MANIFEST = "imagerec.json"
FORMAT = "imagerec-bundle"
FORMAT_VERSION = 1
ENGINES = ("onnxruntime", "openvino", "torchscript")
PRECISIONS = ("fp32", "bf16", "int8")
MANIFEST_HASH = "manifest_sha256"
_warned_unsealed: set[str] = set()  # bundles already warned about (once per bundle and process)
_warned_saturation: set[str] = set()
log = logging.getLogger("imagerec")


class BundleWarning(UserWarning):
    """Something to know about a bundle that still loads. Said on the "imagerec" logger (one clean line,
    like imagerec's other warnings); the warning itself is ignored unless asked for (pytest.warns,
    warnings.catch_warnings), so a terminal gets neither the message twice nor Python's "file:line:
    UserWarning:" and the source line of the call."""


warnings.filterwarnings("ignore", category=BundleWarning)


def warn_user(message: str) -> None:
    """Warn the user of a bundle: a log line, and a `BundleWarning` that callers and tests can catch."""
    log.warning(message)
    warnings.warn(message, BundleWarning, stacklevel=4)  # the caller of the function that warns


def saturation_risk(manifest: dict[str, Any]) -> bool:
    """True when the bundle's int8 runtimes use full 8-bit weights and this CPU has no VNNI: 8-bit
    u8 x s8 kernels without VNNI add pairs of products in int16 and can saturate (OpenVINO's
    "saturation issue" page; on a 2-core AVX2 AMD EPYC the suite's MNIST cnn lost 1.56 points).
    Bundles exported on such a CPU use 7-bit weights (`quantization.weights` says "int7 ..."); ones
    from before that field existed used 8-bit weights everywhere."""
    quant = manifest.get("quantization") or {}
    return bool(quant) and not str(quant.get("weights", "int8")).startswith("int7") and int8_may_saturate()


def is_bundle(path: str | Path) -> bool:
    """True for a folder holding imagerec.json (a bundle), as opposed to a run directory."""
    return (Path(path) / MANIFEST).is_file()


def replace_refusal(out: Path, source_run: str | Path | None = None) -> str | None:
    """Why `--overwrite` must not replace `out`, or None when it may.

    It may replace an empty folder, or an imagerec bundle: a real folder (not a link) whose
    imagerec.json is a bundle manifest and that holds nothing but imagerec.json and the files that
    manifest lists (their hashes need not match: exporting again is how a damaged bundle is
    mended), including one kept inside the run's folder (`--out runs/x/bundle`). Never a file, the
    source run or a folder that contains it. Anything else may hold a user's work, and is never
    deleted.
    """
    if out.is_symlink():
        return "it is a symbolic link, not a bundle folder"
    if not out.is_dir():
        return "it is a file, not a bundle folder" if out.is_file() else "it is not a folder"
    if source_run:
        run, here = Path(source_run).resolve(), out.resolve()
        if here == run:
            return "it is the run being exported"
        if run.is_relative_to(here):
            return f"it contains the run being exported ({run})"
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    if not present:
        return None
    if MANIFEST not in present:
        return f"it holds no {MANIFEST}, so it is not an imagerec bundle"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return f"its {MANIFEST} is not an imagerec bundle manifest"
    listed = {MANIFEST, *manifest["files"]}
    listed |= {parent.as_posix() for rel in manifest["files"] for parent in Path(rel).parents if parent != Path(".")}
    extra = [rel for rel in present if rel not in listed]
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        return f"it holds files its {MANIFEST} does not list ({', '.join(extra[:5])}{more}), so it is not only a bundle"
    return None


def check_out(out: Path, overwrite: bool, source_run: str | Path | None = None) -> None:
    """Raise ImageRecError unless a bundle may be written to `out` (new, or replaceable with overwrite)."""
    if not out.exists() and not out.is_symlink():
        return
    why = replace_refusal(out, source_run)
    if why is not None:
        raise ImageRecError(f"{out} already exists and --overwrite / overwrite=True will not replace it: {why}. "
                            f"Choose another output folder (nothing was deleted).")
    if not overwrite:
        raise ImageRecError(f"{out} already exists: choose another --out, or pass overwrite=True / --overwrite "
                            f"to replace the bundle there")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without `manifest_sha256`."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def recover_interrupted_replace(out: Path) -> None:
    """Undo what an `--overwrite` killed between its two renames left: the old bundle moved aside to
    `.OUT.old-PID` and nothing at `out`. The old bundle goes back to `out` (the state before that
    export; its new bundle, in `.OUT.partial-PID`, is removed by the next `staging_dir`). An
    `.old-PID` folder beside an `out` that exists is the leftover of a kill after the second rename
    and is removed."""
    for old in orphaned_siblings(out, "old"):
        if out.exists() or out.is_symlink():
            log.warning("removing %s, the previous bundle an interrupted export --overwrite had already replaced", old)
            shutil.rmtree(old, ignore_errors=True)
        else:
            log.warning("restoring %s from %s: an export --overwrite was interrupted while replacing it", out, old)
            os.replace(old, out)


def finalize_bundle(tmp: Path, out: Path, manifest: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Hash every file in `tmp`, write imagerec.json, then move `tmp` to `out` in one rename.

    An existing `out` is replaced only with `overwrite` and only when `replace_refusal` allows it
    (checked again here, just before the rename: the export took a while)."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}}
    manifest = json.loads(json.dumps(manifest, default=str))  # hash exactly what a reader will load
    manifest[MANIFEST_HASH] = manifest_digest(manifest)
    write_json(tmp / MANIFEST, manifest)
    old = None
    if out.exists() or out.is_symlink():
        check_out(out, overwrite, (manifest.get("source") or {}).get("run_dir"))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ImageRecError(f"{path} is not an imagerec bundle: {MANIFEST} is missing (create one with 'imagerec export')")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ImageRecError(f"{mpath} is not valid JSON ({e.msg}); the bundle is damaged: export it again") from e
    except UnicodeDecodeError as e:  # export writes UTF-8 JSON: other bytes are damage, not an encoding choice
        raise ImageRecError(f"{mpath} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            f"the bundle is damaged: export it again") from e
    except OSError as e:
        raise ImageRecError(f"cannot read {mpath} ({e.strerror or e}): fix its permissions, or export the bundle "
                            f"again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ImageRecError(f"{mpath}: not an imagerec bundle manifest")
    version = manifest.get("format_version")
    if not _is_int(version, 1):  # read before the hash check: any JSON value; every bundle ever written says 1+
        what = "is not a whole number" if not _is_int(version, -2**63) else "is below 1, the first bundle format"
        raise ImageRecError(f"{mpath}: format_version {version!r} {what}; the bundle is damaged: export it again")
    if version > FORMAT_VERSION:
        raise ImageRecError(f"{mpath}: bundle format {manifest['format_version']} is newer than this imagerec supports "
                            f"({FORMAT_VERSION}); upgrade imagerec")
    return manifest


def preferred_runtime_entry(manifest: dict[str, Any], threads: int = 0) -> dict[str, Any]:
    """The manifest's entry for `Bundle.preferred_runtime`, or with threads=1 the fastest on one
    thread at batch 1 where the export timed that (`imagerec serve` runs one-thread copies: the
    ranking can differ, e.g. OpenVINO int8 ResNet-18 5.5 ms vs ONNX Runtime int8 6.2 ms on one core
    while tied on two); readable before the bundle is verified."""
    usable = [r for r in manifest["runtimes"] if r["engine"] != "openvino" or openvino_available()]
    if not usable:
        raise ImageRecError("the bundle has no runtime that can run here (its runtimes need openvino: pip install openvino)")
    if saturation_risk(manifest) and any(r["precision"] != "int8" for r in usable):
        # Its parity gate ran on a CPU with VNNI and cannot vouch for this one: use the fp32/bf16 runtimes.
        key = str(manifest.get("manifest_sha256") or id(manifest))
        if key not in _warned_saturation:
            _warned_saturation.add(key)
            warn_user("this int8 bundle was quantized with 8-bit weights on a CPU with VNNI; this CPU has none, "
                      "where 8-bit int8 kernels can saturate and lose accuracy, so its fp32 runtime is used "
                      "instead. Export it again on this machine (`imagerec export RUN --int8`) for 7-bit "
                      "weights that are safe here.")
        usable = [r for r in usable if r["precision"] != "int8"]
    by_name = {r["name"]: r for r in usable}
    single = by_name.get(manifest.get("preferred_runtime_1thread")) if threads == 1 else None
    return dict(single or by_name.get(manifest.get("preferred_runtime"))
                or max(usable, key=lambda r: r.get("images_per_s", 0.0)))


def create_runtime(folder: Path, entry: dict[str, Any], threads: int = 0) -> Runtime:
    """The runtime a manifest entry describes, over the files in `folder`."""
    path = folder / entry["file"]
    if entry["engine"] == "onnxruntime":
        return OrtRuntime(path, entry["name"], threads)
    if entry["engine"] == "torchscript":
        return TorchScriptRuntime(path, entry["name"])
    if entry["engine"] == "openvino":
        return OpenVinoRuntime(path, entry["name"], entry.get("hint", "f32"), threads)
    raise ImageRecError(f"bundle {folder}: unknown engine '{entry['engine']}' (known: {', '.join(ENGINES)})")


def check_manifest_hash(manifest: dict[str, Any], mpath: Path) -> None:
    """Refuse a manifest edited since export. One without `manifest_sha256` (written before
    imagerec recorded it) is accepted with a warning, once per bundle and process."""
    recorded = manifest.get(MANIFEST_HASH)
    if recorded is None:
        if str(mpath.resolve()) not in _warned_unsealed:
            _warned_unsealed.add(str(mpath.resolve()))
            warn_user(f"{mpath} has no {MANIFEST_HASH} (written by an older imagerec), so edits to it cannot be "
                      f"detected; export the bundle again to add one")
        return
    if recorded != manifest_digest(manifest):
        raise ImageRecError(f"{mpath}: imagerec.json has been edited; export the bundle again (its content no longer "
                            f"matches the {MANIFEST_HASH} recorded at export, so its class names or preprocessing "
                            f"cannot be trusted)")


def _short(names: Any) -> str:
    names = list(names) if isinstance(names, list | tuple) else [names]
    return "[" + ", ".join(map(str, names[:4])) + (f", ... {len(names)} in all" if len(names) > 4 else "") + "]"


def _is_int(value: Any, least: int) -> bool:
    """A JSON whole number (not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _table_problem(manifest: dict[str, Any], key: str, optional: bool = True) -> str | None:
    """Why `manifest[key]` is not a JSON object (None or absent allowed when `optional`)."""
    value = manifest.get(key)
    if isinstance(value, dict) or (optional and value is None):
        return None
    return f"{key} is {'missing or ' if not optional else ''}not a table (got {type(value).__name__})"


def _class_name_problems(names: Any) -> list[str]:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return ["preprocess.class_names is missing or not a list of names"]
    dup = sorted({n for n in names if names.count(n) > 1})
    return [f"preprocess.class_names repeats {_short(dup)}: two classes would print the same label"] if dup else []


def _preprocess_problems(pre: dict[str, Any]) -> list[str]:
    """The preprocessing fields predict reads, type by type (PreprocessConfig.from_dict checks none
    of the types, and a wrong one surfaced as a TypeError deep in the transforms)."""
    problems = _class_name_problems(pre.get("class_names"))
    size, resize, channels = pre.get("input_size"), pre.get("resize_size"), pre.get("channels")
    if not _is_int(size, 1):
        problems.append(f"preprocess.input_size {size!r} is not a whole number of pixels of at least 1")
    if not _is_int(resize, 1) or (_is_int(size, 1) and resize < size):
        problems.append(f"preprocess.resize_size {resize!r} is not a whole number of at least input_size ({size!r})")
    if channels not in (1, 3) or isinstance(channels, bool):
        problems.append(f"preprocess.channels {channels!r} is not 1 or 3")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not isinstance(v, list) or not all(is_finite_number(x) for x in v) or (channels in (1, 3) and len(v) != channels) \
                or (key == "std" and not all(x > 0 for x in v)):
            problems.append(f"preprocess.{key} {v!r} is not a list of {channels!r} finite numbers"
                            f"{' above 0' if key == 'std' else ''}")
    if pre.get("interpolation", "bilinear") not in INTERPOLATIONS:
        problems.append(f"preprocess.interpolation {pre.get('interpolation')!r} is not one of {', '.join(INTERPOLATIONS)}")
    ops = pre.get("ops", [])
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
        problems.append(f"preprocess.ops {ops!r} is not a list of op names (e.g. [\"median:3\"])")
    else:
        for op in ops:
            try:
                parse_op(op)
            except ImageRecError as e:
                problems.append(f"preprocess.ops: {e}")
    if not isinstance(pre.get("multi_label", False), bool):
        problems.append(f"preprocess.multi_label {pre.get('multi_label')!r} is not true or false")
    return problems


def _file_problems(files: Any) -> list[str]:
    if not isinstance(files, dict) or not all(isinstance(rec, dict) for rec in files.values()):
        return ["files is not a table of file names to their sha256 and size"]
    problems = []
    for rel, rec in files.items():
        digest, size = rec.get("sha256"), rec.get("bytes", 0)
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            problems.append(f"files['{rel}'].sha256 {str(digest)[:20]!r} is not a sha256 (64 hex digits)")
        if not _is_int(size, 0):
            problems.append(f"files['{rel}'].bytes {size!r} is not a file size")
    return problems


def _runtime_problems(runtimes: list[dict[str, Any]], files: Any) -> list[str]:
    """Every runtime field that loading, predict and benchmark read."""
    problems = []
    names = [r.get("name") for r in runtimes]
    for i, r in enumerate(runtimes):
        name = r.get("name")
        label = f"runtime '{name}'" if isinstance(name, str) and name else f"runtime {i + 1}"
        if not isinstance(name, str) or not name:
            problems.append(f"{label} has no name")
        elif names.count(name) > 1:
            problems.append(f"{label} is listed {names.count(name)} times")
        if r.get("engine") not in ENGINES:
            problems.append(f"{label} has engine {r.get('engine')!r}, not one of {', '.join(ENGINES)}")
        if not isinstance(r.get("file"), str):
            problems.append(f"{label} names no model file")
        elif isinstance(files, dict) and r["file"] not in files:
            problems.append(f"{label} uses {r['file']}, which is not among its hashed files")
        if r.get("precision") not in PRECISIONS:
            problems.append(f"{label} has precision {r.get('precision')!r}, not one of {', '.join(PRECISIONS)}")
        if r.get("engine") == "openvino" and r.get("hint", "f32") not in ("f32", "bf16"):
            problems.append(f"{label} has OpenVINO hint {r.get('hint')!r}, not f32 or bf16")
        parity = r.get("parity")
        if not isinstance(parity, dict) or not isinstance(parity.get("passed"), bool):
            problems.append(f"{label} has no parity result (parity.passed true or false)")
        for key in ("images_per_s", "images_per_s_1thread"):
            if key in r and not (is_finite_number(r[key]) and r[key] >= 0):
                problems.append(f"{label} has {key} {r[key]!r}, not a number of images per second")
    return problems


def _source_problems(source: dict[str, Any]) -> list[str]:
    problems = []
    if "max_pixels" in source and not _is_int(source["max_pixels"], 1):
        problems.append(f"source.max_pixels {source['max_pixels']!r} is not a whole number of at least 1")
    for key in ("run_dir", "checkpoint"):
        if source.get(key) is not None and not isinstance(source[key], str):
            problems.append(f"source.{key} {source[key]!r} is not a path")
    return problems


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Where the manifest's fields have the wrong type or disagree with each other: every field that
    loading, predict, benchmark and serve read (an unsealed manifest, without manifest_sha256, is
    read as it is and may hold any JSON value), class names vs class count (where recorded), input
    shape vs preprocessing, runtimes vs the hashed files. The class count against the model's
    real output is checked when a runtime is created (`check_runtime_output`)."""
    files = manifest.get("files") or {}
    problems = _file_problems(files)
    problems += [p for key in ("preprocess", "output", "input", "source", "quantization")
                 if (p := _table_problem(manifest, key, optional=key != "preprocess"))]
    pre = manifest.get("preprocess")
    if isinstance(pre, dict):
        problems += _preprocess_problems(pre)
    names = pre.get("class_names") if isinstance(pre, dict) else None
    if not _class_name_problems(names):
        top = manifest.get("class_names")
        if top is not None and top != names:
            problems.append(f"class_names {_short(top)} disagree with preprocess.class_names {_short(names)}")
        output = manifest.get("output") if isinstance(manifest.get("output"), dict) else {}
        classes = output.get("classes")
        if classes is not None and classes != len(names):
            problems.append(f"the model outputs {classes!r} classes but preprocess.class_names has {len(names)}")
        shape = (manifest.get("input") if isinstance(manifest.get("input"), dict) else {}).get("shape")
        want = [pre.get("channels"), pre.get("input_size"), pre.get("input_size")]
        if shape is not None and not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == want):
            problems.append(f"input.shape {shape!r} does not match preprocess (channels, input_size) {want[:2]}")
    if isinstance(manifest.get("source"), dict):
        problems += _source_problems(manifest["source"])
    quant = manifest.get("quantization")
    if isinstance(quant, dict) and not isinstance(quant.get("weights", ""), str):
        problems.append(f"quantization.weights {quant.get('weights')!r} is not a description")
    runtimes = manifest.get("runtimes")
    if not isinstance(runtimes, list) or not runtimes or not all(isinstance(r, dict) for r in runtimes):
        problems.append("it lists no runtimes")
        return problems
    problems += _runtime_problems(runtimes, files)
    rt_names = [r.get("name") for r in runtimes]
    for key in ("preferred_runtime", "preferred_runtime_1thread"):
        if manifest.get(key) is not None and manifest[key] not in rt_names:
            problems.append(f"{key} '{manifest[key]}' is not one of its runtimes ({', '.join(map(str, rt_names))})")
    return problems


def check_runtime_output(runtime: Runtime, pre: PreprocessConfig, where: Path) -> None:
    """Run one blank image through a runtime just created from a bundle: it must take the input
    imagerec.json describes and give one score per class name. output.classes is only what the
    export recorded, and a manifest can be edited (and re-sealed, or an older one unsealed): with
    fewer class names than outputs predict crashed (IndexError) after printing its header, and a
    wrong input size failed with OpenVINO's own traceback. A batch of one costs a few ms."""
    x = torch.zeros((1, pre.channels, pre.input_size, pre.input_size), dtype=torch.uint8)
    try:
        out = runtime.run(x)
    except Exception as e:  # ONNX Runtime, OpenVINO and TorchScript each raise their own types
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise ImageRecError(f"bundle {where.parent}: {runtime.name} ({where.name}) does not take the input its "
                            f"{MANIFEST} describes (uint8 1x{pre.channels}x{pre.input_size}x{pre.input_size}): {why}. "
                            f"The manifest has been edited or damaged: export the bundle again") from e
    if tuple(out.shape) != (1, pre.num_classes):
        got = out.shape[-1] if out.ndim == 2 else tuple(out.shape)
        raise ImageRecError(f"bundle {where.parent}: {runtime.name} ({where.name}) outputs {got} scores per image but "
                            f"its {MANIFEST} names {pre.num_classes} classes (the README: the class count and the "
                            f"model's output size must agree); it has been edited or damaged: export the bundle again")


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """The manifest, once its own hash and fields check out and every file it lists is present
    with its recorded sha256."""
    root = Path(path)
    manifest = read_manifest(root)
    check_manifest_hash(manifest, root / MANIFEST)
    files = manifest.get("files") or {}
    if not files:
        raise ImageRecError(f"{root / MANIFEST} lists no files; the bundle is damaged: export it again")
    problems = manifest_problems(manifest)
    if problems:
        raise ImageRecError(f"{root / MANIFEST} contradicts itself: {'; '.join(problems)}. It has been edited or "
                            f"damaged: export the bundle again")
    for rel, rec in files.items():
        p = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ImageRecError(f"{root / MANIFEST}: file entry '{rel}' points outside the bundle")
        if not p.is_file():
            raise ImageRecError(f"bundle {root}: {rel} is missing; export the bundle again")
        digest = sha256_file(p)
        if digest != rec.get("sha256"):
            raise ImageRecError(f"bundle {root}: {rel} has been modified or damaged (sha256 {digest[:12]}..., "
                                f"imagerec.json records {str(rec.get('sha256'))[:12]}...); refusing to load it. "
                                f"Export the bundle again from its run.")
    return manifest


@dataclass
class Bundle:
    """A verified bundle: its manifest, preprocessing config, and runtimes to create on demand.

    Example:
        >>> bundle = load_bundle("exports/mnist-onnx")
        >>> probs = bundle.create_runtime().run(uint8_batch)
    """

    path: Path
    manifest: dict[str, Any]
    pre: PreprocessConfig

    @property
    def runtime_names(self) -> list[str]:
        return [r["name"] for r in self.manifest["runtimes"]]

    @property
    def preferred_runtime(self) -> str:
        """The fastest runtime that passed its gate at export time and can run here (what predict
        uses): a bundle exported where OpenVINO was installed still loads without it."""
        return str(preferred_runtime_entry(self.manifest)["name"])

    def runtime_entry(self, name: str) -> dict[str, Any]:
        for r in self.manifest["runtimes"]:
            if r["name"] == name:
                return dict(r)
        raise ImageRecError(f"bundle {self.path} has no runtime '{name}': it has {', '.join(self.runtime_names)}")

    def create_runtime(self, name: str | None = None, threads: int = 0) -> Runtime:
        """The runtime `name`, or the preferred one for `threads` (preferred_runtime_entry)."""
        entry = self.runtime_entry(name or preferred_runtime_entry(self.manifest, threads)["name"])
        runtime = create_runtime(self.path, entry, threads)
        check_runtime_output(runtime, self.pre, self.path / entry["file"])
        return runtime


def load_bundle(path: str | Path) -> Bundle:
    """Verify and open a bundle folder written by `export_run`/`export_model`.

    Refuses (ImageRecError) a manifest edited since export or whose fields disagree, and any file
    whose sha256 differs; a bundle from before `manifest_sha256` loads with one warning.

    Example:
        >>> bundle = load_bundle("exports/mnist-onnx")
        >>> bundle.preferred_runtime
        'onnx-int8'
    """
    root = Path(path)
    manifest = verify_bundle(root)
    return Bundle(root, manifest, PreprocessConfig.from_dict(manifest["preprocess"]))

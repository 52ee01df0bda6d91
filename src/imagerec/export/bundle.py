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
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagerec.config import PreprocessConfig, write_json
from imagerec.export.runtime import OpenVinoRuntime, OrtRuntime, Runtime, TorchScriptRuntime, openvino_available
from imagerec.utils import ImageRecError, int8_may_saturate, orphaned_siblings, sha256_file

MANIFEST = "imagerec.json"
FORMAT = "imagerec-bundle"
FORMAT_VERSION = 1
ENGINES = ("onnxruntime", "openvino", "torchscript")
MANIFEST_HASH = "manifest_sha256"
_warned_unsealed: set[str] = set()  # bundles already warned about (once per bundle and process)
_warned_saturation: set[str] = set()


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
    log = logging.getLogger("imagerec")
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
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ImageRecError(f"{mpath} is not valid JSON ({e.msg}); the bundle is damaged: export it again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ImageRecError(f"{mpath}: not an imagerec bundle manifest")
    version = manifest.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):  # read before the hash check: any JSON value
        raise ImageRecError(f"{mpath}: format_version {version!r} is not a whole number; the bundle is damaged: "
                            f"export it again")
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
            warnings.warn("this int8 bundle was quantized with 8-bit weights on a CPU with VNNI; this CPU has none, "
                          "where 8-bit int8 kernels can saturate and lose accuracy, so its fp32 runtime is used "
                          "instead. Export it again on this machine (`imagerec export RUN --int8`) for 7-bit "
                          "weights that are safe here.", stacklevel=3)
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
            warnings.warn(f"{mpath} has no {MANIFEST_HASH} (written by an older imagerec), so edits to it cannot be "
                          f"detected; export the bundle again to add one", UserWarning, stacklevel=3)
        return
    if recorded != manifest_digest(manifest):
        raise ImageRecError(f"{mpath}: imagerec.json has been edited; export the bundle again (its content no longer "
                            f"matches the {MANIFEST_HASH} recorded at export, so its class names or preprocessing "
                            f"cannot be trusted)")


def _short(names: Any) -> str:
    names = list(names) if isinstance(names, list | tuple) else [names]
    return "[" + ", ".join(map(str, names[:4])) + (f", ... {len(names)} in all" if len(names) > 4 else "") + "]"


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Where the manifest's own fields disagree: class names, class count vs the model's output
    (where recorded), input shape vs preprocessing, runtimes vs the hashed files."""
    problems = []
    files = manifest.get("files") or {}
    # an unsealed manifest (no manifest_sha256) is read as it is: its `files` may be any JSON value
    files_ok = isinstance(files, dict) and all(isinstance(rec, dict) for rec in files.values())
    if not files_ok:
        problems.append("files is not a table of file names to their sha256 and size")
    pre = manifest.get("preprocess")
    names = pre.get("class_names") if isinstance(pre, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        problems.append("preprocess.class_names is missing or not a list of names")
    else:
        top = manifest.get("class_names")
        if top is not None and top != names:
            problems.append(f"class_names {_short(top)} disagree with preprocess.class_names {_short(names)}")
        classes = (manifest.get("output") or {}).get("classes")
        if classes is not None and classes != len(names):
            problems.append(f"the model outputs {classes} classes but preprocess.class_names has {len(names)}")
        shape = (manifest.get("input") or {}).get("shape")
        want = [pre.get("channels"), pre.get("input_size"), pre.get("input_size")]
        if isinstance(shape, list) and len(shape) == 4 and shape[1:] != want:
            problems.append(f"input.shape {shape} does not match preprocess (channels, input_size) {want[:2]}")
    runtimes = manifest.get("runtimes")
    if not isinstance(runtimes, list) or not runtimes or not all(isinstance(r, dict) for r in runtimes):
        problems.append("it lists no runtimes")
        return problems
    rt_names = [r.get("name") for r in runtimes]
    for r in runtimes:
        if files_ok and r.get("file") not in files:
            problems.append(f"runtime '{r.get('name')}' uses {r.get('file')}, which is not among its hashed files")
    for key in ("preferred_runtime", "preferred_runtime_1thread"):
        if manifest.get(key) is not None and manifest[key] not in rt_names:
            problems.append(f"{key} '{manifest[key]}' is not one of its runtimes ({', '.join(map(str, rt_names))})")
    return problems


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
        return create_runtime(self.path, entry, threads)


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

"""Bundles: a folder with the model file(s) and imagerec.json, written atomically, verified on load.

imagerec.json holds the format and format_version, the preprocessing config and class names,
the source run and its data fingerprint, library/opset versions, the parity results of every
runtime in the bundle, and the sha256 of every other file. `load_bundle` checks every hash
before anything is loaded, and loads nothing with pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagerec.config import PreprocessConfig, write_json
from imagerec.export.runtime import OpenVinoRuntime, OrtRuntime, Runtime, TorchScriptRuntime, openvino_available
from imagerec.utils import ImageRecError, sha256_file

MANIFEST = "imagerec.json"
FORMAT = "imagerec-bundle"
FORMAT_VERSION = 1
ENGINES = ("onnxruntime", "openvino", "torchscript")


def is_bundle(path: str | Path) -> bool:
    """True for a folder holding imagerec.json (a bundle), as opposed to a run directory."""
    return (Path(path) / MANIFEST).is_file()


def staging_dir(out: Path) -> Path:
    """A fresh temp folder beside `out`, so the final rename stays on one filesystem."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finalize_bundle(tmp: Path, out: Path, manifest: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Hash every file in `tmp`, write imagerec.json, then move `tmp` to `out` in one rename."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}}
    write_json(tmp / MANIFEST, manifest)
    old = None
    if out.exists():
        if not overwrite:
            raise ImageRecError(f"{out} already exists: choose another --out, or pass overwrite=True / --overwrite")
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
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
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


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """The manifest, once every file it lists is present with its recorded sha256."""
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest.get("files") or {}
    if not files:
        raise ImageRecError(f"{root / MANIFEST} lists no files; the bundle is damaged: export it again")
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

    Example:
        >>> bundle = load_bundle("exports/mnist-onnx")
        >>> bundle.preferred_runtime
        'onnx-int8'
    """
    root = Path(path)
    manifest = verify_bundle(root)
    return Bundle(root, manifest, PreprocessConfig.from_dict(manifest["preprocess"]))

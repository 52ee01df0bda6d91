"""The Predictor: one object behind `imagerec predict`, `imagerec.load(...).predict(...)` and the server.

It applies the model's own preprocessing config (the one saved at training time) and nothing
else, so predictions agree with `imagerec eval` on the same images.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from imagerec.config import PreprocessConfig
from imagerec.data import read_data
from imagerec.data.decode import (
    DEFAULT_MAX_PIXELS,
    ArrayRef,
    DecodeError,
    Source,
    TarMember,
    ZipMember,
    convert_mode,
    decode_bytes,
    display_name,
    is_image_path,
    is_refused_image_path,
    open_image,
    prepare_pil_image,
)
from imagerec.data.readers import is_broken_link, walk_files
from imagerec.engine.checkpoint import load_model
from imagerec.engine.pipeline import autocast
from imagerec.transforms import base_transform, normalize_batch
from imagerec.utils import (
    ImageRecError,
    available_cpus,
    check_batch_size,
    check_count,
    orphaned_siblings,
    resolve_device,
    resolve_precision,
    run_precision,
    setup_compute,
)

if TYPE_CHECKING:
    from imagerec.export.bundle import Bundle
    from imagerec.export.runtime import Runtime

ImageInput = str | Path | bytes | Image.Image | np.ndarray | Source
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
# Inputs that are one image (not a list of them), as `predict` takes them.
_ONE_IMAGE = (str, Path, bytes, Image.Image, TarMember, ZipMember, ArrayRef)


def is_video_path(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def expand_paths(patterns: Iterable[str | Path]) -> list[str | Source]:
    """Files as given, folders searched recursively for images and videos, globs expanded, and
    `store:NAME` expanded to the stored dataset's images; order kept. A pattern that matches nothing
    is kept as is, so it is reported as not found. A folder's image files of formats imagerec does
    not read (TGA, HEIC, ...) are kept too, so each is reported rather than silently left out."""
    out: list[str | Source] = []
    for pat in patterns:
        p = Path(pat)
        if str(pat).startswith("store:"):
            spec = read_data(str(pat))
            out.extend(it.source for split in sorted(spec.splits) for it in spec.splits[split])
        elif p.is_dir():
            out.extend(_folder_inputs(p))
        elif p.exists() or is_broken_link(p):  # a link to nothing gets its error row, as a missing file does
            out.append(str(p))
        else:
            matches = sorted(glob.glob(str(pat), recursive=True))
            for m in matches:  # a folder a glob matches is searched, as one given by name is
                out.extend(_folder_inputs(Path(m)) if os.path.isdir(m) else [m])
            if not matches:
                out.append(str(pat))
    return out


def _folder_inputs(folder: Path) -> list[str]:
    """The files under `folder` that predict reads or reports (images, videos, image files of formats
    it does not read, links to nothing), sorted by path."""
    return [str(folder / f) for f in walk_files(folder)
            if (is_image_path(f.name) or is_video_path(f.name) or is_refused_image_path(f.name))
            and ((folder / f).is_file() or is_broken_link(folder / f))]


def broken_link_error(path: str | Path) -> str | None:
    """The error for a path that is a symbolic link to nothing (None for any other path)."""
    p = Path(path)
    if not is_broken_link(p):
        return None
    return f"{path}: broken symbolic link -> {os.readlink(p)} (its target does not exist): point it at the file or remove it"


class Predictor:
    """Batched inference with the model's own preprocessing.

    Example:
        >>> predictor = imagerec.load("runs/mnist")
        >>> predictor.predict(["digit.png"], top_k=3)[0]["label"]
        '7'
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        pre: PreprocessConfig,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        meta: dict[str, Any] | None = None,
        runtime: Runtime | None = None,
        threads: int = 0,
    ) -> None:
        """`model` runs in eager PyTorch; or pass `model=None` and a `runtime` (an exported bundle's
        ONNX Runtime / TorchScript session: uint8 (B, C, H, W) -> probabilities) instead.
        `threads`: the model's intra-op threads (0: one per available core). For a runtime they
        were given to its session (`from_bundle`); PyTorch's process-wide count is left at all
        cores then, so a bundle never slows a PyTorch model served beside it."""
        setup_compute(threads if runtime is None else 0)
        if (model is None) == (runtime is None):
            raise ImageRecError("a Predictor needs exactly one of a PyTorch model or an export runtime")
        self.runtime = runtime
        if runtime is not None:
            if device not in ("auto", "cpu"):
                raise ImageRecError(f"exported bundles run on the CPU; got device '{device}': use --device cpu or a run directory")
            self.device, self.amp_dtype, self.model = torch.device("cpu"), None, None
        else:
            assert model is not None
            self.device = resolve_device(device)
            self.amp_dtype = resolve_precision(precision, self.device)
            self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        check_batch_size(batch_size)
        check_max_pixels(max_pixels)
        self.pre, self.batch_size, self.max_pixels = pre, batch_size, int(max_pixels)
        self.meta = meta or {}
        self.transform = base_transform(pre)
        self.class_names = list(pre.class_names)
        self._pool = ThreadPoolExecutor(max_workers=available_cpus())

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs: Any) -> Predictor:
        """A Predictor over a run's best checkpoint. Its pixel limit is the run's own `max_pixels`
        (as `imagerec eval` applies it) unless `max_pixels` is given."""
        model, meta = load_model(run_dir)
        if "runtime" in kwargs:
            raise ImageRecError(f"{run_dir} is a run directory; runtime= applies to exported bundles ('imagerec export')")
        if kwargs.get("max_pixels") is None:
            kwargs["max_pixels"] = (meta.get("train_config") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)
        if kwargs.get("precision") is None:  # the run's own, as `imagerec eval` uses
            device = resolve_device(kwargs.get("device") or "auto")
            kwargs["precision"] = run_precision((meta.get("train_config") or {}).get("precision"), device)
        return cls(model, PreprocessConfig.from_dict(meta["preprocess"]), meta=meta, **kwargs)

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path | Bundle, runtime: str | None = None, **kwargs: Any) -> Predictor:
        """A Predictor over an exported bundle (verified by sha256), with its fastest gated runtime or
        `runtime`. Pass a `Bundle` from `load_bundle` to make several copies without verifying again.
        Its pixel limit is the source run's `max_pixels` (recorded at export) unless `max_pixels` is given."""
        from imagerec.export.bundle import Bundle, load_bundle

        bundle = bundle_dir if isinstance(bundle_dir, Bundle) else load_bundle(bundle_dir)
        if kwargs.get("max_pixels") is None:
            kwargs["max_pixels"] = (bundle.manifest.get("source") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)
        kwargs.pop("precision", None)  # the runtime's precision is the bundle's (fp32 or int8)
        session = bundle.create_runtime(runtime, threads=kwargs.get("threads", 0))
        return cls(None, bundle.pre, meta=bundle.manifest, runtime=session, **kwargs)

    # --- preprocessing ----------------------------------------------------------------------------
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image -> uint8 (C, H, W), exactly as evaluation prepares it."""
        draft = (self.pre.resize_size, self.pre.resize_size)
        if isinstance(image, Image.Image):
            # EXIF orientation, pixel limit and mode as a path or bytes get. Not the reduced-size
            # JPEG decode (`draft`), though: it must be set before the pixels are decoded, and on
            # the caller's own image it would change that image (its size and mode) for the caller
            # too; an image already loaded, or made in memory, has no compressed data left to draft
            # from. A large JPEG passed this way can so differ from its path by a few levels.
            img = prepare_pil_image(image, "PIL image", self.pre.channels, self.max_pixels)
        elif isinstance(image, np.ndarray):
            img = convert_mode(_array_image(image), self.pre.channels)
        elif isinstance(image, bytes):
            img = decode_bytes(image, "upload", self.pre.channels, self.max_pixels, draft)
        else:
            src = str(image) if isinstance(image, Path) else image
            img = open_image(src, self.pre.channels, max_pixels=self.max_pixels, draft_size=draft)
        return self.transform(img)

    # --- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> probabilities (B, K) (softmax, or sigmoid for multi-label)."""
        if self.runtime is not None:
            return self.runtime.run(x.cpu()).float()  # normalisation and softmax/sigmoid are inside the graph
        assert self.model is not None
        x = normalize_batch(x.to(self.device), self.pre.mean, self.pre.std).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(x).float()
        return (torch.sigmoid(logits) if self.pre.multi_label else torch.softmax(logits, dim=1)).cpu()

    def _result(self, name: str, probs: torch.Tensor, top_k: int) -> dict[str, Any]:
        k = min(top_k, len(self.class_names))
        # A stable sort ranks tied scores (common with bf16 logits) lowest index first, like the
        # argmax behind `imagerec eval`; topk's order for ties is unspecified. NumPy, not torch:
        # the server calls this on its event loop, and a torch op there costs a GIL release.
        p = probs.numpy()
        idx = np.argsort(-p, kind="stable")[:k]
        topk = [{"label": self.class_names[i], "score": round(float(p[i]), 6)} for i in idx.tolist()]
        out: dict[str, Any] = {"path": name, "label": topk[0]["label"], "score": topk[0]["score"], "topk": topk}
        if self.pre.multi_label:
            out["labels"] = [self.class_names[i] for i in np.flatnonzero(p >= 0.5).tolist()]
        return out

    def predict_iter(self, images: Sequence[ImageInput], top_k: int = 5, names: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Predictions in input order; an unreadable image yields {"path", "error"} and the rest go on."""
        names = list(names) if names is not None else [input_name(im, i) for i, im in enumerate(images)]
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            decoded = list(self._pool.map(self._safe_preprocess, chunk))
            good = [(j, t) for j, t in enumerate(decoded) if isinstance(t, torch.Tensor)]
            probs = self.predict_batch(torch.stack([t for _, t in good])) if good else None
            finite = torch.isfinite(probs).all(dim=1).tolist() if probs is not None else []
            row = {j: k for k, (j, _) in enumerate(good)}
            for j, t in enumerate(decoded):
                name = names[start + j]
                if isinstance(t, str):
                    yield {"path": name, "error": t}
                elif not finite[row[j]]:  # a NaN score is no prediction (and `NaN` is not JSON)
                    yield {"path": name, "error": f"{name}: the model's output is NaN or infinite (its weights hold "
                                                  "NaN or inf, or its precision overflowed): no prediction"}
                else:
                    assert probs is not None
                    yield self._result(name, probs[row[j]], top_k)

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5) -> list[dict[str, Any]]:
        """One image or several: paths, bytes, PIL images, uint8 arrays (H, W) or (H, W, 1|3|4), or a
        batch of them (N, H, W[, C]; a 3-D array whose last axis is not 1, 3 or 4 is N grayscale
        images). One result per image, in order."""
        if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
            raise ImageRecError(f"top_k must be at least 1, got {top_k!r}: give a whole number, e.g. top_k=5")
        items = _image_list(images)
        for im in items:
            if not isinstance(im, (*_ONE_IMAGE, np.ndarray)) and not _is_store_blob(im):
                raise ImageRecError(f"cannot predict on a {type(im).__name__}: give file paths, bytes, PIL images "
                                    "or uint8 arrays of shape (H, W), (H, W, 3) or (N, H, W[, 3]), or a list of them")
        return list(self.predict_iter(items, int(top_k)))

    def _safe_preprocess(self, image: ImageInput) -> torch.Tensor | str:
        try:
            return self.preprocess(image)
        except DecodeError as e:
            link = broken_link_error(image) if isinstance(image, str | Path) else None
            return link or str(e)


def _image_list(images: object) -> list[Any]:
    """`predict`'s input as a list of images: one image, a list/tuple/iterable of them, or an array
    batch. Anything else comes back as a one-item list, for the type check to name."""
    if isinstance(images, np.ndarray):
        one = images.ndim <= 2 or (images.ndim == 3 and images.shape[2] in (1, 3, 4))
        return [images] if one else list(images)
    if isinstance(images, list | tuple):
        return list(images)
    if isinstance(images, _ONE_IMAGE) or not isinstance(images, Iterable) or isinstance(images, dict):
        return [images]
    return [images] if _is_store_blob(images) else list(images)  # a generator, a map, ...


def _is_store_blob(obj: object) -> bool:
    """A `store:NAME` image; the store (and SQLAlchemy) is imported only for inputs of no other kind."""
    from imagerec.store.blobref import StoreBlob

    return isinstance(obj, StoreBlob)


def _array_image(arr: np.ndarray) -> Image.Image:
    """A uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as a PIL image."""
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))) or 0 in arr.shape:
        raise DecodeError(f"array of dtype {arr.dtype} and shape {arr.shape}: give uint8 pixels of shape (H, W), "
                          "(H, W, 3) or (H, W, 4)")
    arr = np.ascontiguousarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    return Image.fromarray(arr, "L" if arr.ndim == 2 else {3: "RGB", 4: "RGBA"}[arr.shape[2]])


def input_name(image: ImageInput, i: int) -> str:
    """The name a prediction row is written under (and `--resume` looks for) for input `i`."""
    if isinstance(image, bytes | Image.Image | np.ndarray):
        return f"<image {i}>"
    return str(image) if isinstance(image, str | Path) else display_name(image)


def check_max_pixels(max_pixels: object) -> None:
    """Refuse a pixel limit that is not a whole number >= 1 when it is given, not at the first
    image: a string failed deep in the decoder (TypeError), and 0 refused every image one by one."""
    check_count(max_pixels, "max_pixels", "e.g. max_pixels=40_000_000 (--max-pixels)")


def check_model_path(source: str | Path) -> None:
    """A clear error for a model path that does not exist (before anything tries to load it)."""
    path = Path(source)
    if not path.exists():
        aside = orphaned_siblings(path, "old")
        hint = (f"; {aside[0]} holds the bundle an interrupted 'imagerec export --overwrite' moved aside: exporting "
                f"to {source} again puts it back first, or rename it to {source}") if aside else ""
        raise ImageRecError(f"model not found: {source} (give a run directory written by 'imagerec train' "
                            f"or a bundle folder written by 'imagerec export'){hint}")


def load(source: str | Path, **kwargs: Any) -> Predictor:
    """A Predictor for a run directory (its best checkpoint) or an exported bundle folder (has imagerec.json)."""
    if kwargs.get("max_pixels") is not None:  # None: the run's or bundle's own limit
        check_max_pixels(kwargs["max_pixels"])
    check_model_path(source)
    if (Path(source) / "imagerec.json").is_file():
        return Predictor.from_bundle(source, **kwargs)
    return Predictor.from_run(source, **kwargs)

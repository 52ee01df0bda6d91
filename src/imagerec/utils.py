"""Small shared helpers: the user-facing error type, seeding, hashing, hardware facts."""

from __future__ import annotations

import difflib
import hashlib
import os
import platform
from collections.abc import Iterable
from pathlib import Path

import torch


class ImageRecError(Exception):
    """An error the user can fix: the message says what was wrong and what to do.

    The CLI prints these as one line without a traceback.
    """


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def mix_seed(*parts: int) -> int:
    """Derive one 63-bit seed from several integers (seed, epoch, step, index...).

    Every random choice in training is drawn from a generator seeded this way, so a run is a
    pure function of (seed, epoch, step) and can be resumed exactly at any step.
    """
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def md5_file(path: str | Path) -> str:
    return file_digest(path, "md5")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ImageRecError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ImageRecError(f"device '{name}' asked for, but no CUDA GPU is available: use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto|fp32|bf16|fp16) on `device`; None = fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ImageRecError("precision fp16 needs a CUDA device: use bf16 or fp32 on CPU")
        return torch.float16
    raise ImageRecError(f"unknown precision '{precision}': use auto, fp32, bf16 or fp16")


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(num_threads: int = 0) -> int:
    """Use one intra-op thread per physical core unless told otherwise."""
    n = num_threads or available_cpus()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def library_versions() -> dict[str, str]:
    import numpy
    import PIL
    import safetensors
    import timm
    import torchvision

    from imagerec import __version__

    return {
        "imagerec": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }

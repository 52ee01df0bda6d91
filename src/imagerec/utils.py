"""Small shared helpers: the user-facing error type, seeding, hashing, hardware facts."""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import errno
import functools
import glob
import hashlib
import logging
import math
import os
import platform
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


class ImageRecError(Exception):
    """An error the user can fix: the message says what was wrong and what to do.

    The CLI prints these as one line without a traceback.
    """


def check_count(value: object, what: str, hint: str = "") -> None:
    """Refuse `value` unless it is a whole number of at least 1 (not a bool): "WHAT must be a whole
    number of at least 1, got VALUE[: HINT]". Counts and limits given as 0, a negative, a float or a
    string otherwise fail deep inside, or silently mean something else ("all images")."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ImageRecError(f"{what} must be a whole number of at least 1, got {value!r}" + (f": {hint}" if hint else ""))


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite: NaN and inf are no setting's or manifest field's value."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size below 1 (zero crashes a batched loop; a negative one predicts nothing)."""
    check_count(batch_size, "batch size", "use e.g. --batch-size 64 / batch_size=64")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, durable: bool = False, **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Write `path` all or nothing: the body writes a temp file beside it, which replaces `path` in
    one rename when the body finishes. On any error (an exception in the body, a full disk, a file
    size limit) the temp file is removed and `path` keeps what it held, so a crash or a kill never
    leaves a truncated file. `durable` fsyncs before the rename (a power cut keeps the new file).

    Example:
        with atomic_write(run_dir / "history.csv", newline="") as f:
            f.write(text)
    """
    path = Path(path)
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    # a fresh name per writer (two processes may write one file) opened exclusively ("x"), so it
    # gets the usual permissions (umask), unlike mkstemp's 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    created = False
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            created = True
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Only a temp file that exists is removed, and a failed removal does not hide the error: on a
        # read-only file system unlink fails (EROFS) even for a name that is not there.
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) == str(tmp):
            # The temp name is internal: the error names the file the caller asked for.
            e.filename, e.filename2 = str(path), None
        raise


def new_file_mode() -> int:
    """The mode a file created now gets from open(): 0o666 less the process umask. For writers that
    create files their own way (safetensors writes 0600), so every file of a run reads alike."""
    try:  # Linux shows the umask without setting it; os.umask can only read it by changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def process_alive(pid: int) -> bool:
    """False only when no process `pid` exists here (checked on POSIX; elsewhere assumed alive)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) is not a harmless probe on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def orphaned_siblings(out: Path, kind: str) -> list[Path]:
    """The `.OUT.KIND-PID` entries beside `out` that a process which has since died left behind
    (staging_dir's `partial`, an export --overwrite's `old`), sorted; those of this process and of
    live ones are not included."""
    found = []
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            found.append(path)
    return found


def staging_dir(out: Path, what: str) -> Path:
    """A fresh hidden folder `.OUT.partial-PID` beside `out`, to be renamed to `out` when complete
    (one filesystem, so the rename is atomic). Those left by a `what` that was killed (its process
    is gone) are removed first, with a warning, so a re-run needs no cleanup by hand."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in orphaned_siblings(out, "partial"):
        logging.getLogger("imagerec").warning("removing %s, the unfinished folder of %s that was interrupted", old, what)
        shutil.rmtree(old, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files together, all or nothing as far as a file system allows: every temp file
    is complete before the first rename, and the renames go in the given order (put a record of the
    others last). A failed write (a full disk, a file size limit) replaces none of them and raises
    ImageRecError naming the file.

    Example:
        atomic_write_files({run_dir / "eval-test.json": text.encode(), run_dir / "confusion-test.png": png})
    """
    with contextlib.ExitStack() as stack:
        for path in reversed(files):  # an ExitStack exits, so renames, last-entered first
            try:
                f = stack.enter_context(atomic_write(path, "wb"))
                f.write(files[path])
                f.flush()
            except OSError as e:
                raise ImageRecError(f"cannot write {path}: {write_error_text(e)} (none of "
                                    f"{', '.join(p.name for p in files)} was replaced)") from e


def write_error_text(e: BaseException) -> str:
    """Why a write failed and what to do, for an error message: "No space left on device; free some
    disk space". Also reads the OS error from errors that carry it only as text (safetensors:
    "I/O error: File too large (os error 27)")."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := re.search(r"os error (\d+)", str(e))):
        code = int(m.group(1))
    reason = os.strerror(code) if code else str(e)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}; free some disk space"
    if code == errno.EFBIG:
        return f"{reason}; the file is over a file size limit (ulimit -f) or the file system's maximum"
    return f"{reason}; check that its folder exists and is writable"


# Names other tools (timm, ultralytics, Lightning, Keras) give training settings, and imagerec's
# own: a config file written for one of them gets the key it means, which spelling alone misses.
SETTING_ALIASES = {
    "learning_rate": "lr", "lr0": "lr", "base_lr": "lr", "wd": "weight_decay", "num_epochs": "epochs",
    "max_epochs": "epochs", "n_epochs": "epochs", "batch": "batch_size", "img_size": "image_size",
    "imgsz": "image_size", "arch": "model", "opt": "optimizer", "sched": "schedule", "lr_scheduler": "schedule",
    "scheduler": "schedule", "smoothing": "label_smoothing", "clip_grad": "grad_clip",
    "gradient_clip_val": "grad_clip", "patience": "early_stopping", "warmup": "warmup_epochs",
    "num_workers": "workers", "random_seed": "seed", "amp": "precision", "val_split": "val_fraction",
    "validation_split": "val_fraction",
}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or '' if none is close. Case is ignored
    ('adamW' -> 'adamw', not 'adam'), and a setting's name in other tools (`SETTING_ALIASES`:
    learning_rate -> lr) suggests imagerec's."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(str(choice).lower(), str(choice))
    key = str(word).lower()
    alias = SETTING_ALIASES.get(key)
    if key in by_lower:
        best = by_lower[key]
    elif alias is not None and alias in by_lower:
        best = by_lower[alias]
    else:
        close = difflib.get_close_matches(key, list(by_lower), n=1, cutoff=0.6)
        best = by_lower[close[0]] if close else ""
    return f" Did you mean '{best}'?" if best else ""


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


@functools.cache
def _cpu_flags() -> str:
    """/proc/cpuinfo's text on Linux ("" elsewhere or when unreadable)."""
    if platform.system() != "Linux":
        return ""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    return any(f in _cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def int8_may_saturate() -> bool:
    """True on an x86 CPU without int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX-INT8),
    or whose flags cannot be read: there u8 x s8 kernels add pairs of products in int16, which 8-bit
    weights can saturate (OpenVINO's "saturation issue"; ONNX Runtime's `reduce_range`)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not any(f in _cpu_flags() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


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
        if device.type == "cpu" and not cpu_supports_bf16():
            logging.getLogger("imagerec").warning(
                "--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated and runs "
                "several times slower than fp32 (a small CNN on an AVX2 machine: 51 vs 472 img/s); "
                "use --precision auto, which picks fp32 here")
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ImageRecError("precision fp16 needs a CUDA device: use bf16 or fp32 on CPU")
        return torch.float16
    raise ImageRecError(f"unknown precision '{precision}': use auto, fp32, bf16 or fp16")


def run_precision(saved: str | None, device: torch.device) -> str:
    """The precision to evaluate or predict with a run trained at `saved`: the same, so the numbers
    repeat training's, unless this device cannot run it (fp16 off CUDA, bf16 on a CPU without bf16
    units, where it is emulated several times slower): then auto."""
    saved = saved or "auto"
    if (saved == "fp16" and device.type != "cuda") or (saved == "bf16" and device.type == "cpu" and not cpu_supports_bf16()):
        return "auto"
    return saved


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def setup_compute(num_threads: int = 0) -> int:
    """Before training or inference: one intra-op thread per available core unless told otherwise,
    and freed memory kept for reuse (retain_freed_memory). Returns the thread count."""
    n = num_threads or available_cpus()
    torch.set_num_threads(max(1, n))
    retain_freed_memory()
    return torch.get_num_threads()


class CpuLoadProbe:
    """How many cores other processes keep busy, sampled in a background thread while a command starts.

    torch's OpenMP threads spin while they wait for each other; with one thread per core and another
    process busy on one of the cores they wait far longer than their share (`bench/contention.py`,
    2-core AVX2 machine, one busy process: 2 threads ran at 0.34-0.36x the quiet rate, 1 thread at
    0.62-0.68x). Busy = the whole machine's non-idle time in /proc/stat (steal included) minus this
    process's own CPU time, over the window.
    """

    def __init__(self, seconds: float = 0.25) -> None:
        self.busy = 0.0
        self._thread = threading.Thread(target=self._sample, args=(seconds,), name="cpu-load-probe", daemon=True)
        self._thread.start()

    @staticmethod
    def _machine_ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(vals), vals[3] + vals[4]

    def _sample(self, seconds: float) -> None:
        try:
            total0, idle0 = self._machine_ticks()
            own0, wall0 = time.process_time(), time.monotonic()
            time.sleep(seconds)
            total1, idle1 = self._machine_ticks()
            own1, wall1 = time.process_time(), time.monotonic()
        except (OSError, ValueError, IndexError):
            return  # no /proc (not Linux): nothing to say
        wall, hz = wall1 - wall0, os.sysconf("SC_CLK_TCK")
        busy = ((total1 - total0) - (idle1 - idle0)) / hz / wall
        self.busy = max(0.0, busy - (own1 - own0) / wall)

    def advice(self, threads: int) -> str | None:
        """A warning when other processes use more cores than `threads` leaves free, else None."""
        self._thread.join()
        cpus = available_cpus()
        if self.busy <= cpus - threads + 0.5:
            return None
        fewer = max(1, cpus - round(self.busy))
        if fewer >= threads:
            return None  # already as few threads as the other work leaves room for
        return (f"other processes are keeping {self.busy:.1f} of this machine's {cpus} cores busy, and this run uses "
                f"{threads} threads: they will wait on each other and run much slower than their share; "
                f"pass --num-threads {fewer} (or stop the other work) for a faster run")


# glibc mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def c_library() -> ctypes.CDLL:
    """The C library's symbols as this process has them loaded (glibc on Linux)."""
    return ctypes.CDLL(None, use_errno=True)


def retain_freed_memory() -> bool:
    """Have glibc keep memory that tensors free for reuse instead of handing it back to the OS.

    By default glibc serves every allocation over 32 MB (and, adaptively, smaller ones) with a fresh
    mmap and unmaps it on free, so every training step faults its activations in again page by
    page. Measured on a 2-core AMD machine: a 2-epoch airbench94 CIFAR-10 run took 10.7M minor page
    faults and 68.7 s an epoch, 0.56M and 66.6 s with this (same accuracy); a ResNet-18 CIFAR step
    at batch 128 ran ~5% faster in bf16, ~20% in fp32 (`bench/train.py throughput` applies it to
    its fast path only). jemalloc/tcmalloc, which PyTorch's CPU tuning guide suggests preloading,
    behave this way by design; on the same machine it made a PyTorch bf16 ResNet-18 inference at
    224 px, batch 32, 1.3-1.5x faster (no faults instead of ~400k per 8 batches). The price is
    memory: the process keeps its peak heap until it exits, and glibc's heap fits a repeating
    pattern of large aligned blocks only after a few steps of growth (a lone 64 MB tensor
    allocated in a loop: 6 steps, RSS +380 MB; `imagerec train mnist --recipe fast`: 1,021 MB
    flat across epochs vs 850; the ResNet-18 step: peak RSS 1,425 vs 1,418 MB). Returns False
    where it does not apply (not Linux glibc); safe to call more than once.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = c_library().mallopt
    except (OSError, AttributeError):
        return False
    limit = ctypes.c_int(1 << 30)  # allocations up to 1 GB come from the heap and stay there
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


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

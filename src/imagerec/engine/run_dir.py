"""The run directory of `train`: claimed with an exclusive lock while a process trains into it, and
whether its recorded final evaluation (`metrics.json`) belongs to its checkpoints.

Two `train` commands with the same `--out` (or a `--resume` of a run being trained) would both
write the folder and each lose the other's work: the second is refused at once. Under torchrun only
rank 0, which writes the run directory, takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from imagerec.config import TrainConfig
from imagerec.engine.checkpoint import finish_interrupted_save, has_checkpoint, read_checkpoint_meta
from imagerec.utils import ImageRecError

try:
    import fcntl
except ImportError:  # not Unix: runs go unlocked, as before there was a lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("imagerec")
LOCK_FILE = ".train.lock"


class RunDirLock:
    """An exclusive flock on `DIR/.train.lock`. The kernel drops it when the process ends, however
    it ends, so a file left by a killed run locks nothing; a normal release removes the file. Where
    flock is missing (not Unix) or refused (some network file systems) the run goes unlocked."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path = folder, folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True when this process holds the lock now (or cannot lock here); False when another does."""
        if fcntl is None:
            return True
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only run folder: no process can train into it
                log.info("cannot create %s (%s); not locking the run", self.path, e.strerror)
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                os.close(fd)
                log.warning("cannot lock %s (%s): another process could train into %s at the same time",
                            self.path, e.strerror, self.folder)
                return True
            try:
                st = os.stat(self.path)
                current = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                current = False
            if current:
                self._fd = fd
                with contextlib.suppress(OSError):  # who holds it, for the message of the process it refuses
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return True
            os.close(fd)  # its holder removed the file as this process locked it: lock the new one

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock now; takes nothing and creates nothing."""
        if fcntl is None:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file: nobody trains here
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # drops the probe's own lock, if it took one
        return False

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None

    def busy_error(self) -> ImageRecError:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        who = f"another process (pid {pid})" if pid.isdigit() else "another process"
        return ImageRecError(f"{self.folder}: {who} is training into this folder right now; wait until it has "
                             f"finished, or choose another --out")


def _contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)


def _next_free(out: str) -> Path:
    """The default `runs/exp` while it is missing or empty, else the first runs/expN that does not exist."""
    p = Path(out)
    if not p.exists() or not any(p.iterdir()):
        return p
    k = 2
    while Path(f"{out}{k}").exists():
        k += 1
    return Path(f"{out}{k}")


# What a run killed before its first `last` checkpoint can leave beside its config.yaml: the temp
# files of an interrupted save (or weights whose metadata it never wrote), and (saved by imagerec
# before `last` came first) a lone `best`, which has no optimizer state to resume from.
_INTERRUPTED = {f"{name}{ext}" for name in ("best", "last") for ext in
                (".json.tmp", ".safetensors.tmp", ".safetensors")} | {"best.json"}


def _interrupted_files(p: Path) -> list[str] | None:
    """The files of a run that stopped before its first `last` checkpoint, besides its config.yaml
    (--resume says "nothing to resume" there); None when `p` holds anything else."""
    held = _contents(p)
    if "config.yaml" not in held or has_checkpoint(p / "last") or not set(held) <= _INTERRUPTED | {"config.yaml"}:
        return None
    return [n for n in held if n != "config.yaml"]


def _check_reusable(p: Path) -> None:
    """Refuse an explicit --out that holds a run or other files; one that holds only what a run that
    stopped before its first checkpoint wrote (`_interrupted_files`) is trained into again."""
    held = _contents(p)
    if not held:
        return
    if has_checkpoint(p / "last"):
        raise ImageRecError(f"{p} already holds a run; continue it with --resume {p}, or choose another --out")
    if _interrupted_files(p) is not None:
        return
    raise ImageRecError(f"--out {p} is a folder that is not empty and holds no run ({', '.join(held[:3])}"
                        f"{', ...' if len(held) > 3 else ''}); choose a new or empty folder")


def _clear_interrupted(p: Path) -> None:
    """Training again into the folder of a run that stopped before its first checkpoint: remove
    what it left (a lone `best` would otherwise stand beside the new run's files), saying so."""
    stale = _interrupted_files(p)
    if stale is None:
        return
    if not stale:
        log.warning("%s holds only the config.yaml of a run that stopped before its first checkpoint; "
                    "training into it again", p)
        return
    for name in stale:
        (p / name).unlink(missing_ok=True)
    log.warning("%s holds only the config.yaml and %s of a run that stopped before its first checkpoint "
                "(nothing to resume: no `last`); removed them, training into it again from the start",
                p, ", ".join(stale))


def _refuse_non_folder(p: Path) -> None:
    """Refuse an --out that is a file, or is (or lies under) a symbolic link to nothing."""
    for q in (p, *p.parents):
        if q.is_symlink() and not q.exists():
            where = f"--out {p}" if q == p else f"{q}, a folder of --out {p},"
            raise ImageRecError(f"{where} is a symbolic link to {os.readlink(q)}, which does not exist: create that "
                                "folder or give another --out")
    if p.exists() and not p.is_dir():
        raise ImageRecError(f"--out {p} is a file; give a folder for the run (it is created if missing)")


def precheck_out(out: str) -> None:
    """The refusals `claim_run_dir` would give an explicit --out (a file, a run being trained into,
    a folder holding a run or other files), made before the data is read, which can take minutes.
    `claim_run_dir` still decides, under the lock."""
    p = Path(out)
    if out == TrainConfig.out:
        return
    _refuse_non_folder(p)
    if not p.exists():
        return
    lock = RunDirLock(p)
    if lock.held_elsewhere():
        raise lock.busy_error()
    _check_reusable(p)


def claim_run_dir(out: str, held: contextlib.ExitStack) -> Path:
    """The folder a new run trains into, created and locked until `held` closes: `out`, or with the
    default `runs/exp` the first free one of runs/exp, runs/exp2, ... (one that another run has
    just claimed is skipped)."""
    auto = out == TrainConfig.out
    while True:
        p = _next_free(out) if auto else Path(out)
        _refuse_non_folder(p)
        p.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(p)
        if not lock.acquire():
            if auto:
                continue  # another run took it first: the next number
            raise lock.busy_error()
        try:
            if auto and _contents(p):
                lock.release()  # filled by a run that finished since it was picked: the next number
                continue
            if not auto:
                _check_reusable(p)
                _clear_interrupted(p)
        except BaseException:
            lock.release()
            raise
        held.callback(lock.release)
        return p


def lock_for_resume(run_dir: Path, saved: dict[str, Any], held: contextlib.ExitStack) -> None:
    """Lock `run_dir` for `--resume` until `held` closes; `saved` is its last checkpoint's metadata
    as read before the lock (refused if another process has saved since). Under the lock, the
    writer finishes a checkpoint save that was killed between its two renames (readers leave it)."""
    lock = RunDirLock(run_dir)
    if not lock.acquire():
        raise lock.busy_error()
    held.callback(lock.release)
    for name in ("last", "best"):
        finish_interrupted_save(run_dir / name)
    if read_checkpoint_meta(run_dir / "last").get("weights_id") != saved.get("weights_id"):
        raise ImageRecError(f"{run_dir} was saved by another process while this command started; run it again")


def checkpoint_ids(run_dir: Path) -> dict[str, str | None]:
    """The `weights_id` of the run's best and last checkpoints: metrics.json records the ones it evaluated."""
    return {name: read_checkpoint_meta(run_dir / name).get("weights_id")
            for name in ("best", "last") if has_checkpoint(run_dir / name)}


def recorded_metrics(run_dir: Path, epoch: int) -> dict[str, Any] | None:
    """The run's metrics.json when it is the final evaluation of its current checkpoints (`epoch`:
    the epochs they trained); None when it is missing, unreadable, or older than them: a run stopped
    during its final evaluation, after its last checkpoint. A metrics.json written before imagerec
    recorded `checkpoints` in it is matched by its `epochs_run`."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s); evaluating the run again", path, e)
        return None
    if not isinstance(metrics, dict) or metrics.get("epochs_run") != epoch:
        return None
    recorded = metrics.get("checkpoints")
    return metrics if recorded is None or recorded == checkpoint_ids(run_dir) else None

"""Session 21 (QA "sec" bug 3): the cached copy of a .tar.gz follows the archive's content, not only
its size and mtime, and the cache keeps one copy per archive path (a new version replaces the old)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from imagerec.data import read_data
from imagerec.data.decode import read_bytes

MTIME_NS = 1_700_000_000 * 10**9


def _tar_gz(members: dict[str, bytes]) -> bytes:
    """A gzip (level 0: the size does not depend on the content) of a plain tar with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), 0, mtime=0)


def _version(tag: bytes) -> dict[str, bytes]:
    return {f"{c}/{i}.png": tag + bytes([i]) * 100 for c in ("cat", "dog") for i in range(2)}


def _contents(path: Path) -> dict[str, bytes]:
    spec = read_data(str(path))
    return {it.source.name: read_bytes(it.source) for items in spec.splits.values() for it in items}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "archives"


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_replaced_archive_of_the_same_size_and_mtime_is_read_anew(tmp_path: Path, cache: Path, how: str) -> None:
    v1, v2 = _tar_gz(_version(b"v1")), _tar_gz(_version(b"v2"))
    assert len(v1) == len(v2)
    data = tmp_path / "data.tar.gz"
    data.write_bytes(v1)
    os.utime(data, ns=(MTIME_NS, MTIME_NS))
    assert _contents(data) == _version(b"v1")
    if how == "in place":  # cp v2 data.tar.gz: same inode
        data.write_bytes(v2)
    else:  # rsync -t, mv: another inode
        (tmp_path / "new.tar.gz").write_bytes(v2)
        os.replace(tmp_path / "new.tar.gz", data)
    os.utime(data, ns=(MTIME_NS, MTIME_NS))
    assert data.stat().st_size == len(v1) and data.stat().st_mtime_ns == MTIME_NS
    assert _contents(data) == _version(b"v2")
    assert len(list(cache.iterdir())) == 1  # the copy of v1 was removed


def test_the_cache_keeps_one_copy_per_archive(tmp_path: Path, cache: Path) -> None:
    data = tmp_path / "a" / "data.tar.gz"
    same_stem = tmp_path / "b" / "data.tar.gz"  # another archive of the same stem: its copy is not ours to remove
    for p in (data, same_stem):
        p.parent.mkdir()
        p.write_bytes(_tar_gz(_version(b"v1")))
    _contents(same_stem)
    for k in range(3):  # three versions (new mtimes) of one archive
        os.utime(data, ns=(MTIME_NS + k, MTIME_NS + k))
        assert _contents(data) == _version(b"v1")
    in_progress = cache / ".data-0123abcd-0123456789abcdef.tar.123-abc.tmp"  # another process's atomic write
    in_progress.write_bytes(b"partial")
    os.utime(data, ns=(MTIME_NS + 9, MTIME_NS + 9))
    _contents(data)
    copies = sorted(p.name for p in cache.iterdir())
    assert len(copies) == 3, copies
    assert in_progress.name in copies
    assert len([c for c in copies if not c.startswith(".")]) == 2  # one per archive path
    os.utime(data, ns=(MTIME_NS + 9, MTIME_NS + 9))
    before = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    _contents(data)  # unchanged archive: its copy is used again, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == before

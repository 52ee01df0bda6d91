"""The archive reader: the image folder layout inside a .tar, .tar.gz, .tgz or .zip, read in place.

Nothing is unpacked into the user's folders. A gzipped tar is decompressed once into the cache
(`$IMAGEREC_CACHE`, else `~/.cache/imagerec`), since a gzip stream cannot be read at random
offsets; members are then read at their offsets in the plain tar. The cache keeps one copy per
archive path: a replaced archive is unpacked again and its older copy removed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import posixpath
import re
import shutil
import tarfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from imagerec.data.decode import Source, TarMember, ZipMember, is_image_path
from imagerec.data.readers import DataSpec, broken_links_note, hidden_path, refused_images_note, spec_from_layout
from imagerec.utils import ImageRecError, atomic_write, write_error_text


def _cache_dir() -> Path:
    base = os.environ.get("IMAGEREC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imagerec"
    )
    return Path(base)


def _fingerprint(path: Path) -> str:
    """What the cached copy of the .tar.gz at `path` is keyed on: the file (its inode, size and
    mtime) and a cheap look at its content, the first 64 KiB and the gzip trailer (CRC32 and size of
    the whole uncompressed stream). An archive replaced by another of the same size with its mtime
    kept (`cp -p`, `rsync -t`, unpacking a release tarball) gets a new key: in place its trailer
    differs, and a copy renamed over it has another inode."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{st.st_dev}|{st.st_ino}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 16))
        if st.st_size >= 8:
            f.seek(-8, os.SEEK_END)
            h.update(f.read(8))
    return h.hexdigest()[:16]


def _ungzip_to_cache(path: Path) -> Path:
    """A .tar.gz cannot be read at random offsets: unpack the tar stream once into the cache.

    The copy is named `<stem>-<source>-<key>.tar`: `source` stands for the archive's path and `key`
    for its content (`_fingerprint`). Writing a new copy for a path removes its older ones (the
    archive was replaced), so the cache holds one copy per archive path, not one per version.

    Several processes (torchrun ranks) may unpack the same archive at once: each writes its own
    hidden temp file and renames it into place atomically, so none sees another's half-written file
    (the last rename wins; the copies are the same bytes). Temp files are never removed here.
    """
    source = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    prefix = f"{path.name.split('.')[0]}-{source}-"
    try:
        out = _cache_dir() / "archives" / f"{prefix}{_fingerprint(path)}.tar"
    except OSError as e:
        raise ImageRecError(f"{path}: cannot read archive ({e}); is it a complete .tar.gz?") from e
    if out.exists():
        return out
    # a read fails for the archive (truncated, not gzip); anything else for the cache (a full disk, a
    # path that is not a folder), which was reported as "is the archive complete?" about a good archive
    try:
        with gzip.open(path, "rb") as src:
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out, "wb") as dst:
                shutil.copyfileobj(_GzipStream(path, src), dst, 1 << 20)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise ImageRecError(
            f"{path}: cannot unpack it into the cache folder {out.parent} ({where}{write_error_text(e)}), or set "
            "IMAGEREC_CACHE to a folder with room for the uncompressed tar"
        ) from e
    _remove_older_copies(out, prefix)
    return out


class _GzipStream:
    """The archive's tar stream, whose read errors name the archive (a write error is the cache's)."""

    def __init__(self, path: Path, src: gzip.GzipFile) -> None:
        self.path, self.src = path, src

    def read(self, size: int = -1) -> bytes:
        try:
            return self.src.read(size)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageRecError(f"{self.path}: cannot decompress ({e}); is the archive complete?") from e


def _remove_older_copies(out: Path, prefix: str) -> None:
    """Remove the cached copies of earlier versions of the archive `out` was unpacked from: names
    `prefix` + a 16-digit key + `.tar`, exactly (not another archive's copies, whose stem or source
    differ, nor a hidden temp file another process is writing)."""
    older = re.compile(re.escape(prefix) + r"[0-9a-f]{16}\.tar")
    for p in out.parent.iterdir():
        if p.name != out.name and older.fullmatch(p.name):
            with contextlib.suppress(OSError):  # removed by another process first, or not ours to remove
                p.unlink()


def read_archive(path: Path) -> DataSpec:
    """Image folder layout inside .tar/.tar.gz/.tgz/.zip, read in place (never unpacked to the user's folders)."""
    rel: list[str] = []
    sources: list[Source] = []
    names: list[str] = []  # every member, for the message when no image is found
    files: list[str] = []  # every file and link member, for the data doctor
    broken: list[tuple[str, str]] = []  # image link members that point to no file of the archive
    dotdot: list[str] = []  # image members with '..' in their names, which are not read
    name = path.name.lower()
    try:
        copies: Counter[str] = Counter()  # an archive may hold several members of one name
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for i, info in enumerate(zf.infolist()):
                    shown = _zip_name(info)
                    names.append(shown)
                    if not info.is_dir():
                        files.append(shown)
                    if not info.is_dir() and is_image_path(info.filename) and _has_dotdot(info.filename):
                        dotdot.append(shown)
                    elif not info.is_dir() and is_image_path(info.filename) and not hidden_path(info.filename):
                        rel.append(shown)
                        sources.append(ZipMember(str(path), info.filename, i, copies[info.filename]))
                        copies[info.filename] += 1
        else:
            tar_path = _ungzip_to_cache(path) if name.endswith((".tar.gz", ".tgz")) else path
            with tarfile.open(tar_path, "r:") as tf:
                members = list(tf)
                end = tf.offset
            _check_tar_end(path, tar_path, end)
            by_name = {posixpath.normpath(m.name): m for m in members if m.isfile()}
            for m in members:
                names.append(m.name)
                if not m.isdir():
                    files.append(m.name)
                if not m.isdir() and is_image_path(m.name) and _has_dotdot(m.name):
                    dotdot.append(m.name)
                    continue
                if not is_image_path(m.name) or hidden_path(m.name) or not (m.isfile() or m.issym() or m.islnk()):
                    continue
                # a link member is read as the file it points to, as a symlink in a folder is
                data = m if m.isfile() else _tar_link_target(m, by_name)
                if data is None:
                    broken.append((m.name, m.linkname))
                    continue
                rel.append(m.name)
                sources.append(TarMember(str(tar_path), m.name, data.offset_data, data.size, copies[m.name]))
                copies[m.name] += 1
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise ImageRecError(f"{path}: cannot read archive ({e}); is it a complete .tar, .tar.gz or .zip?") from e
    try:
        spec = spec_from_layout(str(path), sources, rel)
    except ImageRecError as e:
        raise ImageRecError(_why_no_images(path, names, dotdot) or str(e)) from e
    spec.notes.extend(_dotdot_note(str(path), dotdot))
    spec.notes.extend(refused_images_note(str(path), [n for n in names if not hidden_path(n)]))
    spec.notes.extend(broken_links_note(str(path), broken, "whose target is not a file in the archive"))
    spec.files = files
    return spec


def _zip_name(info: zipfile.ZipInfo) -> str:
    """A zip member's name as its folders and class are read. Info-ZIP's `zip` (Linux, macOS) writes
    UTF-8 names without the flag that says so, which Python then decodes as cp437: `café/` became
    the class 'cafe╠ü'. Names that decode as UTF-8 once re-encoded are taken as UTF-8 (cp437 text
    almost never does); the member is still read by its name as zipfile gives it."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _tar_link_target(m: tarfile.TarInfo, files: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo | None:
    """The file member a symbolic or hard link member points to (following links to links), or None
    when it points outside the archive or to nothing in it."""
    for _ in range(8):  # a loop of links points to nothing
        if m.islnk():  # a hard link names the member itself
            target = posixpath.normpath(m.linkname)
        elif not m.linkname.startswith("/"):  # a symbolic link is relative to its own folder
            target = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname))
        else:
            return None
        found = files.get(target)
        if found is None or found.isfile():
            return found
        m = found
    return None


def _check_tar_end(path: Path, tar_path: Path, end: int) -> None:
    """`tarfile` stops silently at a header it cannot read past the first: make sure the archive
    really ended there (an end-of-archive zero block, or the end of the file on a block boundary)."""
    with open(tar_path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if block and block != bytes(tarfile.BLOCKSIZE):
        what = f"ends inside a member header at byte {end}" if len(block) < tarfile.BLOCKSIZE else f"has an unreadable member header at byte {end}"
        raise ImageRecError(
            f"{path}: the archive {what}, so it is truncated or corrupt and the members after it cannot be "
            "listed; re-download or copy it again"
        )


def _has_dotdot(name: str) -> bool:
    """A member name with a '..' part (`../x/cat/1.png`): it points outside the archive's folder."""
    return ".." in name.replace("\\", "/").split("/")


def _dotdot_note(origin: str, dotdot: list[str]) -> list[str]:
    """A note naming the image members left out for the '..' in their names: never without a word
    (they were taken for hidden files and dropped silently)."""
    if not dotdot:
        return []
    shown = ", ".join(dotdot[:5]) + (", ..." if len(dotdot) > 5 else "")
    return [f"{origin}: left out {len(dotdot)} image member(s) whose names contain '..' (they point outside "
            f"the archive's folder, so they are not read): {shown}"]


def _why_no_images(path: Path, names: list[str], dotdot: list[str]) -> str | None:
    """A specific reason why an archive has no images in class folders, when there is one."""
    if dotdot:
        return (
            f"{path}: no images in class folders; the archive's {len(dotdot)} image member(s) with '..' in their "
            f"names are not read (e.g. '{dotdot[0]}'), since they point outside the archive's folder. Re-create "
            "the archive from inside its top folder, so that names read <class>/<image>"
        )
    backslashed = [n for n in names if "\\" in n]
    if backslashed and not any("/" in n for n in names if is_image_path(n)):
        return (
            f"{path}: the member names use '\\' as the folder separator (e.g. '{backslashed[0]}'); zip readers take it "
            "as part of the file name, so no class folders are seen. Re-create the archive with '/' separators "
            "(e.g. Python's shutil.make_archive or 7-Zip)"
        )
    inner = [n for n in names if n.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz"))]
    if inner and not any(is_image_path(n) for n in names):
        return (
            f"{path}: holds no images, only the archive(s) {', '.join(inner[:3])}; archives inside archives are "
            "not read. Extract the inner archive and pass it as DATA"
        )
    return None

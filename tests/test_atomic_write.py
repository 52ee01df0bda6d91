"""`atomic_write`: every record imagerec writes (JSON, CSV, YAML, reports) is all or nothing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imagerec.utils import atomic_write


def test_writes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    with atomic_write(target) as f:
        f.write("new é")
    assert target.read_text(encoding="utf-8") == "new é"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_error_in_body_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_new_file_gets_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "b.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_file_size_limit_keeps_old_file(tmp_path: Path) -> None:
    """A full disk or a file size limit (here RLIMIT_FSIZE) fails the write; the old file stays."""
    target = tmp_path / "metrics.json"
    target.write_text('{"acc": 0.9}')
    script = textwrap.dedent(f"""
        import resource, signal
        from imagerec.config import write_json
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_json({str(target)!r}, {{"rows": ["x" * 100] * 1000}})
        except OSError as e:
            print("failed", e.errno)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "failed" in out.stdout, out.stdout + out.stderr
    assert target.read_text() == '{"acc": 0.9}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_only_whole_file_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "c", "a"):
        pass

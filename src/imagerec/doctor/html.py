"""A self-contained HTML page for a `CheckReport`: inline CSS, thumbnails as base64 data: URIs.

No scripts, fonts, stylesheets or images are fetched from anywhere, so the page can be mailed
or attached to an issue. Images that cannot be decoded get a placeholder box.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

from PIL import Image

from imagerec.data.decode import (
    DEFAULT_MAX_PIXELS,
    ArrayRef,
    Source,
    convert_mode,
    decode_bytes,
    read_bytes,
)
from imagerec.doctor.problems import SEVERITY_ORDER, CheckReport, Problem
from imagerec.utils import ImageRecError, atomic_write, write_error_text

THUMB_PX = 96
_NO_DECODE = {"zero_byte", "truncated", "corrupt", "not_an_image", "decompression_bomb"}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sev{display:inline-block;padding:1px 6px;border-radius:3px;font-size:12px;color:#fff}
.error{background:#c62828}.warning{background:#ef6c00}.info{background:#1565c0}
table.sum{border-collapse:collapse}table.sum td,table.sum th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:220px;background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px;font-size:12px}
.card img{display:block;width:96px;height:96px;object-fit:contain;background:#eee;image-rendering:pixelated}
.ph{width:96px;height:96px;background:repeating-linear-gradient(45deg,#eee,#eee 8px,#ddd 8px,#ddd 16px);
display:flex;align-items:center;justify-content:center;color:#777;font-size:11px;text-align:center}
.path{word-break:break-all;font-family:monospace;margin-top:4px}.detail{color:#444;margin-top:2px}
.more{color:#777;margin-top:6px}
"""


def _thumbnail(report: CheckReport, src: Source) -> str | None:
    """A data: URI with a small PNG of the image, or None when it cannot be decoded safely."""
    try:
        if isinstance(src, ArrayRef):
            if report.spec is None or src.key not in report.spec.arrays:
                return None
            arr = report.spec.arrays[src.key][src.index]
            img = convert_mode(Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB"), 3)
        else:
            data = read_bytes(src)
            img = decode_bytes(data, "thumbnail", 3, report.max_pixels or DEFAULT_MAX_PIXELS, (THUMB_PX * 2, THUMB_PX * 2))
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=False)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - any failure just means a placeholder
        return None


def _card(p: Problem, uri: str | None, show_thumb: bool) -> str:
    if not show_thumb:
        pic = ""
    elif uri:
        pic = f'<img src="{uri}" alt="">'
    else:
        pic = '<div class="ph">cannot<br>display</div>'
    where = " / ".join(x for x in (p.split, p.label) if x)
    return (
        f'<div class="card">{pic}<div class="path">{escape(p.path)}</div>'
        f'<div class="detail"><span class="sev {p.severity}">{p.severity}</span> {escape(p.detail)}</div>'
        + (f'<div class="detail">{escape(where)}</div>' if where else "")
        + "</div>"
    )


def _looks_like_html(path: Path) -> bool:
    """Whether the file at `path` starts as an HTML page does (an earlier report, say)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html"))


def check_html_path(path: str | Path, data_root: str | Path | None = None) -> Path:
    """`path` as an HTML report may be written there, or an ImageRecError saying why not.

    Refused: a folder; a path inside the data folder `data_root` (the page would replace or join the
    files being checked, as a quarantine folder there would); an existing file that is not an HTML
    page (an image, the data itself): the report replaces the file at `path`, and it must never be
    a user's file.

    Example:
        >>> check_html_path("pets-report.html", "data/pets")
    """
    out = Path(path)
    where = out.absolute()
    # the folder it goes in, links resolved, and its own name (a link there is replaced, not followed)
    real = where.parent.resolve() / where.name
    if data_root is not None and Path(data_root).is_dir():
        root = Path(data_root).resolve()
        if real == root or root in real.parents:
            raise ImageRecError(f"--html {out} is inside the data folder {root}: write the report outside it, "
                                f"e.g. {root.parent / (root.name + '-report.html')}")
    if out.is_dir():
        raise ImageRecError(f"--html {out} is a folder: give a file name for the report, e.g. {out / 'report.html'}")
    if out.exists() and not _looks_like_html(out):
        raise ImageRecError(f"--html {out} exists and is not an HTML page: it would be replaced by the report; "
                            "give a new file name (or an earlier report to replace)")
    return out


def write_html(report: CheckReport, path: str | Path, max_thumbnails: int = 200, max_per_category: int = 60) -> Path:
    """Write the report as one self-contained HTML file, grouped by category; returns its path.

    Refuses (ImageRecError) a path where the page would replace a user's file (`check_html_path`).

    Example:
        >>> write_html(check_data("data/pets"), "pets-report.html")
    """
    groups = report.by_category()
    order = sorted(groups, key=lambda c: (min(SEVERITY_ORDER[p.severity] for p in groups[c]), c))
    s = report.summary
    rows = "".join(
        f'<tr><td><a href="#{c}">{escape(c)}</a></td><td>{len(groups[c])}</td>'
        f'<td><span class="sev {groups[c][0].severity}">{groups[c][0].severity}</span></td></tr>'
        for c in order
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>imagerec check: {escape(report.root)}</title><style>{_CSS}</style></head><body>",
        f"<h1>imagerec check: {escape(report.root)}</h1>",
        (
            f"<p>{escape(report.source)}; images per split: {escape(str(s['images']))}; {s['num_classes']} classes; "
            f"imbalance ratio {escape(str(s['imbalance_ratio']))}; errors {s['severity']['error']}, "
            f"warnings {s['severity']['warning']}, info {s['severity']['info']}.</p>"
        ),
        f"<table class='sum'><tr><th>category</th><th>count</th><th>severity</th></tr>{rows}</table>"
        if rows
        else "<p>No problems found.</p>",
    ]
    budget = max_thumbnails
    cache: dict[str, str | None] = {}
    for cat in order:
        probs = groups[cat]
        parts.append(f'<h2 id="{cat}">{escape(cat)} ({len(probs)})</h2><div class="grid">')
        for p in probs[:max_per_category]:
            src = report.sources.get(p.path)
            show = src is not None
            if show and p.path not in cache and budget > 0:
                cache[p.path] = None if p.category in _NO_DECODE else _thumbnail(report, src)  # type: ignore[arg-type]
                budget -= 1
            parts.append(_card(p, cache.get(p.path), show))
        parts.append("</div>")
        if len(probs) > max_per_category:
            parts.append(f'<p class="more">... and {len(probs) - max_per_category} more (see the JSON report)</p>')
    parts.append("</body></html>")
    out = check_html_path(path, report.root if report.source == "folder" else None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as f:
            f.write("".join(parts))
    except OSError as e:  # named as given: not the hidden temp file beside it
        raise ImageRecError(f"cannot write the HTML report {out}: {write_error_text(e)}") from e
    return out

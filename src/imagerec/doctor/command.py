"""`imagerec check`: the whole command as one function the CLI calls."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape

from imagerec.data.decode import DEFAULT_MAX_PIXELS
from imagerec.doctor.check import check_data
from imagerec.doctor.html import check_html_path, write_html
from imagerec.doctor.output import render_table, report_to_json
from imagerec.doctor.quarantine import quarantine, undo_quarantine
from imagerec.utils import ImageRecError


def check_command(
    data: str | None,
    fmt: str = "table",
    html: str | None = None,
    fix: str | None = None,
    fix_dest: str | None = None,
    undo: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data_dir: str | None = None,
) -> int:
    """Run the data doctor and print the table (or one JSON object) to stdout; return the exit code.

    0: no error-severity problems (or an undo that restored everything); 1: errors found (also
    when they were then quarantined) or files left behind by an undo. With `undo`, only the manifest
    is replayed backwards, and `data`, if given, must be the folder it quarantined from. Raises
    `ImageRecError` on bad arguments.

    Example:
        >>> raise SystemExit(check_command("data/pets", fmt="json", html="pets.html"))
    """
    if fmt not in ("table", "json"):
        raise ImageRecError(f"unknown format '{fmt}': use table or json")
    if undo is not None:
        if fix is not None:
            raise ImageRecError("--fix and --undo cannot be used together: undo the quarantine first, then check again")
        res = undo_quarantine(undo, data)
        if fmt == "json":
            print(json.dumps({"restored": res.restored, "skipped": [{"path": p, "reason": r} for p, r in res.skipped]}))
        else:
            console = Console()
            console.print(f"restored {len(res.restored)} file(s) from {undo}", markup=False, soft_wrap=True)
            for p, r in res.skipped:  # paths and reasons as written: `[...]` in a file name is not markup
                console.print(f"[yellow]not restored[/] {escape(p)}: {escape(r)}", soft_wrap=True)
        return 0 if res.ok else 1
    if data is None:
        raise ImageRecError("give DATA to check (a folder, archive, manifest or dataset name)")
    if max_pixels < 1:
        raise ImageRecError(f"max_pixels must be at least 1, got {max_pixels}")
    if fix is not None and fix != "quarantine":
        raise ImageRecError(f"unknown fix '{fix}': the only fix is 'quarantine'")
    if fix is not None and not fix_dest:
        raise ImageRecError("--fix quarantine needs a destination folder, e.g. --fix quarantine ./quarantined")
    if html:  # before the check, which may take long; write_html checks again against the folder it found
        check_html_path(html, data)
    report = check_data(data, max_pixels=max_pixels, data_dir=data_dir)
    # the page first: its thumbnails are read from the problem files, which the quarantine moves away
    html_path = write_html(report, html) if html else None
    manifest = quarantine(report, fix_dest) if fix is not None else None  # type: ignore[arg-type]
    # problem files left in place (behind a symlink out of DATA, a move that failed), each with why
    skipped = json.loads(manifest.read_text(encoding="utf-8")).get("skipped", []) if manifest else []
    if fmt == "json":
        out = report_to_json(report)
        out["html"] = str(html_path) if html_path else None
        out["quarantine_manifest"] = str(manifest) if manifest else None
        out["quarantine_skipped"] = skipped if manifest else None
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        console = Console()
        console.print(render_table(report))
        if html_path:
            console.print(f"HTML report: {html_path}", markup=False, soft_wrap=True)
        if manifest:
            console.print(f"quarantined files listed in {manifest} (undo with --undo {manifest})", markup=False, soft_wrap=True)
        for left in skipped:
            console.print(f"[yellow]not quarantined[/] {escape(left['path'])}: {escape(left['reason'])}", soft_wrap=True)
    return 1 if report.n_errors else 0

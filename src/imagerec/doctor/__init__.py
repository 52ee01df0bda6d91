"""The data doctor: find bad images, duplicates, leakage and layout mistakes before a run.

`check_data` inspects; `report_to_json`, `render_table` and `write_html` present the report;
`quarantine` / `undo_quarantine` move the broken files of a folder source aside and back;
`check_command` is what `imagerec check` calls.
"""

from __future__ import annotations

from imagerec.doctor.check import check_data
from imagerec.doctor.command import check_command
from imagerec.doctor.html import write_html
from imagerec.doctor.output import render_table, report_to_json
from imagerec.doctor.problems import CATEGORIES, SEVERITY, CheckReport, Problem
from imagerec.doctor.quarantine import UndoResult, quarantine, undo_quarantine

__all__ = [
    "CATEGORIES",
    "SEVERITY",
    "CheckReport",
    "Problem",
    "UndoResult",
    "check_command",
    "check_data",
    "quarantine",
    "render_table",
    "report_to_json",
    "undo_quarantine",
    "write_html",
]

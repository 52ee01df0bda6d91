"""Presenting a `CheckReport`: a JSON-ready dict and a rich table."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from imagerec.doctor.problems import SEVERITY, SEVERITY_ORDER, CheckReport

_SHOW_DETAIL = {"skipped_by_reader"}  # their path is the data root: the detail says what was left out
_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def report_to_json(report: CheckReport) -> dict[str, Any]:
    """{"data", "root", "source", "summary", "problems": [problem dicts]}, ready for `json.dumps`."""
    return {
        "data": report.data,
        "root": report.root,
        "source": report.source,
        "summary": report.summary,
        "problems": [p.to_dict() for p in report.problems],
    }


def render_table(report: CheckReport, examples: int = 3) -> Table:
    """One row per category: count, severity (the worst seen) and up to `examples` paths."""
    s = report.summary
    images = ", ".join(f"{k} {v}" for k, v in s["images"].items())
    title = f"imagerec check: {report.root} ({report.source}; {images}; {s['num_classes']} classes)"
    table = Table(title=Text(title, style="table.title"), caption=_caption(report))  # the root as written, not markup
    table.add_column("category")
    table.add_column("count", justify="right")
    table.add_column("severity")
    table.add_column("examples", overflow="fold")
    groups = report.by_category()
    order = sorted(groups, key=lambda c: (min(SEVERITY_ORDER[p.severity] for p in groups[c]), c))
    for cat in order:
        probs = groups[cat]
        worst = min((p.severity for p in probs), key=SEVERITY_ORDER.__getitem__, default=SEVERITY[cat])
        shown = [escape(p.detail if cat in _SHOW_DETAIL else p.path) for p in probs[:examples]]
        paths = "\n".join(shown) + (f"\n... and {len(probs) - examples} more" if len(probs) > examples else "")
        table.add_row(cat, str(len(probs)), f"[{_STYLE[worst]}]{worst}[/]", paths)
    if not groups:
        table.add_row("(none)", "0", "[green]ok[/]", "no problems found")
    return table


def _caption(report: CheckReport) -> str:
    s = report.summary
    sev = s["severity"]
    ratio = s.get("imbalance_ratio")
    return (
        f"{s['files_checked']} files in {s['seconds']:.1f} s; errors {sev['error']}, warnings {sev['warning']}, "
        f"info {sev['info']}" + (f"; class imbalance {ratio:.1f}:1" if ratio else "")
    )

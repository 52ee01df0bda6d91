"""The report's vocabulary: one `Problem` per finding, `CheckReport` for the whole dataset.

Category names and their severities are part of the public API (JSON output, quarantine
filters); `imagerec.doctor.check` documents what each one means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagerec.data.decode import Source
from imagerec.data.readers import DataSpec

# category -> severity. "error": the file breaks or silently poisons training/evaluation;
# "warning": usable, but probably not what you meant; "info": worth knowing, handled by the decoder.
SEVERITY: dict[str, str] = {
    "zero_byte": "error",
    "truncated": "error",
    "corrupt": "error",
    "not_an_image": "error",
    "decompression_bomb": "error",
    "split_leakage": "error",  # exact copies; near copies are reported as warnings
    "wrong_extension": "warning",
    "exif_rotation": "warning",
    "cmyk": "warning",
    "sixteen_bit": "warning",
    "multi_frame": "warning",
    "tiny": "warning",
    "huge": "warning",
    "exact_duplicate": "warning",
    "near_duplicate": "warning",
    "class_imbalance": "warning",
    "single_class": "error",
    "empty_class": "warning",
    "odd_split_name": "warning",
    "label_typo": "warning",
    "non_image": "warning",  # inside a class folder; elsewhere "info"
    "skipped_by_reader": "warning",
    "alpha": "info",
    "palette": "info",
}
CATEGORIES = tuple(SEVERITY)
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Problem:
    """One finding about one file (or folder, or the dataset for dataset-wide categories)."""

    path: str
    category: str
    detail: str
    split: str | None = None
    label: str | None = None
    severity: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.category not in SEVERITY:
            raise ValueError(f"unknown problem category '{self.category}'")
        if not self.severity:
            self.severity = SEVERITY[self.category]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "category": self.category,
            "severity": self.severity,
            "detail": self.detail,
            "split": self.split,
            "label": self.label,
        }
        d.update(self.extra)
        return d


@dataclass
class CheckReport:
    """What `check_data` found. `source` is folder, archive, manifest, arrays or store; `root` the path checked.

    `spec` (the reader's listing) and `sources` (problem path -> readable source) are kept for
    thumbnails and are not serialised.
    """

    data: str
    root: str
    source: str
    problems: list[Problem]
    summary: dict[str, Any]
    spec: DataSpec | None = field(default=None, repr=False)
    sources: dict[str, Source] = field(default_factory=dict, repr=False)
    max_pixels: int = 0

    def by_category(self) -> dict[str, list[Problem]]:
        out: dict[str, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.category, []).append(p)
        return out

    @property
    def n_errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

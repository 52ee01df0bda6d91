"""imagerec: from a folder of images to a trained, evaluated, served image classifier.

Example:
    >>> import imagerec
    >>> result = imagerec.train(data="mnist-mini", out="runs/mini", epochs=2)
    >>> imagerec.load(result.run_dir).predict(["digit.png"])[0]["label"]
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from imagerec.predict import Predictor


def _path_arg(name: str, value: Any, optional: bool = False) -> str | None:
    """`value` as the text of a path or name, or an ImageRecError naming the argument: a wrong type
    would otherwise fail deep inside (`'int' object has no attribute 'startswith'`)."""
    if value is None and optional:
        return None
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str):
            return text
    from imagerec.utils import ImageRecError

    raise ImageRecError(f"{name} must be a path or name (a string), got {type(value).__name__} {value!r}")


def _split_arg(split: Any) -> str | None:
    """`split` when it is a split name (or None), else an ImageRecError naming it."""
    if split is None or isinstance(split, str):
        return split
    from imagerec.utils import ImageRecError

    raise ImageRecError(f"split must be a split name such as 'test' or 'val', got {type(split).__name__} {split!r}")


def train(*args: Any, **kwargs: Any) -> Any:
    """Train a classifier; see `imagerec.engine.run.train`."""
    from imagerec.engine.run import train as _train

    return _train(*args, **kwargs)


def evaluate(run_dir: str, data: str | None = None, split: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a run; see `imagerec.engine.evaluate.evaluate_run`. A `run_dir`, `data` or `split`
    of the wrong type is an ImageRecError naming it, as `train` names a bad setting."""
    from imagerec.engine.evaluate import evaluate_run

    return evaluate_run(_path_arg("run_dir", run_dir), _path_arg("data", data, optional=True), _split_arg(split), **kwargs)


def evaluate_robustness(source: str, data: str | None = None, split: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Accuracy under common corruptions and FGSM/PGD attacks; see `imagerec.robustness.evaluate_robustness`."""
    from imagerec.robustness import evaluate_robustness as _evaluate_robustness

    return _evaluate_robustness(_path_arg("source", source), _path_arg("data", data, optional=True), _split_arg(split),
                                **kwargs)


def load(source: str, **kwargs: Any) -> Predictor:
    """A Predictor for a run directory; see `imagerec.predict.Predictor`."""
    from imagerec.predict import load as _load

    return _load(_path_arg("source", source), **kwargs)


def create_model(name: str, num_classes: int, **kwargs: Any) -> Any:
    from imagerec.models import create_model as _create

    return _create(name, num_classes=num_classes, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    from imagerec.models import list_models as _list

    return _list(pattern)


__all__ = ["__version__", "create_model", "evaluate", "evaluate_robustness", "list_models", "load", "train"]

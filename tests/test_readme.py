"""README.md's Python example must run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", out).group(1))
    assert accuracy > 85.0  # 3 epochs on 3,000 digits
    from imagerec.data import read_data

    spec = read_data("mnist-mini")
    truth = spec.class_names[spec.splits["test"][0].target]
    assert f"'label': '{truth}'" in out  # the example's digit is classified correctly
    assert "resnet18" in out and "resnet50" in out


def test_readme_opens_with_install_and_test_commands() -> None:
    lines = [ln for ln in README.read_text().splitlines() if ln.strip()]
    assert lines[1].startswith("```")
    assert "pip install" in lines[2] and "imagerec demo" in lines[2]
    assert "pytest" in lines[3]

"""CpuLoadProbe: a run started beside other busy processes says so and what to pass."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from imagerec.utils import CpuLoadProbe, available_cpus

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


def test_a_busy_other_process_is_seen() -> None:
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        probe = CpuLoadProbe(seconds=0.6)
        probe.advice(available_cpus())  # waits for the sample
    finally:
        hog.kill()
        hog.wait()
    assert probe.busy >= 0.6, probe.busy  # one core, give or take the sampling


def test_own_work_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 1 s, 2 cores busy on the machine (200 of 200 ticks), 1.5 s of them this process's own."""
    hz = os.sysconf("SC_CLK_TCK")
    ticks = iter([(1000, 500), (1000 + 2 * hz, 500)])  # (total, idle): no idle tick in between
    clocks = iter([10.0, 11.5])
    walls = iter([100.0, 101.0])
    monkeypatch.setattr(CpuLoadProbe, "_machine_ticks", staticmethod(lambda: next(ticks)))
    monkeypatch.setattr(time, "process_time", lambda: next(clocks))
    monkeypatch.setattr(time, "monotonic", lambda: next(walls))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    probe = CpuLoadProbe.__new__(CpuLoadProbe)
    probe.busy = 0.0
    probe._sample(1.0)
    assert probe.busy == pytest.approx(0.5)


def test_advice_names_the_thread_count_to_pass() -> None:
    probe = CpuLoadProbe(seconds=0.0)
    probe._thread.join()
    cpus = available_cpus()
    probe.busy = 1.0
    advice = probe.advice(cpus)
    if cpus >= 2:
        assert advice is not None and f"--num-threads {cpus - 1}" in advice and "1.0 of" in advice
    assert probe.advice(max(1, cpus - 1)) is None  # a core left free for the other process: nothing to say
    probe.busy = 0.3
    assert probe.advice(cpus) is None


def test_no_advice_to_pass_the_thread_count_already_used() -> None:
    probe = CpuLoadProbe(seconds=0.0)
    probe._thread.join()
    probe.busy = 1.8
    assert probe.advice(1) is None  # nothing fewer to suggest


def test_bf16_without_native_support_is_warned_about(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from imagerec import utils

    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_supports_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="imagerec"):
        assert utils.resolve_precision("bf16", cpu) is torch.bfloat16  # still what was asked for
        assert utils.resolve_precision("auto", cpu) is None
    assert caplog.text.count("no native bf16") == 1 and "--precision auto" in caplog.text
    caplog.clear()
    monkeypatch.setattr(utils, "cpu_supports_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="imagerec"):
        assert utils.resolve_precision("bf16", cpu) is torch.bfloat16
    assert "no native bf16" not in caplog.text

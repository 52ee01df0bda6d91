"""Crash safety and concurrency: SIGKILL an ingest part-way and resume it; ingest from two processes at once."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from store_helpers import SourceFacts, assert_healthy, integrity, stored_counts

from imagerec.store import Store, ingest, open_store
from imagerec.store.engine import create_store_engine, resolve_url
from imagerec.store.schema import blobs

INGEST_SCRIPT = """
import sys
from imagerec.store import ingest, open_store
with open_store(sys.argv[1]) as store:
    ingest(store, "mnist-mini", "mnist", batch_size=int(sys.argv[2]), progress=False)
"""
BATCH = 250
KILL_AFTER = 2 * BATCH  # at least two batches committed


def _image_count(store: Store) -> int:
    with store.read() as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM images").scalar()


def test_sigkill_during_ingest_then_rerun_stores_every_image_exactly_once(
    store_url: str, mnist_source: SourceFacts
) -> None:
    watcher = open_store(store_url)  # migrates first, so the child starts ingesting at once
    child = subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT, store_url, str(BATCH)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _image_count(watcher) < KILL_AFTER:
            assert child.poll() is None, f"ingest exited early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "ingest made no progress in 120 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        watcher.close()
        if child.poll() is None:
            child.kill()
            child.wait()

    after_kill = assert_healthy(store_url)  # whole batches or nothing: no orphans either way
    assert KILL_AFTER <= after_kill["images"] < 7000, f"not killed part-way: {after_kill}"
    assert after_kill["blobs"] == after_kill["images"]

    with open_store(store_url) as store:
        if store.dialect == "sqlite":
            with store.read() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        report = ingest(store, "mnist-mini", "mnist", batch_size=BATCH, progress=False)
        assert report.added == 7000 - after_kill["images"]
        assert report.already_present == after_kill["images"]
        with store.read() as conn:
            for sha, data in conn.execute(sa.select(blobs.c.sha256, blobs.c.data)):
                assert hashlib.sha256(bytes(data)).hexdigest() == sha

    final = assert_healthy(store_url)
    assert final["images"] == final["blobs"] == 7000
    assert stored_counts(store_url, "mnist") == mnist_source.counts()


def _ingest_in_child(url: str, source: str, dataset: str) -> None:
    with open_store(url) as store:
        ingest(store, source, dataset, batch_size=20, progress=False)


def test_concurrent_ingests_from_two_processes(store_url: str, cifar_folder: Path, cifar_source: SourceFacts) -> None:
    open_store(store_url).close()
    # fork: the children skip re-importing torch; each opens its own engine
    ctx = multiprocessing.get_context("fork")
    for datasets in (("left", "right"), ("same", "same")):
        procs = [ctx.Process(target=_ingest_in_child, args=(store_url, str(cifar_folder), d)) for d in datasets]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
    for dataset in ("left", "right", "same"):
        assert stored_counts(store_url, dataset) == cifar_source.counts()
    facts = assert_healthy(store_url)
    # three datasets of the same 300 images: 900 image rows sharing 300 blobs
    assert (facts["images"], facts["blobs"]) == (900, 300)
    assert integrity(store_url)["duplicate_images"] == 0


def test_a_store_failing_mid_training_stops_the_run_resumable_and_resume_is_exact(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images streamed from the store by loader workers: when the store fails (here its blobs table
    goes away between epochs), the run stops with one message naming the store and how to resume,
    `last` holds every finished step, and the resume ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    import imagerec
    from imagerec.data.loader import DataSourceError
    from imagerec.engine.callbacks import Callback

    with open_store(store_url) as store:
        ingest(store, "mnist-mini", "mnist", progress=False)
    monkeypatch.setenv("IMAGEREC_DB", store_url)
    admin = create_store_engine(resolve_url(store_url))  # the store's own driver choice (psycopg 3)

    def rename(old: str, new: str) -> None:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    class StoreGoesAway(Callback):
        def on_epoch_end(self, trainer, row):  # type: ignore[no-untyped-def]
            rename("blobs", "blobs_away")

    settings = dict(data="store:mnist", model="mlp", epochs=2, limit_train=200, batch_size=32, cache="none", workers=1,
                    num_threads=1, augment="none")
    whole = imagerec.train(out=str(tmp_path / "whole"), **settings)
    with pytest.raises(DataSourceError) as stopped:
        imagerec.train(out=str(tmp_path / "cut"), callbacks=[StoreGoesAway()], **settings)
    msg = str(stopped.value)
    assert "blobs" in msg and "Training stopped in epoch 2 after step 0" in msg, msg
    assert f"imagerec train --resume {tmp_path / 'cut'}" in msg and "Traceback" not in msg
    rename("blobs_away", "blobs")
    admin.dispose()
    imagerec.train(resume=str(tmp_path / "cut"))
    a, b = load_file(Path(whole.run_dir) / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""``reproduce --executor ray``: the same sweep semantics as the local executor, on a local Ray cluster.

The cluster is the one ``RayExecutor`` starts for the sweep (``ray.init`` on this machine, bound to its own
addresses); the tests need the optional extra (``pip install -e '.[ray]'``; ``.ci/run`` installs it) and skip with
the reason without it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onestage.experiments import runner
from onestage.experiments.records import read_record, record_path
from sweep_helpers import minimal_table, slow_sweep

ray = pytest.importorskip("ray", reason="the Ray executor is an optional extra: pip install -e '.[ray]'")

REPO = Path(__file__).resolve().parents[1]


def _smoke_table(tmp_path: Path) -> Path:
    """Three FCOS rows of the real experiment notebook (smoke preset, quick): two train, one is made to fail (an
    IoU-loss name the loss does not know)."""
    table = minimal_table(id="raysmoke", rows=[
        {"name": "giou", "overrides": {"loc_loss_type": "giou"}, "published": None},
        {"name": "iou", "overrides": {"loc_loss_type": "iou"}, "published": None},
        {"name": "broken", "overrides": {"loc_loss_type": "nonsense"}, "published": None}], expect=[])
    path = tmp_path / "raysmoke.json"
    path.write_text(json.dumps(table))
    return path


def _sweep(table: Path, out: Path, *extra: str) -> int:
    return runner.main([str(table), "--preset", "smoke", "--quick", "--out", str(out), "--threads", "1",
                        "--timeout", "600", "--no-progress", *extra])


def _comparable(config: dict) -> dict:
    """A record's config without the paths of its own results folder."""
    return {k: v for k, v in config.items() if k not in ("out_dir", "record_path")}


def test_ray_sweep_gives_the_local_records_and_records_the_failure(tmp_path):
    table = _smoke_table(tmp_path)
    assert _sweep(table, tmp_path / "local") == 1  # one run failed
    assert _sweep(table, tmp_path / "ray", "--executor", "ray", "--cpus-per-run", "1") == 1
    for row in ("giou", "iou"):
        a = read_record(record_path(tmp_path / "local", "raysmoke", row, 0))
        b = read_record(record_path(tmp_path / "ray", "raysmoke", row, 0))
        assert a["status"] == b["status"] == "finished"
        assert _comparable(a["config"]) == _comparable(b["config"])
        assert a["iterations"] == b["iterations"] > 0
        for iou_type, metrics in a["metrics"].items():
            for name, value in metrics.items():
                assert b["metrics"][iou_type][name] == pytest.approx(value, abs=1e-6), (row, iou_type, name)
        assert (REPO / b["executed_notebook"]).is_file()  # written by the driver (absolute paths stay absolute)
    bad_local = read_record(record_path(tmp_path / "local", "raysmoke", "broken", 0))
    bad_ray = read_record(record_path(tmp_path / "ray", "raysmoke", "broken", 0))
    assert bad_local["status"] == bad_ray["status"] == "failed"
    assert "nonsense" in bad_ray["error"] and bad_ray["error"] == bad_local["error"]
    assert bad_ray["traceback"] and bad_ray["parameters"]["overrides"] == {"loc_loss_type": "nonsense"}


def test_missing_cluster_resources_and_bad_options_fail_clearly(tmp_path, capsys):
    table = _smoke_table(tmp_path)
    assert _sweep(table, tmp_path / "out", "--executor", "ray", "--cpus-per-run", "0") == 2
    assert "--cpus-per-run must be > 0" in capsys.readouterr().err
    assert _sweep(table, tmp_path / "out", "--executor", "ray", "--gpus-per-run", "64") == 2
    assert "cannot hold one run" in capsys.readouterr().err
    assert not (tmp_path / "out" / "raysmoke").exists() or not list((tmp_path / "out" / "raysmoke").glob("*.json"))


def _lock_is_free(rec_path: Path) -> bool:
    with runner.run_lock(rec_path) as locked:
        return locked


def test_a_killed_ray_driver_loses_only_the_run_in_flight(tmp_path):
    """SIGKILL of the driver (and the Ray instance it started) mid-sweep; the rerun trains only what had not
    finished."""
    table_path, nb, out = slow_sweep(tmp_path, "raykill")
    (out / "raykill" / "SLOW").touch()
    argv = [str(table_path), "--notebook", str(nb), "--out", str(out), "--timeout", "300", "--no-progress",
            "--executor", "ray", "--cpus-per-run", "2"]  # one run at a time on a 2-CPU instance
    proc = subprocess.Popen([sys.executable, "-m", "onestage", "reproduce", *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = record_path(out, "raykill", "first", 0)
    log = out / "raykill" / "executions.log"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (first.exists() and log.exists() and "2" in log.read_text()):
            time.sleep(0.5)
        assert log.exists() and "2" in log.read_text(), "the slow row never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session, mid-run
        proc.wait()
    assert read_record(first)["status"] == "finished"
    assert read_record(record_path(out, "raykill", "second", 0)) is None
    before = first.stat().st_mtime_ns
    # The killed run's worker ends by itself within a second or so (end_with_driver); until then a rerun would report
    # the row as locked (what a user sees when rerunning at once), so wait for the lock as a user would.
    second_lock = record_path(out, "raykill", "second", 0)
    deadline = time.time() + 60
    while not _lock_is_free(second_lock):
        assert time.time() < deadline, "the killed sweep's worker still holds the run's lock after 60 s"
        time.sleep(0.25)

    (out / "raykill" / "SLOW").unlink()
    assert runner.main(argv) == 0
    assert log.read_text().split() == ["1", "2", "2"]  # "first" ran once; "second" again after the kill
    assert first.stat().st_mtime_ns == before  # the finished record was left alone
    assert read_record(record_path(out, "raykill", "second", 0))["metrics"]["bbox"]["AP"] == 2.0

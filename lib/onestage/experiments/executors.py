"""Where the runs of a sweep execute: local worker processes (the default) or tasks on a Ray cluster.

:func:`onestage.experiments.runner.run_jobs` owns the sweep's semantics — finished runs skipped, shared
configurations reused, a run that evaluates another run's weights started only after it, failures recorded and the
sweep going on, Ctrl-C stopping the launches, a progress bar over the runs — and hands each run to an executor,
which only has to start it and say when it is done:

* :class:`LocalExecutor` — ``--workers`` spawned processes on this machine, each dying with the driver.
* :class:`RayExecutor` — ``--executor ray [--address ADDR] [--cpus-per-run N] [--gpus-per-run N]``: each run is a
  Ray task (``num_cpus`` / ``num_gpus`` per run, so Ray places as many at once as the cluster holds) that executes
  the same notebook through papermill on a worker (:func:`onestage.experiments.runner.execute_job`). Ray is an
  optional extra (``pip install -e '.[ray]'``), imported only here and only when asked for.

**Storage.** A run's notebook reads the repository (the notebook, ``data/``) and writes its training folder
(weights, logs) under ``--out`` at the paths the driver planned, so every node needs the repository and the results
root at the same paths — one machine, or a shared filesystem (NFS, a cluster's shared home). The *records* do not
depend on it: each task returns the record and the executed notebook it wrote, and the driver writes them
atomically (temporary file + ``os.replace``) into its own results folder, so the table is complete on the driver
even where a worker's disk is its own; only rows that evaluate another row's weights (``weights_from``) then need the
shared filesystem, and fail with the reason where the weights are missing.

**A killed driver** loses only the runs in flight: a task on the driver's own machine ends within a second of the
driver's death (:func:`end_with_driver`; Ray also ends the tasks of a job whose driver is gone, but on a busy machine
only after seconds), each run's Jupyter kernel ends with its worker, and a rerun skips every finished record (a run
whose worker is still ending is reported as locked, not trained twice).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import socket
import threading
from pathlib import Path
from typing import Optional

from onestage.cli_args import UserError

__all__ = ["LocalExecutor", "RayExecutor", "end_with_driver", "ray_task"]


class LocalExecutor:
    """At most ``workers`` runs at once, each in a spawned process of its own (a fresh interpreter: no forked
    threads or sockets) that dies with the driver (:func:`onestage.experiments.runner.die_with_parent`)."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.slots = max(1, int(workers))
        self._pool: Optional[cf.ProcessPoolExecutor] = None

    def __enter__(self):
        from onestage.experiments.runner import _worker_init

        self._pool = cf.ProcessPoolExecutor(max_workers=self.slots, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(os.getpid(),))
        return self

    def __exit__(self, *exc):
        self._pool.__exit__(*exc)

    def submit(self, job: dict):
        from onestage.experiments.runner import execute_job

        return self._pool.submit(execute_job, job)

    def wait_any(self, handles) -> list:
        return list(cf.wait(list(handles), return_when=cf.FIRST_COMPLETED).done)

    def wait_all(self, handles) -> list:
        return list(cf.wait(list(handles)).done)

    @staticmethod
    def result(handle, job: dict) -> dict:
        return handle.result()

    def abandon(self, handles) -> None:
        for p in list(getattr(self._pool, "_processes", {}).values()):
            p.terminate()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def end_with_driver(driver: Optional[dict], interval: float = 0.5):
    """While the block runs, end this process (``os._exit``) once the sweep's driver ``{"pid", "host"}`` is gone,
    when the driver runs on this machine: so the lock on the run is released and the run's kernel (which polls its
    parent) ends at once, instead of whenever the cluster notices the dead job. Elsewhere (a driver on another node)
    Ray's own cleanup is all there is."""
    stop = threading.Event()
    if driver and driver.get("host") == socket.gethostname() and driver.get("pid"):
        pid = int(driver["pid"])

        def poll():
            while not stop.wait(interval):
                if not _alive(pid):
                    os._exit(1)

        threading.Thread(target=poll, name="end-with-driver", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def ray_task(job: dict) -> dict:
    """The body of one Ray task, on a worker: run the job as the local executor does (ending with the driver, see
    :func:`end_with_driver`), then return what it wrote — ``{"summary", "record", "notebook"}`` (the record as a
    dict, the executed notebook as text; ``None`` where absent) — for the driver to write into its results folder."""
    from onestage.experiments.records import read_record
    from onestage.experiments.runner import execute_job

    with end_with_driver(job.get("driver")):
        summary = execute_job(job)
    out_nb = Path(job["output_notebook"])
    return {"summary": summary, "record": read_record(job["record_path"]),
            "notebook": out_nb.read_text(encoding="utf-8") if out_nb.is_file() else None}


class RayExecutor:
    """Each run a Ray task with ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs, on the cluster at ``address``
    (``None``: a local Ray instance started for the sweep; ``"auto"``: the cluster this machine belongs to). At most
    as many runs are in flight as the cluster's resources hold (``slots``), so the sweep still submits lazily and
    an interrupt has nothing queued to cancel. ``threads`` (default ``cpus_per_run``) sets ``OMP_NUM_THREADS`` in the
    tasks' environment.

    A run that is one DDP training over several GPUs is a task with ``gpus_per_run = N`` planned with
    ``nproc_per_run = N`` (``reproduce --gpus-per-run N --nproc-per-run N``): Ray sets ``CUDA_VISIBLE_DEVICES`` to the
    task's N GPUs and the notebook trains through ``torchrun --standalone`` with one process per GPU
    (:func:`onestage.experiments.experiment.train_distributed`)."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
                 threads: Optional[int] = None, init_kwargs: Optional[dict] = None):
        if cpus_per_run <= 0 or gpus_per_run < 0:
            raise UserError("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
        self.address, self.cpus, self.gpus = address, cpus_per_run, gpus_per_run
        self.threads = threads or max(1, int(cpus_per_run))
        self.init_kwargs = dict(init_kwargs or {})
        self.slots = 1
        self._ray = None
        self._started = False

    def __enter__(self):
        try:
            import ray
        except ImportError as e:
            raise UserError("--executor ray needs Ray, an optional extra: pip install -e '.[ray]' "
                            f"(import failed: {e})") from e
        self._ray = ray
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "runtime_env": {"env_vars": env},
                      **self.init_kwargs}
            if self.address is not None:
                kwargs["address"] = self.address
            else:  # a local instance for this sweep, reachable from this machine only
                kwargs.setdefault("_node_ip_address", "127.0.0.1")
            self._init(ray, kwargs)
            self._started = True
        res = ray.cluster_resources()
        by_cpu = int(res.get("CPU", 1) // self.cpus)
        by_gpu = int(res.get("GPU", 0) // self.gpus) if self.gpus else by_cpu
        if min(by_cpu, by_gpu) < 1:
            raise UserError(f"the Ray cluster ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs) cannot hold one "
                            f"run of {self.cpus:g} CPUs and {self.gpus:g} GPUs")
        self.slots = min(by_cpu, by_gpu)
        self._task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(ray_task).options(
            runtime_env={"env_vars": env})
        return self

    @staticmethod
    def _init(ray, kwargs: dict, attempts: int = 3) -> None:
        """``ray.init``, retried when a local instance fails to come up: on a busy small machine the raylet can give
        up waiting for its agents (a fixed 15-s wait inside Ray, ray-project/ray issue 65983) and the start fails
        with "timed out during startup"; a second try usually succeeds."""
        for attempt in range(1, attempts + 1):
            try:
                ray.init(**kwargs)
                return
            except Exception as e:  # Ray raises a bare Exception here
                ray.shutdown()
                if "timed out during startup" not in str(e) or "address" in kwargs:
                    raise
                if attempt == attempts:
                    raise UserError(f"the local Ray instance did not start in {attempts} tries ({e}); the machine may be "
                                    f"too busy — retry, or start one with `ray start --head` and pass --address auto") \
                        from e

    def __exit__(self, *exc):
        if self._started:
            self._ray.shutdown()

    def submit(self, job: dict):
        return self._task.remote({**job, "driver": {"pid": os.getpid(), "host": socket.gethostname()}})

    def wait_any(self, handles) -> list:
        ready, _ = self._ray.wait(list(handles), num_returns=1)
        return ready

    def wait_all(self, handles) -> list:
        handles = list(handles)
        ready, _ = self._ray.wait(handles, num_returns=len(handles))
        return ready

    def result(self, handle, job: dict) -> dict:
        """The run's summary; its record and executed notebook are written into the driver's results folder."""
        out = self._ray.get(handle)
        from onestage.experiments.records import write_json_atomic, write_text_atomic

        if out["record"] is not None:
            write_json_atomic(job["record_path"], out["record"])
        if out["notebook"] is not None:
            write_text_atomic(job["output_notebook"], out["notebook"])
        return out["summary"]

    def abandon(self, handles) -> None:
        for ref in list(handles):
            self._ray.cancel(ref, force=True)


# ------------------------------------------------------------------------------------------ per-run overhead
_TRIVIAL_PARAMS = ("model = 'm'\npreset = 'smoke'\ndata = 'synthetic'\nseed = 0\noverrides = {}\n"
                   "train_overrides = {}\nout_dir = 'out'\nrecord_path = ''\nquick = False\nweights_from = ''")
_TRIVIAL_BODY = ("from onestage.experiments.records import write_json_atomic\n"
                 "write_json_atomic(record_path, {'status': 'finished', 'seed': seed, 'metrics': {'bbox': {'AP': 1.0}}})")


def executor_overhead(runs: int = 4, rounds: int = 2, cpus_per_run: float = 1, workers: int = 1) -> dict:
    """Seconds per run of a sweep whose notebook does nothing but write its record — what an executor adds to every
    run (kernel start and papermill are in both) — for the local executor and the Ray executor, alternating them
    (local, ray, ray, local, …) because a shared machine is noisy. Each sweep is ``runs`` runs in a fresh results
    folder; the Ray sweep's time includes starting (and stopping) its local Ray instance, as a sweep on one machine
    pays it. Returns ``{"local_s_per_run": [...], "ray_s_per_run": [...], their medians, the difference, the
    settings}``."""
    import json
    import statistics
    import tempfile
    import time

    import nbformat

    from onestage.experiments import runner
    from onestage.experiments.tables import load_table

    per = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="onestage-overhead-") as tmp:
        tmp = Path(tmp)
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(_TRIVIAL_PARAMS, metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(_TRIVIAL_BODY)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb_path = tmp / "trivial.ipynb"
        nbformat.write(nb, nb_path)
        table = {"id": "overhead", "title": "executor overhead", "model": "fcos",
                 "source": {"paper": "-", "table": "-", "where": "-"}, "metric": "bbox.AP", "baseline": {},
                 "rows": [{"name": f"r{k}", "overrides": {"k": k}, "published": None} for k in range(runs)],
                 "expect": []}
        (tmp / "overhead.json").write_text(json.dumps(table))
        t = load_table(tmp / "overhead.json")
        order = []
        for r in range(rounds):
            order += ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
        for k, kind in enumerate(order):
            jobs = runner.plan_runs(t, seeds=1, out=tmp / f"out{k}", notebook=nb_path, timeout=300)
            ex = LocalExecutor(workers) if kind == "local" else RayExecutor(cpus_per_run=cpus_per_run)
            t0 = time.perf_counter()
            summaries, _ = runner.run_jobs(jobs, workers=workers, progress=False, executor=ex)
            wall = time.perf_counter() - t0
            if any(s["status"] != "finished" for s in summaries):
                raise RuntimeError(f"{kind} sweep: {[s for s in summaries if s['status'] != 'finished']}")
            per[kind].append(wall / runs)
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"runs_per_sweep": runs, "rounds": rounds, "cpus_per_run": cpus_per_run, "local_workers": workers,
            "local_s_per_run": [round(v, 3) for v in per["local"]], "ray_s_per_run": [round(v, 3) for v in per["ray"]],
            "local_median_s_per_run": round(med["local"], 3), "ray_median_s_per_run": round(med["ray"], 3),
            "ray_minus_local_s_per_run": round(med["ray"] - med["local"], 3)}

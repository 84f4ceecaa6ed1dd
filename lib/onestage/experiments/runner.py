"""``python -m onestage reproduce TABLE``: run a paper table's rows × seeds through a papermill notebook.

Each run executes ``notebooks/experiment.ipynb`` (or the table's own notebook) with papermill, with the row's
model-config overrides, and the notebook writes one JSON record. The runner is built for long, fragile sweeps on
small machines:

* **Parameters are checked before anything launches.** papermill only *warns* when a parameter name is not in the
  notebook's ``parameters`` cell and then runs with the default, which would silently reproduce the wrong thing for
  hours. The names are compared with :func:`papermill.inspect_notebook` first and unknown names are an error.
* **Every cell has a timeout** (``--timeout``, papermill's ``execution_timeout``), so a hung kernel cannot stall a
  sweep forever.
* **Finished runs are skipped**, so a rerun resumes an interrupted sweep; failed runs are retried.
* **Failures are recorded and the sweep goes on**: a failed run leaves a ``"status": "failed"`` record with the
  error and the end of the traceback, shown in the final table; the executed notebook is kept next to it.
* **Ctrl-C stops launching new runs.** Runs already started are waited for (they usually fail with the interrupt
  and are retried next time); a second Ctrl-C abandons them. Finished records always stay.
* **Rows that change inference only share their training.** A row whose model config trains exactly as an earlier
  row's (:func:`onestage.modeling.training_view`: FCOS center-ness computed from the regression, SOLO's NMS kind,
  CondInst's mask NMS) evaluates that row's trained weights of the same seed (``weights_from``) instead of training
  the same model again: half the runs of such a table, and the two rows differ by their inference alone.
* **A few runs at once** (``--workers``): each run lives in its own worker process (and its own kernel), started a
  few at a time so that the 2-core laptops this targets are not oversubscribed.
* **Or on a cluster** (``--executor ray``): each run is a Ray task that executes the same notebook on a worker,
  with the same semantics (:mod:`onestage.experiments.executors`, which also says what storage it needs).

Results: ``<out>/<table>/<row>__seed<k>.json`` (+ ``.ipynb``, + a ``<row>__seed<k>/`` training folder).
``--report`` prints the aggregated table (see :mod:`onestage.experiments.aggregate`), reading ``--results-dir`` when
given (e.g. committed results in ``data/results/<table>/``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from onestage.cli_args import UserError
from onestage.experiments.records import (
    RECORD_FORMAT,
    is_finished,
    read_record,
    record_path,
    repo_relative,
    run_stem,
    write_json_atomic,
)
from onestage.experiments.tables import PaperTable, TableError, list_tables, load_table, repo_root

#: The parameter names the runner passes; the experiment notebook's ``parameters`` cell must define each of them.
RUNNER_PARAMETERS = ("model", "preset", "data", "seed", "overrides", "train_overrides", "out_dir", "record_path",
                     "quick", "weights_from")
#: Parameters passed only when a run needs them (so notebooks without them still run the plain sweeps); the experiment
#: notebook defines them all: ``nproc_per_node`` (``--nproc-per-run``, each run one DDP training).
OPTIONAL_RUNNER_PARAMETERS = ("nproc_per_node",)
PRESETS = ("cpu", "fast", "smoke", "paper")
DEFAULT_TIMEOUT_S = 4 * 3600
TRACEBACK_LINES = 40
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ParameterError(ValueError):
    """The runner would pass parameters the notebook does not declare (papermill would only warn)."""


def notebook_parameters(notebook: Path) -> dict:
    """Names → papermill's description of the notebook's ``parameters`` cell; error if there is no such cell."""
    import papermill

    params = papermill.inspect_notebook(str(notebook))
    if not params:
        raise ParameterError(f"{notebook}: no cell tagged 'parameters' (or it defines nothing)")
    return params


def validate_parameters(notebook: Path, names: Sequence[str]) -> None:
    """Raise :class:`ParameterError` if any of ``names`` is not a parameter of ``notebook``."""
    declared = notebook_parameters(notebook)
    unknown = sorted(set(names) - set(declared))
    if unknown:
        raise ParameterError(
            f"{notebook}: parameter(s) {unknown} are not declared in its 'parameters' cell "
            f"(declared: {sorted(declared)}); papermill would ignore them with only a warning"
        )


def plan_runs(
    table: PaperTable,
    *,
    seeds: int = 1,
    preset: str = "cpu",
    data: str = "synthetic",
    out: Path = Path("runs/reproduce"),
    rows: Optional[Sequence[str]] = None,
    quick: bool = False,
    notebook: Optional[Path] = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    kernel: str = "python3",
    cwd: Optional[Path] = None,
    train_overrides: Optional[dict] = None,
    nproc_per_run: int = 1,
) -> list[dict]:
    """One job dict per (row, seed): everything a worker needs, all paths absolute, all values JSON-able (tuples
    become lists: papermill would pass a tuple to the notebook as its string). ``nproc_per_run > 1`` makes each run
    one DDP training over that many processes (the notebook's ``nproc_per_node``, passed only then, and part of the
    run's key: a distributed run is another run)."""
    import json

    train_overrides = json.loads(json.dumps(train_overrides or {}))
    nb = Path(notebook) if notebook is not None else _table_notebook(table)
    out = Path(out).resolve()
    jobs = []
    for row in table.runnable_rows(list(rows) if rows else None):
        for seed in range(seeds):
            stem = run_stem(row.name, seed)
            rec = record_path(out, table.id, row.name, seed)
            params = {
                "model": table.model,
                "preset": preset,
                "data": data,
                "seed": seed,
                "overrides": table.model_overrides(row),
                "train_overrides": {**table.train_overrides_for(row), **train_overrides},
                "out_dir": str(rec.parent / stem),
                "record_path": str(rec),
                "quick": bool(quick),
                "weights_from": "",
            }
            if nproc_per_run > 1:
                params["nproc_per_node"] = int(nproc_per_run)
            jobs.append({
                "config_key": config_key(params),
                "train_key": train_key(params),
                "table": table.id,
                "row": row.name,
                "seed": seed,
                "notebook": str(nb.resolve()),
                "output_notebook": str(rec.with_suffix(".ipynb")),
                "record_path": str(rec),
                "parameters": params,
                "timeout": float(timeout),
                "kernel": kernel,
                "cwd": str((cwd or repo_root()).resolve()),
            })
    return assign_weight_sources(jobs, table, out, seeds)


def assign_weight_sources(jobs: list[dict], table: PaperTable, out: Path, seeds: int) -> list[dict]:
    """Point each job whose model trains exactly as an earlier row's (same :func:`train_key`, another
    :func:`config_key`) at that row's run of the same seed (``parameters["weights_from"]``, ``weights_source``:
    its record), and order such jobs after all others. The source is the first row of the table, in its order,
    with the same training; a source outside this plan (``--rows``) is used only if its run finished with a
    ``final.pt``, otherwise the job trains itself."""
    if not jobs:
        return jobs
    planned = {(j["row"], j["seed"]): j for j in jobs}
    first: dict = {}  # (train_key, seed) → (row name, config_key) of the first row that trains it
    for row in table.runnable_rows([r.name for r in table.rows if r.reproduce]):
        for seed in range(seeds):
            job = planned.get((row.name, seed))
            if job:  # its keys are already computed
                tk, ck = job["train_key"], job["config_key"]
            else:
                params = {**next(iter(planned.values()))["parameters"], "seed": seed,
                          "overrides": table.model_overrides(row)}
                tk, ck = train_key(params), config_key(params)
            if tk is not None:
                first.setdefault((tk, seed), (row.name, ck))
    for job in jobs:
        src = first.get((job["train_key"], job["seed"]))
        if src is None or src[0] == job["row"] or src[1] == job["config_key"]:
            continue
        src_rec = record_path(out, table.id, src[0], job["seed"])
        src_dir = trained_weights_dir(src_rec, job["cwd"])
        if (src[0], job["seed"]) not in planned and not (is_finished(src_rec) and (src_dir / "final.pt").is_file()):
            continue
        job["parameters"]["weights_from"] = str(src_dir)
        job["weights_source"] = str(src_rec)
    return sorted(jobs, key=lambda j: "weights_source" in j)  # stable: sources first


def trained_weights_dir(rec_path: os.PathLike, cwd: os.PathLike) -> Path:
    """The folder holding the weights (``final.pt``) of the run recorded at ``rec_path``: its own run folder
    (``<row>__seed<k>/`` beside the record), or, for a record shared from another table's identical run
    (``shared_from``), that run's folder — a shared record copies the JSON only. ``cwd``: the root that the
    record's repository-relative paths are relative to."""
    rec_path = Path(rec_path)
    rec = read_record(rec_path) or {}
    if rec.get("status") == "finished" and rec.get("shared_from"):
        src = Path(rec["shared_from"])
        src = src if src.is_absolute() else Path(cwd) / src
        return src.parent / src.stem
    return rec_path.parent / rec_path.stem


def _run_digest(params: dict, view) -> Optional[str]:
    import hashlib
    import json

    from onestage.modeling import get_model_config

    effective = "smoke" if params.get("quick") else params["preset"]
    try:
        cfg = view(get_model_config(params["model"], effective, **params["overrides"]))
    except (TypeError, ValueError):
        return None  # an unknown override: the run itself will fail loudly and be recorded as failed
    blob = json.dumps({"model": params["model"], "preset": effective, "cfg": cfg, "data": params["data"],
                       "seed": params["seed"], "train": params["train_overrides"], "quick": bool(params["quick"]),
                       **({"nproc": params["nproc_per_node"]} if params.get("nproc_per_node", 1) > 1 else {})},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def train_key(params: dict) -> Optional[str]:
    """Like :func:`config_key`, over the config's :func:`onestage.modeling.training_view`: equal for two runs that
    train the same weights, even when their inference differs."""
    from onestage.modeling import training_view

    return _run_digest(params, training_view)


def config_key(params: dict) -> Optional[str]:
    """A digest of everything that determines a run's result: model, its *effective* config (the preset with the row's
    overrides applied, so ``{}`` and ``{"mask_head_depth": 3}`` agree when 3 is the default), data, seed, training
    overrides and quick mode. Two jobs with the same key train the same model on the same data with the same seed —
    a paper's baseline row typically appears in every table of a paper. ``None`` if the config cannot be built."""
    import dataclasses

    return _run_digest(params, dataclasses.asdict)


def find_shared_record(job: dict) -> Optional[Path]:
    """A finished record of another table under the same results root with the same :func:`config_key`."""
    key = job.get("config_key")
    if not key:
        return None
    own = Path(job["record_path"])
    for path in sorted(own.parent.parent.glob("*/*.json")):
        if path == own:
            continue
        rec = read_record(path)
        if rec and rec.get("status") == "finished" and rec.get("config_key") == key and not rec.get("shared_from"):
            return path
    return None


def share_record(job: dict, source: Path) -> dict:
    """Write ``job``'s record as a copy of the identical run at ``source`` (marked ``shared_from``)."""
    rec = read_record(source)
    write_json_atomic(job["record_path"], repo_relative({**rec, "table": job["table"], "row": job["row"],
                                                         "seed": job["seed"], "shared_from": str(source)},
                                                        job["cwd"]))
    return {"row": job["row"], "seed": job["seed"], "status": "shared", "error": None, "seconds": 0.0}


def _table_notebook(table: PaperTable) -> Path:
    if table.notebook is None:
        raise TableError(
            f"table {table.id!r} ({table.kind}) names no notebook yet ('notebook': null in {table.path}); "
            "nothing can reproduce it until one is written — its published side is still shown by --report"
        )
    p = Path(table.notebook)
    return p if p.is_absolute() else repo_root() / p


def _traceback_excerpt(lines, limit: int = TRACEBACK_LINES) -> str:
    text = "\n".join(_ANSI.sub("", str(x)) for x in lines)
    tail = text.strip().splitlines()[-limit:]
    return "\n".join(tail)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def execute_job(job: dict) -> dict:
    """Run one job (in a worker process): execute the notebook, then make sure a record exists either way.

    Returns a small summary ``{"row", "seed", "status", "error", "seconds"}`` for the progress bar and final table.
    """
    t0 = time.perf_counter()
    rec_path = Path(job["record_path"])
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(rec_path) as locked:
        if not locked:
            return {"row": job["row"], "seed": job["seed"], "status": "locked", "seconds": 0.0,
                    "error": f"another process is running it (lock {rec_path.with_suffix('.lock')}); nothing written"}
        return _execute_locked(job, rec_path, t0)


@contextlib.contextmanager
def run_lock(rec_path: Path):
    """An exclusive, non-blocking lock on ``<run>.lock`` beside the record, held while the run executes: a second
    sweep started on the same results folder (say, while the workers of a killed one are still ending) skips the
    run instead of training it twice in one folder. Yields False when another process holds it. The operating
    system releases the lock when its holder dies, however it dies (``fcntl.flock``; no lock where fcntl is
    missing, e.g. Windows)."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(rec_path.with_suffix(".lock"), "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _execute_locked(job: dict, rec_path: Path, t0: float) -> dict:
    import papermill

    error = tb = None
    source = job.get("weights_source")
    try:
        if source and not is_finished(source):
            raise RuntimeError(f"the run whose trained weights this row evaluates did not finish: {source}")
        papermill.execute_notebook(
            job["notebook"],
            job["output_notebook"],
            parameters=job["parameters"],
            kernel_name=job["kernel"],
            execution_timeout=job["timeout"],
            progress_bar=False,
            log_output=False,
            cwd=job["cwd"],
        )
    except papermill.PapermillExecutionError as e:
        error = f"{e.ename}: {e.evalue}"
        tb = _traceback_excerpt(e.traceback)
    except BaseException as e:  # timeouts, dead kernels, interrupts: all become a failed record
        error = f"{type(e).__name__}: {e}"
        tb = _traceback_excerpt(traceback.format_exception(type(e), e, e.__traceback__))
    seconds = time.perf_counter() - t0

    rec = read_record(rec_path) if error is None else None
    if error is None and (rec is None or rec.get("status") != "finished"):
        error = f"notebook ran to the end but left no finished record at {rec_path}"
    run_info = {"table": job["table"], "row": job["row"], "seed": job["seed"], "config_key": job.get("config_key"),
                "train_key": job.get("train_key"), "executed_notebook": job["output_notebook"],
                "wall_s": round(seconds, 2)}
    if source:
        run_info["weights_source"] = source
    if error is None:
        write_json_atomic(rec_path, repo_relative({**rec, **run_info}, job["cwd"]))
        return {"row": job["row"], "seed": job["seed"], "status": "finished", "error": None, "seconds": seconds}
    write_json_atomic(rec_path, repo_relative({
        "format": RECORD_FORMAT,
        "status": "failed",
        **run_info,
        "error": error,
        "traceback": tb,
        "parameters": job["parameters"],
        "finished": _now(),
    }, job["cwd"]))
    return {"row": job["row"], "seed": job["seed"], "status": "failed", "error": error, "seconds": seconds}


def _worker_init(driver_pid: Optional[int] = None) -> None:
    # The parent decides what Ctrl-C means (stop launching); workers keep going until their run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if driver_pid is not None:
        die_with_parent(driver_pid)


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (the sweep's driver) dies, even by SIGKILL: on Linux the kernel sends
    SIGKILL (``prctl(PR_SET_PDEATHSIG)``), elsewhere a daemon thread polls the parent pid once a second. The run's
    Jupyter kernel follows by itself: ipykernel exits when its parent (this worker) is gone. Without this a killed
    driver leaves its workers training, and a rerun would train the same rows beside them."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the driver died before the line above ran
        os._exit(1)

    import threading

    def poll():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=poll, name="die-with-parent", daemon=True).start()


def run_jobs(jobs: list[dict], workers: int = 1, progress: bool = True,
             executor=None) -> tuple[list[dict], bool]:
    """Run ``jobs`` with at most ``workers`` at once; returns (summaries, interrupted).

    Jobs whose record is already finished are skipped (summary status ``"skipped"``); a job whose exact
    configuration already finished for another table under the same results root reuses that record (status
    ``"shared"``, the record names its source) instead of training the same model again. A job that evaluates
    another run's weights (``weights_source``) starts only once that run has ended. Jobs are submitted lazily, so an
    interrupt only has to stop the loop: nothing queued needs cancelling.

    ``executor`` says where the runs execute (:mod:`onestage.experiments.executors`): by default a
    :class:`~onestage.experiments.executors.LocalExecutor` of ``workers`` processes; a ``RayExecutor`` runs each job
    as a Ray task, as many at once as its cluster holds. The semantics above are the same for both.
    """
    from tqdm.auto import tqdm

    from onestage.experiments.executors import LocalExecutor

    summaries = []
    todo = []
    for job in jobs:
        if is_finished(job["record_path"]):
            summaries.append({"row": job["row"], "seed": job["seed"], "status": "skipped", "error": None,
                              "seconds": 0.0})
        elif (source := find_shared_record(job)) is not None:
            summaries.append(share_record(job, source))
        else:
            todo.append(job)
    for job in todo:  # a weight source that is already done may be a record shared from another table's run
        if job.get("weights_source") and is_finished(job["weights_source"]):
            job["parameters"]["weights_from"] = str(trained_weights_dir(job["weights_source"], job["cwd"]))
    if not todo:
        return summaries, False
    interrupted = False
    failures = 0
    ex = executor if executor is not None else LocalExecutor(workers)
    with ex:
        bar = tqdm(total=len(todo), desc=f"runs ({ex.name})", unit="run", disable=not progress)
        queue = list(todo)
        running: dict = {}

        def next_ready():
            busy = {j["record_path"] for j in running.values()} | {j["record_path"] for j in queue}
            for k, j in enumerate(queue):
                if j.get("weights_source") not in busy:
                    return queue.pop(k)
            return None

        def collect(done):
            nonlocal failures
            for handle in done:
                job = running.pop(handle)
                try:
                    s = ex.result(handle, job)
                except BaseException as e:  # the worker (process or Ray task) itself died
                    s = {"row": job["row"], "seed": job["seed"], "status": "failed",
                         "error": f"worker crashed: {type(e).__name__}: {e}", "seconds": 0.0}
                    write_json_atomic(job["record_path"], {
                        "format": RECORD_FORMAT, "status": "failed", "table": job["table"], "row": job["row"],
                        "seed": job["seed"], "error": s["error"], "traceback": None,
                        "parameters": job["parameters"], "finished": _now()})
                summaries.append(s)
                failures += s["status"] == "failed"
                bar.update(1)
                bar.set_postfix(failed=failures)

        try:
            while True:
                while not interrupted and len(running) < ex.slots:
                    job = next_ready()
                    if job is None:
                        break
                    running[ex.submit(job)] = job
                if not running:
                    break
                collect(ex.wait_any(running))
        except KeyboardInterrupt:
            interrupted = True
            bar.write(f"Interrupted: no new runs; waiting for {len(running)} running (Ctrl-C again to abandon them).")
            try:
                collect(ex.wait_all(running))
            except KeyboardInterrupt:
                bar.write("Abandoning running runs; their records are not written.")
                ex.abandon(running)
        finally:
            bar.close()
    return summaries, interrupted


def runs_table(summaries: list[dict]) -> str:
    """A markdown table of this invocation's runs: status, time, error (first line)."""
    lines = ["| row | seed | status | time s | error |", "|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (s["row"], s["seed"])):
        err = (s["error"] or "").splitlines()[0][:100] if s["error"] else ""
        lines.append(f"| {s['row']} | {s['seed']} | {s['status']} | {s['seconds']:.1f} | {err} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``reproduce`` options (the CLI wires them under ``python -m onestage reproduce``)."""
    parser.add_argument("table", nargs="?", help="paper table id (data/paper_tables/<id>.json) or a path to one")
    parser.add_argument("--list", action="store_true", help="list the known tables and exit")
    parser.add_argument("--preset", choices=PRESETS, default="cpu", help="training preset (default: cpu)")
    parser.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 of every row (default: 1)")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="results root (default: runs/reproduce)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"per-cell execution timeout in seconds (default: {DEFAULT_TIMEOUT_S})")
    parser.add_argument("--rows", type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated row names (default: every non-optional row)")
    parser.add_argument("--data", default="synthetic", help="dataset spec for get_dataset (default: synthetic)")
    parser.add_argument("--quick", action="store_true", help="pass quick=True (smoke-sized runs, for checking the pipe)")
    parser.add_argument("--notebook", type=Path, help="run this notebook instead of the table's")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan without running")
    parser.add_argument("--report", action="store_true", help="aggregate the records and print the table; no runs")
    parser.add_argument("--results-dir", type=Path,
                        help="folder holding <row>__seed<k>.json records for --report (default: <out>/<table>)")
    parser.add_argument("--figure", type=Path, help="with --report: also save the comparison figure here")
    parser.add_argument("--backfill-errors", action="store_true",
                        help="add the TIDE error breakdown to the finished records in --results-dir that lack it, "
                             "by evaluating the weights their runs left in <out>/<table>/ (no training), then report")
    parser.add_argument("--train-set", action="append", metavar="KEY=VALUE", default=[],
                        help="TrainConfig override for every run, e.g. --train-set max_iters=300 --train-set "
                             "time_budget_s=None (values are Python literals; recorded in each run's config)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (sets OMP_NUM_THREADS for the kernels); with --workers K, "
                             "K runs × N threads should not exceed the cores")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="where runs execute: local worker processes (default) or tasks on a Ray cluster "
                             "(pip install -e '.[ray]')")
    parser.add_argument("--address", default=None,
                        help="with --executor ray: the cluster to join (e.g. 'auto' or 'ray://HEAD:10001'; "
                             "default: start a local Ray instance for the sweep)")
    parser.add_argument("--cpus-per-run", type=float, default=1.0,
                        help="with --executor ray: CPUs each run reserves (default: 1; also its OMP_NUM_THREADS "
                             "unless --threads is given)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0,
                        help="with --executor ray: GPUs each run reserves (default: 0)")
    parser.add_argument("--nproc-per-run", type=int, default=1,
                        help="each run is one DDP training over this many processes (torchrun inside the run; one "
                             "per GPU with --gpus-per-run, gloo on CPU); default 1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_train_set(items: Sequence[str]) -> dict:
    """``["max_iters=300", "time_budget_s=None"]`` → ``{"max_iters": 300, "time_budget_s": None}`` (the same
    KEY=VALUE parsing as ``train --train-set``); names are checked against :class:`onestage.config.TrainConfig` so a
    typo fails before anything runs."""
    import dataclasses

    from onestage.cli_args import parse_sets
    from onestage.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        out = parse_sets(items, "--train-set")
    except UserError as e:
        raise TableError(str(e)) from e
    unknown = sorted(set(out) - known)
    if unknown:
        raise TableError(f"--train-set {unknown}: not TrainConfig fields; known: {sorted(known)}")
    return out


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``reproduce`` command; returns the process exit code (0 ok, 1 some runs failed, 2 usage)."""
    if args.list or not args.table:
        for tid in list_tables():
            t = load_table(tid)
            print(f"{tid:24s} {t.kind:10s} {t.model:9s} {len(t.rows)} rows  {t.title}")
        return 0 if args.list else 2
    try:
        table = load_table(args.table)
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.backfill_errors:
        from onestage.experiments.experiment import backfill_errors

        results_dir = args.results_dir or Path(args.out) / table.id
        done = 0
        for path in sorted(Path(results_dir).glob("*__seed*.json")):
            rec = read_record(path)
            if rec is None or rec.get("status") != "finished" or rec.get("errors"):
                continue
            source = rec.get("weights_from") or rec.get("weights_source")
            stem = Path(source).stem if source and source.endswith(".json") else None
            run_dir = Path(source) if source and not stem else Path(args.out) / table.id / (stem or path.stem)
            try:
                backfill_errors(path, run_dir, data=args.data)
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            done += 1
            print(f"{path.name}: breakdown added from {run_dir}")
        print(f"{done} record(s) backfilled")
        args.report = True
    if args.report:
        from onestage.experiments.aggregate import report, write_report

        results_dir = args.results_dir or Path(args.out) / table.id
        text, fig = report(table, results_dir, figure=args.figure is not None)
        print(text)
        if fig is not None:
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.figure, dpi=120, bbox_inches="tight")
            print(f"figure: {args.figure}")
        if results_dir.is_dir():
            written = write_report(table, results_dir)
            print("written: " + ", ".join(str(p) for p in written.values()))
        return 0

    if table.kind == "statistics":
        return run_statistics(table, args)

    if args.seeds < 1 or args.workers < 1 or getattr(args, "nproc_per_run", 1) < 1:
        print("error: --seeds, --workers and --nproc-per-run must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # inherited by kernels
    try:
        jobs = plan_runs(table, seeds=args.seeds, preset=args.preset, data=args.data, out=args.out, rows=args.rows,
                         quick=args.quick, notebook=args.notebook, timeout=args.timeout, kernel=args.kernel,
                         train_overrides=parse_train_set(getattr(args, "train_set", [])),
                         nproc_per_run=getattr(args, "nproc_per_run", 1))
        if not jobs:
            raise TableError(f"table {table.id!r}: no rows to run")
        validate_parameters(Path(jobs[0]["notebook"]), list(jobs[0]["parameters"]))
    except (TableError, ParameterError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        for j in jobs:
            state = "finished" if is_finished(j["record_path"]) else "to run"
            shared = f"  weights_from={j['parameters']['weights_from']}" if j["parameters"]["weights_from"] else ""
            print(f"{j['row']:20s} seed {j['seed']}  {state:9s} {j['record_path']}  overrides={j['parameters']['overrides']}"
                  f"{shared}")
        return 0

    executor = None
    if getattr(args, "executor", "local") == "ray":
        from onestage.experiments.executors import RayExecutor

        try:
            executor = RayExecutor(args.address, args.cpus_per_run, args.gpus_per_run, threads=args.threads)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        summaries, interrupted = run_jobs(jobs, workers=args.workers, progress=not args.no_progress,
                                          executor=executor)
    except UserError as e:  # e.g. Ray missing, or a cluster too small for one run
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(runs_table(summaries))
    from onestage.experiments.aggregate import report

    text, _ = report(table, Path(args.out) / table.id, figure=False)
    print()
    print(text)
    if interrupted:
        print("\nInterrupted: rerun the same command to resume (finished runs are skipped).")
        return 130
    locked = [s for s in summaries if s["status"] == "locked"]
    if locked:
        print(f"\n{len(locked)} run(s) were left alone: another process is running them (a sweep still going, or "
              f"the workers of one that was just stopped); rerun when it has ended.")
    return 1 if any(s["status"] in ("failed", "locked") for s in summaries) else 0


def run_statistics(table: PaperTable, args: argparse.Namespace) -> int:
    """Compute a ``kind: statistics`` table on ``--data`` (seconds, no notebook), then print the report."""
    from onestage.experiments.statistics import STATISTICS

    if table.id not in STATISTICS:
        print(f"error: no function computes statistics table {table.id!r}; known: {sorted(STATISTICS)}",
              file=sys.stderr)
        return 2
    compute = STATISTICS[table.id]
    try:
        paths = compute(table, args.data, args.out, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from onestage.experiments.aggregate import report, write_report

    print(f"{len(paths)} records in {Path(args.out) / table.id}")
    print(report(table, Path(args.out) / table.id, figure=False)[0])
    write_report(table, Path(args.out) / table.id)
    return 0


def build_parser(prog: str = "onestage reproduce") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

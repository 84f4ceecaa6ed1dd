"""The pieces of ``notebooks/experiment.ipynb`` that are worth testing on their own.

The notebook stays a readable, top-to-bottom story (parameters → data → model → train → evaluate → time → record);
what it needs beyond the public API lives here: building the datasets for a preset, timing inference fairly,
collecting versions and the git commit, and assembling the one JSON record a run leaves behind.
"""
from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from onestage.engine.checkpoint import git_commit, git_dirty
from onestage.experiments.records import RECORD_FORMAT

#: How many validation images ``quick=True`` evaluates and times: enough to exercise every code path, in seconds.
QUICK_EVAL_IMAGES = 8


def build_datasets(data: str, train_cfg, model: Optional[str] = None):
    """Train and val datasets for ``data`` (a :func:`onestage.data.get_dataset` spec), sized like ``train_cfg``.

    The input sizes belong to the training preset (``cpu`` trains at ~320 px, ``paper`` at 800), not to the dataset,
    so they come from it (:func:`onestage.data.datasets_for_config`: multi-scale sizes, flips and ``skip_empty`` for
    training, the single test size for evaluation).
    """
    from onestage.data import datasets_for_config

    return datasets_for_config(data, train_cfg, model=model)


def time_inference(model, dataset, num_images: int = 20, warmup: int = 2) -> float:
    """Mean eval-mode forward time in ms per image (batch 1, after ``warmup`` untimed images), on the model's device.

    Batch 1 because that is how the papers report speed; warm-up so that lazy initialisation (allocator, cuDNN
    autotuning) is not billed to the first timed image.
    """
    import torch

    from onestage.modeling.parts import model_device

    device = model_device(model)
    n = min(num_images + warmup, len(dataset))
    if n <= warmup:
        raise ValueError(f"need more than {warmup} images to time inference, dataset has {len(dataset)}")
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(n):
                image = dataset[i][0].to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model([image])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return 1000.0 * sum(times) / len(times)


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor inside ``obj`` (tensors, lists/tuples/dicts and dataclass-like objects of them)."""
    from onestage.modeling.parts import flat_tensors

    return sum(t.numel() * t.element_size() for t in flat_tensors(obj))


def head_output_mib(model, image) -> Optional[float]:
    """MiB of the tensors the model's ``head`` sub-module returns for one eval-mode image (FCOS family: the
    class/box/center-ness maps; SOLO: category and mask maps), or None when the model has no ``head`` module.

    The memory argument of Decoupled SOLO (paper §4) is about these outputs: S² mask maps per level (vanilla) vs
    S + S (decoupled). Measured, not computed: a forward hook sums the bytes of the head's actual outputs.
    ``SOLO.forward`` asks its vanilla head for the S² channels it reads only (``dense_masks=False``); the memory
    argument is about the dense head of the paper, so a pre-hook asks for the dense outputs while measuring.
    """
    import inspect

    import torch

    from onestage.modeling.parts import model_device

    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Module):
        return None
    device = model_device(model)
    seen = []
    handles = [head.register_forward_hook(lambda _m, _inp, out: seen.append(_tensor_bytes(out)))]
    if "dense_masks" in inspect.signature(head.forward).parameters:
        handles.append(head.register_forward_pre_hook(
            lambda _m, args, kwargs: (args, {**kwargs, "dense_masks": True}), with_kwargs=True))
    from onestage.modeling.fast_inference import plain_inference

    was_training = model.training
    model.eval()
    try:
        # the plain path: the hooks sit on this model's head (the fast path runs a copy), and in fp32
        with torch.inference_mode(), plain_inference(model):
            model([image.to(device)])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sum(seen) / 2**20 if seen else None


def cost_summary(model, dataset, inference_ms_per_image: float) -> dict:
    """What a run costs, recorded as ``record["cost"]`` and readable by reports as ``cost.<name>``:
    ``inference_ms`` (batch 1, mean), ``params_M``, ``head_output_mib`` (see :func:`head_output_mib`; None
    where not measurable) and ``inference_fast_path``: what of the inference fast path ``inference_ms`` ran with
    (:mod:`onestage.modeling.fast_inference`; None: off), so that records timed before and after it are told apart."""
    from onestage.modeling.fast_inference import fast_inference_options
    from onestage.modeling.parts import model_device

    opts = fast_inference_options(model)
    return {
        "inference_ms": float(inference_ms_per_image),
        "inference_fast_path": None if opts is None else opts.applied(model_device(model)),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "head_output_mib": head_output_mib(model, dataset[0][0]),
    }


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # torchvision is a dependency, but the record should not fail over a version string
        out["torchvision"] = None
    import onestage

    out["onestage"] = onestage.__version__
    return out


def load_trained_weights(model, run_dir) -> dict:
    """Load the weights another run trained (``run_dir/final.pt``) into ``model`` and return that run's
    ``summary.json``. Refuses when the checkpoint's model trains differently from ``model``
    (:func:`onestage.modeling.training_view`) — only inference may differ — or when it did not finish."""
    import json

    from onestage.engine.checkpoint import config_from_dict, load_checkpoint
    from onestage.modeling import training_view

    run_dir = Path(run_dir)
    final = run_dir / "final.pt"
    if not final.is_file():
        raise FileNotFoundError(f"weights_from: {final} does not exist (the source run has not finished)")
    ckpt = load_checkpoint(final)
    source_cfg = config_from_dict(type(model.cfg), ckpt["model_cfg"])
    if training_view(source_cfg) != training_view(model.cfg):
        theirs, ours = training_view(source_cfg), training_view(model.cfg)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(f"weights_from: {final} trained another model (fields {diff} differ beyond inference)")
    model.load_state_dict(ckpt["model"])
    return json.loads((run_dir / "summary.json").read_text())


def train_distributed(model: str, preset: str, data: str, overrides: dict, train_cfg, out_dir,
                      nproc_per_node: int, resume: bool = False) -> list:
    """Train one run as a DDP job of ``nproc_per_node`` processes on this node: ``torchrun --standalone`` of
    ``python -m onestage train`` with the run's model, preset, data, model overrides and *every* field of its
    ``train_cfg`` (so the distributed run trains exactly the configuration the notebook built; the batch is split over
    the processes, see :func:`onestage.engine.train.train`), into ``out_dir``, resuming its ``last.pt`` when
    ``resume``. The engine picks gloo on CPU and NCCL with one GPU per process. Its output streams into the
    notebook; a failed training raises ``subprocess.CalledProcessError``. Returns the command it ran."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc_per_node)}",
           "-m", "onestage", "train", "--model", model, "--preset", preset, "--data", data, "--out", str(out_dir),
           "--no-progress"]
    if resume:
        cmd.append("--resume")  # the model is the checkpoint's; --set is refused on a resume
    else:
        for k, v in overrides.items():
            cmd += ["--set", f"{k}={v!r}"]
    for k, v in train_cfg.to_dict().items():
        cmd += ["--train-set", f"{k}={v!r}"]
    subprocess.run(cmd, check=True)
    return cmd


def pick_metrics(metrics: dict) -> dict:
    """Keep the COCO summary numbers per IoU type (bbox, segm): AP, AP50, AP75, APs, APm, APl."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {iou: {k: float(v[k]) for k in keys if k in v} for iou, v in (metrics or {}).items() if isinstance(v, dict)}


def error_summary(dataset, results: list, max_images: Optional[int] = None) -> dict:
    """Per IoU type, the TIDE breakdown of a run's COCO results (:meth:`onestage.analysis.errors.ErrorBreakdown.summary`:
    ΔAP and count per error type), on the images that were evaluated; stored as ``record["errors"]`` so a report
    can say which error an ablation moved."""
    from onestage.analysis.errors import analyze, subset_gt

    coco = dataset.coco if max_images is None else subset_gt(dataset.coco, dataset.ids[:max_images])
    return {t: v["errors"] for t, v in analyze(coco, results).items()}


def make_record(*, model: str, preset: str, effective_preset: str, quick: bool, seed: int, data: str,
                overrides: dict, model_cfg: dict, train_cfg: dict, metrics: dict, train_summary: dict,
                train_time_s: float, inference_ms_per_image: float, num_val_images: int,
                cost: Optional[dict] = None, weights_from: Optional[str] = None,
                errors: Optional[dict] = None) -> dict:
    """The one record a finished run leaves (``status: finished``); see ``data/paper_tables/README.md``.
    ``cost`` (from :func:`cost_summary`) is stored as ``record["cost"]``. ``weights_from``: the run whose trained
    weights this one evaluated instead of training (its ``train_time_s`` and iterations are that run's)."""
    extra = {"weights_from": str(weights_from)} if weights_from else {}
    if errors:
        extra["errors"] = errors
    return {
        "format": RECORD_FORMAT,
        "status": "finished",
        "config": {
            "model": model,
            "preset": preset,
            "effective_preset": effective_preset,
            "quick": bool(quick),
            "overrides": overrides,
            "model_cfg": model_cfg,
            "train_cfg": train_cfg,
        },
        "seed": int(seed),
        "data": data,
        "metrics": pick_metrics(metrics),
        "metrics_unit": "percent",
        "num_val_images": int(num_val_images),
        "train_time_s": float(train_time_s),
        "iterations": int(train_summary.get("iterations", 0)),
        "stopped": train_summary.get("stopped"),
        "inference_ms_per_image": float(inference_ms_per_image),
        "cost": dict(cost or {"inference_ms": float(inference_ms_per_image)}),
        "versions": versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def backfill_errors(record_path, run_dir, data: str = "synthetic", tolerance: float = 0.05) -> Optional[dict]:
    """Add the TIDE breakdown (``record["errors"]``) to a finished record made before runs stored it, by evaluating
    the weights its run left (``run_dir/final.pt``; for a row that evaluated another row's weights, that run's
    folder) with the record's own model config and test size. The re-evaluation must give the record's metrics
    (within ``tolerance`` AP: evaluation is deterministic), else nothing is written; the record says it was
    backfilled. Returns the updated record, or None when it already had one or is not finished."""
    import json

    import onestage
    from onestage.config import TrainConfig
    from onestage.engine.checkpoint import config_from_dict
    from onestage.data import dataset_for_config
    from onestage.engine.evaluate import evaluate
    from onestage.experiments.records import read_record, write_json_atomic

    rec = read_record(record_path)
    if rec is None or rec.get("status") != "finished" or rec.get("errors"):
        return None
    cfg = rec["config"]
    train_cfg = config_from_dict(TrainConfig, cfg["train_cfg"], ignore_unknown=True)
    val = dataset_for_config(rec.get("data", data), "val", train_cfg, train=False, model=cfg["model"])
    net = onestage.build_model(cfg["model"], preset=cfg["effective_preset"], num_classes=val.num_classes,
                               **cfg["overrides"])
    load_trained_weights(net, run_dir)
    net.eval()
    n = rec.get("num_val_images")
    metrics, results = evaluate(net, val, max_images=n, progress=False, return_predictions=True)
    for iou, ms in pick_metrics(metrics).items():
        recorded = (rec.get("metrics") or {}).get(iou, {}).get("AP")
        if recorded is not None and abs(ms["AP"] - recorded) > tolerance:
            raise ValueError(f"{record_path}: re-evaluating {run_dir} gives {iou} AP {ms['AP']:.2f}, the record says "
                             f"{recorded:.2f}: not the same model or data; nothing written")
    rec["errors"] = error_summary(val, results, n)
    rec["errors_backfilled"] = {"from": str(Path(run_dir) / "final.pt"), "on": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "git_commit": git_commit()}
    write_json_atomic(record_path, json.loads(json.dumps(rec)))
    return rec

"""The small trained checkpoints shipped in ``data/checkpoints/`` (``python -m onestage checkpoints``).

Each is the ``cpu`` preset of one model trained on a dataset within the preset's time budget, evaluated with COCOeval
on the dataset's val split, and exported model-only in fp16 with a JSON card beside it (config, data, iterations,
wall time, metrics, git commit, machine). The training run itself stays in ``runs/checkpoints/<name>/``: an
interrupted run resumes there, and a finished one is only re-evaluated and re-exported.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

from onestage.engine.checkpoint import export_model, git_commit

__all__ = ["DEFAULT_MODELS", "MAX_CHECKPOINT_BYTES", "shipped_name", "make_shipped_checkpoint"]

#: What ``make checkpoints`` produces: (model, data) pairs.
DEFAULT_MODELS = (("fcos", "synthetic"), ("condinst", "synthetic"), ("blendmask", "synthetic"),
                  ("solov2", "synthetic"), ("condinst", "nuclei"))
#: The size the issue allows per shipped checkpoint.
MAX_CHECKPOINT_BYTES = 10 * 1024 * 1024


def shipped_name(model: str, data: str, preset: str = "cpu") -> str:
    return f"{model}_{preset}_{data.split(':')[0]}"


def _machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU" if not _cuda() else "CUDA GPU"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_shipped_checkpoint(model: str, data: str = "synthetic", out_dir: os.PathLike = "data/checkpoints",
                            runs_dir: os.PathLike = "runs/checkpoints", preset: str = "cpu",
                            time_budget_s: Optional[float] = None, max_iters: Optional[int] = None,
                            progress: bool = True, **train_overrides) -> dict:
    """Train (or resume) ``model`` at ``preset`` on ``data``, evaluate on its val split, export; returns the card."""
    import onestage
    from onestage.config import get_train_config
    from onestage.data import get_dataset
    from onestage.engine.checkpoint import load_model
    from onestage.engine.evaluate import evaluate
    from onestage.engine.train import seed_everything, train

    name = shipped_name(model, data, preset)
    run = Path(runs_dir) / name
    overrides = dict(train_overrides)
    if time_budget_s is not None:
        overrides["time_budget_s"] = time_budget_s or None
    if max_iters is not None:
        overrides["max_iters"] = max_iters
    cfg = get_train_config(preset, **overrides)
    train_ds = get_dataset(data, split="train", train=True, min_size=cfg.min_size, max_size=cfg.max_size)
    val_ds = get_dataset(data, split="val", train=False, min_size=(cfg.test_min_size,), max_size=cfg.test_max_size)
    t0 = time.time()
    if not (run / "final.pt").exists():
        seed_everything(cfg.seed)
        net = onestage.build_model(model, preset=preset, num_classes=train_ds.num_classes)
        summary = train(net, train_ds, cfg, run, resume=(run / "last.pt").exists(), progress=progress,
                        class_names=train_ds.class_names)
    else:
        summary = json.loads((run / "summary.json").read_text())
    wall_train = time.time() - t0
    net = load_model(run / "final.pt").eval()
    metrics = evaluate(net, val_ds, progress=progress)
    card = {
        "model": model, "preset": preset, "data": data,
        "data_sizes": {"train_images": len(train_ds), "val_images": len(val_ds)},
        "iterations": summary.get("iterations"), "train_time_s": round(float(summary.get("train_time_s", 0)), 1),
        "stopped": summary.get("stopped"),
        "train_cfg": cfg.to_dict(),
        "model_cfg": json.loads(json.dumps(_cfg_dict(net), default=str)),
        "metrics_val": {k: {m: round(float(v), 2) for m, v in sec.items()} for k, sec in metrics.items()},
        "git_commit": git_commit(), "machine": _machine(), "command": f"python -m onestage checkpoints {name}",
        "made": time.strftime("%Y-%m-%d"), "wall_s_this_call": round(wall_train, 1),
        "weights": "fp16, model only (optimizer state dropped)",
    }
    out = Path(out_dir) / f"{name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    export_model(run / "final.pt", out, half=True, card=card)
    size = out.stat().st_size
    card["bytes"] = size
    if size > MAX_CHECKPOINT_BYTES:
        card["warning"] = f"{size / 2**20:.1f} MiB exceeds the {MAX_CHECKPOINT_BYTES / 2**20:.0f} MiB budget"
    return card


def _cfg_dict(net) -> dict:
    import dataclasses

    return dataclasses.asdict(net.cfg) if dataclasses.is_dataclass(getattr(net, "cfg", None)) else {}

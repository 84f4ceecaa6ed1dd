"""The small trained checkpoints shipped in ``data/checkpoints/`` (``python -m onestage checkpoints``).

:data:`SHIPPED` is the recipe of each: model, data, training preset and iteration count. A checkpoint is trained on
the dataset's train split, evaluated with COCOeval on its val split, and exported model-only in fp16 with a JSON
card beside it (recipe, config, data, iterations, wall time, metrics, git commit, machine, the command that remakes
it). The training run itself stays in ``runs/checkpoints/<name>/``: an interrupted run resumes there, and a finished
one is only re-evaluated and re-exported. Notebooks find a shipped file with :func:`shipped_checkpoint`.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from onestage.engine.checkpoint import export_model, git_commit

__all__ = ["SHIPPED", "ShippedRecipe", "MAX_CHECKPOINT_BYTES", "recipe_for", "shipped_name", "shipped_checkpoint",
           "make_shipped_checkpoint"]


@dataclass(frozen=True)
class ShippedRecipe:
    """How one shipped checkpoint is made: ``preset`` names both the model preset and the training preset;
    ``max_iters`` overrides the training preset's schedule length (the cosine schedule follows it), None keeps it."""

    model: str
    data: str
    preset: str
    max_iters: Optional[int] = None

    @property
    def name(self) -> str:
        return shipped_name(self.model, self.data, self.preset)


#: What ``make checkpoints`` makes and ``data/checkpoints/`` ships. The synthetic ones use the ``fast`` regime
#: (frozen stem + first stage with cached features, bf16 where the CPU has it, 256-px training) with iteration
#: counts sized to ~20 minutes of training on a 2-core CPU with a warm feature cache (data/results/bench_train/README.md;
#: CondInst 1200 and BlendMask 1100 took 34 minutes each from a fresh checkout, their cards say so); the nuclei
#: CondInst is the ``cpu`` preset's 15-minute run.
SHIPPED = (
    ShippedRecipe("fcos", "synthetic", "fast", 1400),
    ShippedRecipe("condinst", "synthetic", "fast", 1200),
    ShippedRecipe("blendmask", "synthetic", "fast", 1100),
    ShippedRecipe("solov2", "synthetic", "fast", 650),
    ShippedRecipe("solo", "synthetic", "fast", 700),
    ShippedRecipe("decoupled_solo", "synthetic", "fast", 500),
    ShippedRecipe("condinst", "nuclei", "cpu"),
)
#: The size the issue allows per shipped checkpoint.
MAX_CHECKPOINT_BYTES = 10 * 1024 * 1024


def shipped_name(model: str, data: str, preset: str) -> str:
    """``<model>_<preset>_<data>`` (the data spec without its ``:ROOT`` part)."""
    return f"{model}_{preset}_{data.split(':')[0]}"


def recipe_for(model: str, data: str = "synthetic") -> Optional[ShippedRecipe]:
    """The :data:`SHIPPED` recipe of ``model`` on ``data`` (matched without a ``:ROOT`` part), or None."""
    base = data.split(":")[0]
    return next((r for r in SHIPPED if r.model == model and r.data == base), None)


def shipped_dir() -> Path:
    """The checkout's ``data/checkpoints`` folder, where the shipped checkpoints and their cards live."""
    return Path(__file__).resolve().parents[3] / "data" / "checkpoints"


def shipped_checkpoint(model: str, data: str = "synthetic", directory: Optional[os.PathLike] = None) -> Path:
    """Where the shipped checkpoint of ``model`` on ``data`` lives (``directory`` defaults to the checkout's
    ``data/checkpoints``), whether or not it has been made yet; ValueError when no recipe ships one."""
    recipe = recipe_for(model, data)
    if recipe is None:
        raise ValueError(f"no shipped checkpoint of {model!r} on {data!r}; shipped: "
                         + ", ".join(f"{r.model}@{r.data}" for r in SHIPPED))
    return Path(directory if directory is not None else shipped_dir()) / f"{recipe.name}.pt"


def _machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU" if not _cuda() else "CUDA GPU"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_shipped_checkpoint(model: str, data: str = "synthetic", out_dir: os.PathLike = "data/checkpoints",
                            runs_dir: os.PathLike = "runs/checkpoints", preset: str = "fast",
                            time_budget_s: Optional[float] = None, max_iters: Optional[int] = None,
                            progress: bool = True, **train_overrides) -> dict:
    """Train (or resume) ``model`` at ``preset`` on ``data``, evaluate on its val split, export; returns the card."""
    import onestage
    from onestage.config import get_train_config
    from onestage.data import datasets_for_config
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
    train_ds, val_ds = datasets_for_config(data, cfg, model=model)
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
        "git_commit": git_commit(), "machine": _machine(),
        "command": (f"python -m onestage checkpoints {model}@{data.split(':')[0]} --preset {preset}"
                    + (f" --max-iters {max_iters}" if max_iters is not None else "")),
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

"""Training configuration and presets.

Model configs live beside their models (``FCOSConfig`` in ``modeling/fcos.py``, ...), so that one file holds one model.
This module holds what is common to every model's training: optimiser, schedule, input sizes, batch.

Presets change capacity and schedule, never the algorithm:

* ``paper`` — the published schedule (AdelaiDet ``Base-FCOS.yaml`` / FCOS paper §4): SGD, batch 16, LR 0.01,
  momentum 0.9, weight decay 1e-4, 90k iterations with ×0.1 steps at 60k/80k, linear warm-up over 1000 iterations from
  1/1000 (detectron2 defaults); short side 800, max 1333.
* ``cpu`` — trains in minutes on a 2-core laptop: small images, AdamW, a cosine schedule. The schedule is indexed
  by iteration (so resume is exact), and ``max_iters`` (450) is sized so that the cosine decay completes within the
  15-minute budget at the ~1.75 s/step measured for the cpu-preset FCOS at batch 8 on two free cores (13 min); on a
  slower or busier machine the budget stops training earlier, before the learning rate has decayed.
* ``fast`` — the CPU regime that learns several times faster in wall time (``python -m onestage bench regimes``,
  ``data/results/bench_train/``), with the model preset of the same name: the ``cpu`` models with the stem and
  first stage of the body frozen (``freeze_at=2``, the papers' own default; the ``cpu`` preset trains everything),
  whose output :mod:`onestage.modeling.feature_cache` keeps per input view (``cache_features``; ``"auto"`` shares it
  through ``data/generated/feature_cache`` between the runs of a table); bf16 autocast on CPUs that compute bf16
  natively (``amp_cpu``, detected at run time; fp32 elsewhere); one 256-px training scale plus flips (so views
  repeat and hit the cache) and data loading in the training process (a loader process competes with the two
  compute threads of a 2-core machine). No time budget: iterations, not a busy machine, decide where training
  ends. The ablation schedule is this preset cut to 300 iterations (``python -m onestage reproduce TABLE --preset
  fast --seeds 3 --train-set max_iters=300``): 4–9 minutes per FCOS, CondInst or BlendMask run on 2 cores, so a
  table of 7 rows × 3 seeds in about two hours.
* ``smoke`` — a handful of iterations on tiny images, for tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainConfig:
    batch_size: int = 16
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iters: int = 90_000
    lr_schedule: str = "step"  # "step" | "cosine"
    lr_steps: tuple = (60_000, 80_000)
    lr_gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 1.0 / 1000
    clip_grad_norm: Optional[float] = None
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler)
    amp_cpu: bool = False  # bf16 autocast on a CPU with native bf16 (AVX512-BF16 / AMX), detected at run time
    cache_features: bool = False  # serve a frozen backbone body's features from BodyFeatureCache
    feature_cache_dir: Optional[str] = None  # share the cache between runs through this folder (None: memory only;
    #                                          "auto": data/generated/feature_cache, beside the generated data)
    min_size: tuple = (800,)  # training short side; several values = multi-scale training
    max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    skip_bad_images: bool = False  # train without the images CocoDataset.check_files finds bad (else: stop, list them)
    num_workers: int = 2
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 1000
    time_budget_s: Optional[float] = None  # stop (and checkpoint) after this much training wall time
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Values no schedule can use are refused here, before anything trains (a negative ``max_iters`` would
        otherwise "finish" after 0 iterations, a zero batch fail deep in the loader)."""
        checks = [("batch_size", self.batch_size, isinstance(self.batch_size, int) and self.batch_size >= 1),
                  ("max_iters", self.max_iters, isinstance(self.max_iters, int) and self.max_iters >= 1),
                  ("lr", self.lr, isinstance(self.lr, (int, float)) and self.lr > 0),
                  ("warmup_iters", self.warmup_iters, isinstance(self.warmup_iters, int) and self.warmup_iters >= 0),
                  ("num_workers", self.num_workers, isinstance(self.num_workers, int) and self.num_workers >= 0),
                  ("flip_prob", self.flip_prob, isinstance(self.flip_prob, (int, float)) and 0 <= self.flip_prob <= 1)]
        bad = [f"{name}={value!r}" for name, value, ok in checks if not ok]
        if bad:
            raise ValueError(f"invalid training setting(s): {', '.join(bad)} (batch_size and max_iters must be "
                             "integers >= 1, lr > 0, warmup_iters and num_workers integers >= 0, flip_prob in [0, 1])")

    def replace(self, **overrides) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown TrainConfig option(s) {unknown}; known: {sorted(names)}")
        # Values that went through JSON (papermill parameters, records) come back as lists: restore tuple fields.
        overrides = {k: tuple(v) if isinstance(v, list) and isinstance(getattr(self, k), tuple) else v
                     for k, v in overrides.items()}
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRAIN_PRESETS: dict[str, dict] = {
    "paper": {},
    "cpu": dict(
        batch_size=8,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        max_iters=450,
        lr_schedule="cosine",
        warmup_iters=50,
        warmup_factor=0.01,
        clip_grad_norm=10.0,
        min_size=(288, 320, 352),
        max_size=352,
        test_min_size=320,
        test_max_size=352,
        num_workers=1,
        log_every=10,
        checkpoint_every=50,
        time_budget_s=15 * 60,
    ),
    "smoke": dict(
        batch_size=2,
        optimizer="adamw",
        lr=1e-3,
        max_iters=4,
        lr_schedule="cosine",
        warmup_iters=1,
        warmup_factor=0.1,
        clip_grad_norm=10.0,
        min_size=(128,),
        max_size=160,
        test_min_size=128,
        test_max_size=160,
        num_workers=0,
        log_every=1,
        checkpoint_every=2,
    ),
}


# ``fast``: the cpu schedule (optimiser, learning rate, 450-iteration cosine, test sizes) with the levers that pay on
# a 2-core CPU (see the module docstring and data/results/bench_train/README.md), and no time budget.
TRAIN_PRESETS["fast"] = {
    **{k: v for k, v in TRAIN_PRESETS["cpu"].items() if k != "time_budget_s"},
    **dict(amp_cpu=True, cache_features=True, feature_cache_dir="auto", min_size=(256,), max_size=256, num_workers=0,
           checkpoint_every=100),
}


def get_train_config(preset: str = "cpu", **overrides) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(TRAIN_PRESETS)}")
    return TrainConfig().replace(**TRAIN_PRESETS[preset]).replace(**overrides)

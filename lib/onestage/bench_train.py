"""Where a training iteration's time goes: ``python -m onestage bench train``.

For a model at a preset, :func:`time_training_step` runs real training steps (the preset's optimiser, clipping,
autocast policy and feature cache, its training input size and batch) and splits the wall time of each into

* **data**: loading and augmenting the batch (``SeededDataset`` + ``collate``, in this process);
* **forward**, split into **backbone** (body + FPN: ``backbone_body``, ``backbone_fpn``), **heads** (every other
  top-level module of the model: FCOS head, controller, mask branch, bases, ...) and **loss** (the rest of the
  forward: target assignment, the losses themselves, CondInst's dynamic heads, SOLO's per-cell masks);
* **backward**, split the same way by gradient hooks on each module's input and output tensors: a module's share
  is the span from the first gradient arriving at its outputs to the last arriving at its inputs; the body's share
  is what is left after the gradient reached the FPN's inputs (zero for a frozen body), and ``loss`` is the
  remainder (autograd work in the loss, dynamic heads and everything not inside a module), clamped at 0. Where
  autograd interleaves modules the spans overlap and the split is approximate; the totals are exact wall times;
* **optimizer**: gradient clipping + ``optimizer.step()``.

The same batch is used for every timed step after ``warmup`` untimed ones, so a preset with ``cache_features``
reports its steady state (every view already cached: what a run sees from its second epoch on, or from the start
when an earlier run of the same table filled the shared cache); the first, uncached step is reported as
``first_step_s``. Run it with 1 thread and with N: on 2 cores shared with other processes, the thread count is the
lever that decides whether a step takes 1.5 s or 15 s. No timed assertions anywhere: these are measurements.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Optional, Sequence

import torch

__all__ = ["time_training_step", "format_training_steps", "BENCH_TRAIN_MODELS"]

BENCH_TRAIN_MODELS = ("fcos", "condinst", "blendmask", "solo", "decoupled_solo", "solov2")


def _tensors(obj) -> list:
    """Every tensor that requires grad inside nested tuples / lists / dicts / NamedTuples."""
    if torch.is_tensor(obj):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


class _PartTimer:
    """Forward and backward wall time spent inside given modules (see the module docstring).

    Backward: tensor hooks record when the gradient of each module output and input arrives; a module's backward
    span runs from the first gradient at its outputs to the last at its inputs (to the end of the backward pass when
    no input needs a gradient, e.g. the first trainable module). Module backward hooks cannot be used: they do not
    see tensors inside the lists and dicts these modules take."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.fwd = defaultdict(float)
        self._fwd_start = {}
        self.out_first, self.in_last = {}, {}
        self._handles = []
        for name, m in modules.items():
            self._handles += [m.register_forward_pre_hook(lambda mod, args, n=name: self._pre(n, args)),
                              m.register_forward_hook(lambda mod, args, out, n=name: self._post(n, out))]

    def _pre(self, name, args):
        self._fwd_start[name] = time.perf_counter()
        for t in _tensors(args):
            t.register_hook(lambda g, n=name: self._arrive(self.in_last, n, max) or g)

    def _post(self, name, out):
        self.fwd[name] += time.perf_counter() - self._fwd_start[name]
        for t in _tensors(out):
            t.register_hook(lambda g, n=name: self._arrive(self.out_first, n, min) or g)

    @staticmethod
    def _arrive(table, name, pick):
        now = time.perf_counter()
        table[name] = pick(table.get(name, now), now)

    def backward_span(self, name: str, end: float) -> float:
        if name not in self.out_first:
            return 0.0
        return max(self.in_last.get(name, end) - self.out_first[name], 0.0)

    def reset(self):
        self.fwd.clear(), self._fwd_start.clear(), self.out_first.clear(), self.in_last.clear()

    def remove(self):
        for h in self._handles:
            h.remove()


def _split_modules(model) -> dict:
    parts = {"backbone": model.backbone, "backbone_fpn": model.backbone.fpn}
    for name, child in model.named_children():
        if name != "backbone" and any(True for _ in child.parameters()):
            parts[f"head:{name}"] = child
    return parts


def time_training_step(model_name: str, preset: str = "cpu", threads: Optional[int] = None, steps: int = 3,
                       warmup: int = 1, data: str = "synthetic", seed: int = 0, device: str = "cpu",
                       model_overrides: Optional[dict] = None, **train_overrides) -> dict:
    """Median seconds of each part of a training step of ``model_name`` at ``preset`` (see the module docstring)."""
    import onestage
    from onestage.config import get_train_config
    from onestage.data import dataset_for_config
    from onestage.engine.train import (InfiniteBatchSampler, SeededDataset, _to_device, autocast_policy,
                                       build_optimizer, collate, seed_everything, torch_threads)

    cfg = get_train_config(preset, **train_overrides)
    dev = torch.device(device)
    ds = dataset_for_config(data, "train", cfg, model=model_name)
    seeded = SeededDataset(ds)
    sampler = InfiniteBatchSampler(len(ds), cfg.batch_size, seed)  # the training loop's data order
    with torch_threads(threads):
        seed_everything(seed)
        model = onestage.build_model(model_name, preset=preset, num_classes=ds.num_classes,
                                     **(model_overrides or {})).to(dev).train()
        cache = model.backbone.attach_feature_cache() if cfg.cache_features else None
        optimizer = build_optimizer(model, cfg)
        use_amp, amp_dtype = autocast_policy(cfg, dev)
        body_trains = any(p.requires_grad for p in model.backbone.body.parameters())
        timer = _PartTimer(_split_modules(model))

        def load(iteration: int):
            return collate([seeded[item] for item in sampler.batch(iteration)])

        images, targets = load(0)
        images = [im.to(dev) for im in images]
        targets = _to_device(targets, dev)
        records, first = [], None
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            load(step + 1)  # a fresh batch's loading cost; the timed step reuses batch 0 (see the docstring)
            t1 = time.perf_counter()
            timer.reset()
            with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
                losses = model(images, targets)
            total = sum(losses.values())
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            t3 = time.perf_counter()
            if cfg.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            t4 = time.perf_counter()
            fwd_fpn = timer.fwd["backbone_fpn"]
            heads_f = sum(v for k, v in timer.fwd.items() if k.startswith("head:"))
            heads_b = sum(timer.backward_span(k, t3) for k in timer.modules if k.startswith("head:"))
            # the body's share starts when the gradient reached the FPN's inputs (the body's outputs)
            bwd_body = (t3 - timer.in_last["backbone_fpn"]) if body_trains and "backbone_fpn" in timer.in_last else 0.0
            bwd_fpn = timer.backward_span("backbone_fpn", t3)
            rec = {
                "data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3,
                "step": t4 - t0,
                "fwd_backbone_body": timer.fwd["backbone"] - fwd_fpn, "fwd_backbone_fpn": fwd_fpn,
                "fwd_heads": heads_f, "fwd_loss": max(t2 - t1 - timer.fwd["backbone"] - heads_f, 0.0),
                "bwd_backbone_body": bwd_body, "bwd_backbone_fpn": bwd_fpn, "bwd_heads": heads_b,
                "bwd_loss": max(t3 - t2 - bwd_body - bwd_fpn - heads_b, 0.0),
            }
            if step == 0:
                first = rec["step"]
            if step >= warmup:
                records.append(rec)
        timer.remove()
        if cache is not None:
            model.backbone.detach_feature_cache()
        used_threads = torch.get_num_threads()
    med = {k: statistics.median(r[k] for r in records) for k in records[0]}
    return {
        "model": model_name, "preset": preset, "threads": used_threads, "device": str(dev),
        "batch_size": cfg.batch_size, "train_size": list(cfg.min_size), "max_size": cfg.max_size,
        "autocast": str(amp_dtype).replace("torch.", "") if use_amp else "fp32",
        "feature_cache": bool(cache), "body_trains": body_trains, "steps": steps, "warmup": warmup,
        "first_step_s": first, "seconds": med, "loss": float(total.detach()),
    }


def format_training_steps(results: Sequence[dict]) -> str:
    """A Markdown table of :func:`time_training_step` results."""
    cols = ["step", "data", "forward", "backward", "optimizer", "fwd_backbone_body", "fwd_backbone_fpn",
            "fwd_heads", "fwd_loss", "bwd_backbone_body", "bwd_backbone_fpn", "bwd_heads", "bwd_loss"]
    head = ("| model | preset | threads | autocast | cache | first step | " + " | ".join(cols) + " |\n"
            + "|" + "---|" * (6 + len(cols)) + "\n")
    rows = []
    for r in results:
        s = r["seconds"]
        rows.append(f"| {r['model']} | {r['preset']} | {r['threads']} | {r['autocast']} | "
                    f"{'yes' if r['feature_cache'] else 'no'} | {r['first_step_s']:.3f} | "
                    + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")
    return head + "\n".join(rows)


# ------------------------------------------------------------------------------------------- time to a quality
def time_to_quality(model_name: str, preset: str, metric: str, target_ap: float, out_dir, max_iters: Optional[int] = None,
                    eval_every: int = 50, eval_images: Optional[int] = None, data: str = "synthetic",
                    threads: Optional[int] = None, progress: bool = True, model_overrides: Optional[dict] = None,
                    **train_overrides) -> dict:
    """Train ``model_name`` at ``preset`` and evaluate it (COCOeval on the val split) every ``eval_every``
    iterations until ``metric`` AP (``"bbox"`` or ``"segm"``) reaches ``target_ap`` or the schedule ends.

    Returns the learning curve (iteration, training seconds, APs) and ``reached``: the first evaluation at or above
    the target, with its training time — data + forward + backward + step, evaluation excluded, feature cache
    starting empty (a cold run; a table's later runs read a filled cache). ``max_iters`` overrides the preset's
    schedule length (the cosine decay is laid over it)."""
    import json
    from pathlib import Path

    import onestage
    from onestage.config import get_train_config
    from onestage.data import datasets_for_config
    from onestage.engine.evaluate import evaluate
    from onestage.engine.train import seed_everything, torch_threads, train

    if metric not in ("bbox", "segm"):
        raise ValueError(f"metric must be 'bbox' or 'segm', got {metric!r}")
    # iterations, not a wall-clock budget, end the schedule; the feature cache starts empty and stays in memory (a
    # cold run: a table's later runs, reading the shared folder an earlier one filled, are faster)
    overrides = {"time_budget_s": None, "feature_cache_dir": None, **train_overrides}
    if max_iters is not None:
        overrides["max_iters"] = max_iters
    cfg = get_train_config(preset, **overrides)
    train_ds, val_ds = datasets_for_config(data, cfg, model=model_name)
    out = Path(out_dir)
    curve, reached = [], None
    t_start = time.time()

    def on_step(iteration, model, train_time):
        nonlocal reached
        if iteration % eval_every and iteration != cfg.max_iters:
            return False
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = evaluate(model, val_ds, max_images=eval_images, progress=False)
        model.train()
        rec = {"iter": iteration, "train_time_s": round(train_time, 2), "eval_s": round(time.perf_counter() - t0, 1),
               **{f"{k}_AP": round(float(v["AP"]), 2) for k, v in metrics.items()}}
        curve.append(rec)
        if progress:
            print(f"[{model_name} {preset}] {json.dumps(rec)}", flush=True)
        if rec.get(f"{metric}_AP", -1) >= target_ap:
            reached = rec
            return True
        return False

    with torch_threads(threads):
        seed_everything(cfg.seed)
        net = onestage.build_model(model_name, preset=preset, num_classes=train_ds.num_classes,
                                   **(model_overrides or {}))
        summary = train(net, train_ds, cfg, out, progress=progress, class_names=train_ds.class_names,
                        on_step=on_step)
        used_threads = torch.get_num_threads()
    return {"model": model_name, "preset": preset, "metric": metric, "target_ap": target_ap, "threads": used_threads,
            "max_iters": cfg.max_iters, "eval_every": eval_every, "eval_images": eval_images or len(val_ds),
            "reached": reached, "curve": curve, "iterations": summary["iterations"],
            "train_time_s": round(summary["train_time_s"], 1), "feature_cache": summary.get("feature_cache"),
            "autocast": summary.get("autocast"), "wall_s": round(time.time() - t_start, 1),
            "train_cfg": cfg.to_dict()}

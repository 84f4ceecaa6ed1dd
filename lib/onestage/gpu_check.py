"""``make gpu-check``: everything this suite can say about one NVIDIA GPU, in one run of a few minutes.

Steps, each with its own time limit so the whole check stays under :data:`TOTAL_BUDGET_S` (8 minutes):

1. ``tests`` — the CUDA-marked tests (``pytest -m cuda``: the Triton kernels against their references on the GPU);
2. ``kernels`` — ``bench kernels``: each fused kernel against its PyTorch reference at COCO scale, fp32 and fp16;
3. ``models`` — the model benchmarks on CUDA (``bench``: FCOS vs torchvision's ``fcos_resnet50_fpn``, the mask
   models vs ``maskrcnn_resnet50_fpn``, R-50-FPN ``paper`` presets, random weights, 800² input, 100 instances);
4. ``train`` — one short AMP training run per mask model (``fast`` preset on a small synthetic set, 60 iterations):
   seconds per iteration, peak memory, whether every loss stayed finite.

Every figure goes to ``data/results/bench_gpu/gpu_check.json`` and a readable ``README.md`` beside it, written
atomically after each step (a step that fails or runs out of time is recorded as such; the finished ones stay).
Without a GPU it stops at once with a clear message and exit status 2, before doing anything.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["NoGPU", "TOTAL_BUDGET_S", "STEPS", "run_gpu_check", "format_report", "default_out_dir"]

_REPO = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 8 * 60
#: step → its own time limit in seconds (they sum to less than the total budget)
STEPS = {"tests": 120, "kernels": 90, "models": 120, "train": 120}
MASK_MODELS = ("condinst", "blendmask", "solov2", "solo", "decoupled_solo")


class NoGPU(RuntimeError):
    """No CUDA device: the check has nothing to measure."""


def default_out_dir() -> Path:
    return _REPO / "data" / "results" / "bench_gpu"


def _require_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        raise NoGPU("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False): `make gpu-check` needs "
                    "one NVIDIA GPU; nothing was run. On a CPU machine, `make test` and `make bench` cover the CPU "
                    "paths.")
    return torch.cuda.get_device_name(0)


def _step_tests(limit_s: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                          cwd=_REPO, capture_output=True, text=True, timeout=limit_s)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"returncode": proc.returncode, "summary": tail, "ok": proc.returncode == 0}


def _step_kernels(limit_s: float) -> dict:
    from onestage.ops import bench as kernel_bench

    rows = kernel_bench.run_kernel_bench(device="cuda")
    return {"rows": rows, "table": kernel_bench.format_kernel_bench(rows), "ok": True}


def _step_models(limit_s: float, size: int = 800, repeats: int = 10) -> dict:
    from onestage import bench

    t0 = time.time()
    out = {"size": size, "fcos": bench.run_bench(size=size, repeats=repeats, warmup=3, device="cuda")}
    for name in MASK_MODELS:
        if time.time() - t0 > limit_s:
            out[name] = {"skipped": "out of time"}
            continue
        out[name] = bench.run_mask_bench(name, size=size, repeats=repeats, warmup=3, device="cuda")
    out["ok"] = True
    return out


def _step_train(limit_s: float, iters: int = 60) -> dict:
    import tempfile

    import torch

    import onestage
    from onestage.config import get_train_config
    from onestage.data import get_dataset
    from onestage.data.synthetic import default_data_root, ensure_synthetic
    from onestage.engine.train import train

    root = default_data_root() / "synthetic-gpu-check"
    ensure_synthetic(root, num_train=160, num_val=16, progress=False)
    ds = get_dataset(f"synthetic:{root}", split="train", min_size=(256,), max_size=256, with_masks=True)
    runs, t0 = {}, time.time()
    for name in MASK_MODELS:
        if time.time() - t0 > limit_s:
            runs[name] = {"skipped": "out of time"}
            continue
        torch.manual_seed(0)
        model = onestage.build_model(name, preset="fast", num_classes=len(ds.class_names))
        cfg = get_train_config("fast", max_iters=iters, amp=True, checkpoint_every=10 ** 9, log_every=10,
                               time_budget_s=None, cache_features=False)
        torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            summary = train(model, ds, cfg, tmp, progress=False, class_names=ds.class_names, device="cuda")
            seconds = time.time() - start
            losses = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        finite = all(all(v == v and abs(v) != float("inf") for k, v in rec.items() if k.startswith("loss"))
                     for rec in losses)
        runs[name] = {"iterations": summary.get("iterations", iters), "seconds": round(seconds, 1),
                      "s_per_iter": round(seconds / max(1, summary.get("iterations", iters)), 3),
                      "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20),
                      "final_loss": losses[-1].get("loss") if losses else None, "losses_finite": finite}
    return {**runs, "ok": all(r.get("losses_finite", True) for r in runs.values())}


_STEP_FUNCS: dict[str, Callable[[float], dict]] = {"tests": _step_tests, "kernels": _step_kernels,
                                                    "models": _step_models, "train": _step_train}


def format_report(result: dict) -> str:
    """The README of ``data/results/bench_gpu/``: what ran, on what, and every figure."""
    lines = ["# GPU check", "",
             f"`make gpu-check` (`python -m onestage gpu-check`) on **{result['device']}**, "
             f"{result['started']} (torch {result['torch']}, commit `{str(result.get('commit'))[:12]}`); "
             f"{result['seconds']:.0f} s in all. Raw figures: `gpu_check.json`.", ""]
    for step in STEPS:
        r = result["steps"].get(step)
        lines.append(f"## {step}")
        lines.append("")
        if r is None:
            lines += ["not run", ""]
            continue
        if "error" in r:
            lines += [f"**failed**: {r['error']}", ""]
            continue
        if step == "tests":
            lines += [f"`pytest -m cuda`: {r['summary']} (exit status {r['returncode']})", ""]
        elif step == "kernels":
            lines += ["```", r["table"], "```", ""]
        elif step == "models":
            lines += [f"Median ms per {r['size']}² image, batch 1, random weights, 100 instances forced on both "
                      "sides (ours / torchvision's):", "",
                      "| model | ours ms | torchvision ms | ratio |", "|---|---|---|---|"]
            for name in ("fcos",) + MASK_MODELS:
                b = r.get(name) or {}
                if "onestage_s" in b:
                    lines.append(f"| {name} | {b['onestage_s'] * 1000:.1f} | {b['torchvision_s'] * 1000:.1f} | "
                                 f"{b['ratio']:.2f}× |")
                else:
                    lines.append(f"| {name} | {b.get('skipped', '—')} | | |")
            lines.append("")
        elif step == "train":
            lines += ["| model | iterations | s / iteration | peak memory MiB | final loss | losses finite |",
                      "|---|---|---|---|---|---|"]
            for name in MASK_MODELS:
                t = r.get(name) or {}
                if "s_per_iter" in t:
                    lines.append(f"| {name} | {t['iterations']} | {t['s_per_iter']:.3f} | {t['peak_memory_mib']} | "
                                 f"{t['final_loss']:.3f} | {t['losses_finite']} |")
                else:
                    lines.append(f"| {name} | {t.get('skipped', '—')} | | | | |")
            lines.append("")
    return "\n".join(lines) + "\n"


def run_gpu_check(out_dir: Optional[Path] = None, steps=tuple(STEPS), log: Callable[[str], None] = None) -> dict:
    """Run the steps (see the module docstring) and write ``gpu_check.json`` + ``README.md`` into ``out_dir``."""
    import torch

    from onestage.engine.checkpoint import git_commit
    from onestage.experiments.records import write_json_atomic, write_text_atomic

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    device = _require_gpu()
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    result = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
              "commit": git_commit(_REPO), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cuda": torch.version.cuda, "steps": {}, "seconds": 0.0}
    t0 = time.time()
    for step in steps:
        left = TOTAL_BUDGET_S - (time.time() - t0)
        limit = min(STEPS[step], left)
        if limit <= 5:
            result["steps"][step] = {"error": "not started: the 8-minute budget was spent"}
            continue
        log(f"gpu-check: {step} (up to {limit:.0f} s) ...")
        s0 = time.time()
        try:
            r = _STEP_FUNCS[step](limit)
        except subprocess.TimeoutExpired:
            r = {"error": f"ran past its {limit:.0f} s limit"}
        except Exception as e:  # one failing step must not lose the others' figures
            r = {"error": f"{type(e).__name__}: {e}"}
        r["seconds"] = round(time.time() - s0, 1)
        result["steps"][step] = r
        result["seconds"] = time.time() - t0
        write_json_atomic(out / "gpu_check.json", result)
        write_text_atomic(out / "README.md", format_report(result))
        log(f"gpu-check: {step} {'failed: ' + r['error'] if 'error' in r else 'done'} in {r['seconds']:.0f} s")
    return result


def main(argv=None) -> int:
    try:
        result = run_gpu_check()
    except NoGPU as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [s for s, r in result["steps"].items() if "error" in r or not r.get("ok", True)]
    print(format_report(result))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""The training loop: data order, optimiser and schedule, AMP, clipping, logging, checkpoints, resume, DDP.

Design choices (and why):

* **Data order is a pure function of (seed, iteration).** The sample stream is the concatenation of per-epoch
  permutations, the permutation of epoch ``e`` being ``randperm(n)`` from a generator seeded with ``(seed, e)``.
  Iteration ``i`` takes stream positions ``[i·B, (i+1)·B)`` (``B`` = global batch); under DDP rank ``r`` of ``W`` takes
  the ``r``-th contiguous slice of that global batch, like ``DistributedSampler`` but on the same stream. Resuming at
  iteration ``i`` therefore continues with exactly the batches an uninterrupted run would have seen.
* **Augmentation randomness is a pure function of the stream position too.** Each sample is loaded under Python /
  NumPy / torch RNGs seeded from ``(seed, position)`` (and restored afterwards), so random flips and scales do not
  depend on how many workers there are, on prefetching, or on where a run was interrupted.
* **The schedule is iteration-indexed** (``LambdaLR`` over iterations: linear warm-up, then step or cosine), so a
  resumed run has the same learning rate at every iteration.
* **A resume continues the same run.** Only the fields in :data:`RESUME_MAY_CHANGE` (length, budget, logging,
  loading, cache) may differ from the checkpoint's config; any other change (learning rate, optimiser, batch, seed,
  sizes, ...) raises :class:`ResumeMismatchError` before anything is written, rather than being recorded but not
  used (the optimiser and scheduler state come from the checkpoint). A longer ``max_iters`` is applied: the cosine
  schedule then ends at the new length.
* **Checkpoints are atomic** (see :mod:`onestage.engine.checkpoint`) and written every ``checkpoint_every``
  iterations, at the end, when the time budget runs out and on Ctrl-C. A non-finite loss raises
  :class:`NonFiniteLossError` *before* the bad step is applied and writes nothing, so ``last.pt`` stays the last good
  state; so do a non-finite gradient norm with a finite loss, and non-finite weights when a checkpoint is due.
* **The time budget counts only training wall time** (data loading + forward + backward + step, not checkpointing or
  evaluation), accumulated across resumes and stored in the checkpoint as ``train_time_s``.
* **DDP is detected from the environment** (``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): gloo on CPU,
  nccl on GPU. Only rank 0 writes files or shows progress; loss checks and stop decisions are agreed across ranks so
  no rank is left waiting in a collective.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from onestage.engine.checkpoint import (
    ClassMismatchError,
    check_num_classes,
    get_rng_state,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    set_rng_state,
    share_checkpoint,
    unwrap_model,
)

log = logging.getLogger(__name__)

__all__ = [
    "train",
    "NonFiniteLossError",
    "ResumeMismatchError",
    "RESUME_MAY_CHANGE",
    "InfiniteBatchSampler",
    "SeededDataset",
    "build_optimizer",
    "build_lr_lambda",
    "autocast_policy",
    "cpu_has_native_bf16",
    "seed_everything",
    "seed_worker",
    "collate",
    "read_metrics",
]


#: TrainConfig fields a resumed run may change: how long it goes on and how it logs, loads and caches — nothing that
#: the checkpoint's optimiser, scheduler or data order was built from.
RESUME_MAY_CHANGE = frozenset({"max_iters", "time_budget_s", "checkpoint_every", "log_every", "num_workers",
                               "cache_features", "feature_cache_dir", "skip_bad_images"})


class ResumeMismatchError(ValueError):
    """``resume=True`` with a config that differs from the checkpoint's in a field outside
    :data:`RESUME_MAY_CHANGE`; raised before anything is loaded or written."""

    def __init__(self, checkpoint: Path, changes: dict):
        self.checkpoint, self.changes = checkpoint, changes
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))
        super().__init__(
            f"cannot resume {checkpoint}: this run changes {listed}, which the checkpoint's optimiser, schedule or "
            f"data order were built with (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume). "
            "Resume with the checkpoint's values, or start a new run in another folder.")


def _normalised(value):
    """Config values compared across a checkpoint round trip (lists and tuples alike)."""
    if isinstance(value, (list, tuple)):
        return tuple(_normalised(v) for v in value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


def resume_changes(old_cfg: dict, cfg) -> dict:
    """``{field: (checkpoint's value, this run's value)}`` for the fields outside :data:`RESUME_MAY_CHANGE` that
    differ (fields the checkpoint does not record are not compared)."""
    new = dataclasses.asdict(cfg)
    return {k: (old_cfg[k], new[k]) for k in new
            if k in old_cfg and k not in RESUME_MAY_CHANGE and _normalised(old_cfg[k]) != _normalised(new[k])}


def _check_classes(model, dataset, class_names, ckpt, last_path) -> None:
    """Before anything is written: the model has the dataset's number of classes, and a resumed run's classes are
    the dataset's, by name and in order (training has no label mapping)."""
    check_num_classes(model, dataset, "the training data")
    recorded = ckpt.get("class_names") if ckpt is not None else None
    if recorded is not None and class_names is not None and list(recorded) != list(class_names):
        raise ClassMismatchError(f"cannot resume {last_path}: it was trained on the classes {list(recorded)}, the "
                                 f"training data has {list(class_names)}; resume on the run's data or start a new run")


def check_dataset_files(dataset, skip_bad: bool, what: str = "training data") -> None:
    """Before the first iteration: every image of ``dataset`` exists, opens and has the size its annotation file
    says (:meth:`onestage.data.coco.CocoDataset.check_files`; datasets without that method are not checked).
    Bad images raise :class:`onestage.data.coco.DatasetFilesError` listing all of them, or, with ``skip_bad``,
    are left out with a warning that lists them."""
    check = getattr(dataset, "check_files", None)
    if check is None:
        return
    problems = check()
    if not problems:
        return
    from onestage.data.coco import DatasetFilesError

    ann_file = getattr(dataset, "ann_file", type(dataset).__name__)
    if not skip_bad:
        raise DatasetFilesError(ann_file, problems, hint=f" as {what} (fix them, or train without them: "
                                                         f"--skip-bad-images, TrainConfig.skip_bad_images=True)")
    log.warning("%s", DatasetFilesError(ann_file, problems, hint=f"; {what}: left out (skip_bad_images)"))
    dataset.drop_images([p.image_id for p in problems])
    if len(dataset) == 0:
        raise DatasetFilesError(ann_file, problems, hint=f": no usable image left as {what}")


class NonFiniteLossError(FloatingPointError):
    """A loss or the gradient norm became NaN/inf (raised before the optimiser step, so no weights or checkpoints
    were touched), or the weights did by the time a checkpoint was due (raised instead of writing it): the last
    checkpoint on disk is always a finite state."""

    def __init__(self, iteration: int, losses: dict, checkpoint: Optional[Path] = None, kind: str = "loss"):
        self.iteration = iteration
        self.losses = losses
        self.checkpoint = checkpoint
        self.kind = kind  # "loss", "gradients" (finite loss, non-finite gradient norm) or "weights"
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        where = f"; the last good checkpoint is {checkpoint}" if checkpoint else "; no checkpoint had been written yet"
        super().__init__(
            f"non-finite {kind} at iteration {iteration}: {bad or ['(sum)']} ({terms}){where}. "
            "Try a lower learning rate, gradient clipping (clip_grad_norm) or a longer warm-up."
        )


# ------------------------------------------------------------------------------------------------------ randomness
@contextlib.contextmanager
def torch_threads(count: Optional[int]):
    """Run the block with ``torch.set_num_threads(count)`` and restore the previous count afterwards (``None``
    leaves it unchanged). The walkthrough notebooks push single images through small models on one thread (a pool
    only adds overhead to many small ops) but train, when they must, on every core."""
    previous = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise ValueError(f"thread count must be >= 1, got {count}")
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy from the per-worker torch seed.

    PyTorch seeds each worker's torch RNG differently but leaves NumPy's state forked from the parent, so without
    this every worker would draw the same NumPy numbers.
    """
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


_STREAM_SAMPLE, _STREAM_EPOCH = 0, 1


def _sample_seed(seed: int, position: int, stream: int = _STREAM_SAMPLE) -> int:
    """A well-mixed 63-bit seed from (seed, stream, position): neighbouring positions get unrelated seeds."""
    return int(np.random.SeedSequence([seed, stream, position]).generate_state(1, dtype=np.uint64)[0] % 2**63)


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    """Run the body with Python/NumPy/torch-CPU RNGs seeded by ``seed``, then put the caller's states back."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class InfiniteBatchSampler(Sampler):
    """Yields, forever, this rank's batch of ``(dataset index, sample seed)`` pairs for iterations ``start_iter, ...``.

    ``batch_size`` is the global batch; each of ``world_size`` ranks gets ``batch_size // world_size`` samples.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, start_iter: int = 0, rank: int = 0,
                 world_size: int = 1):
        if dataset_len <= 0:
            raise ValueError("cannot train on an empty dataset")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} distributed processes")
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.start_iter, self.rank, self.world_size = start_iter, rank, world_size
        self.per_rank = batch_size // world_size
        self._perms: dict[int, list[int]] = {}

    def epoch_permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, _STREAM_EPOCH))
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}  # keep one epoch cached
        return self._perms[epoch]

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        first = iteration * self.batch_size + self.rank * self.per_rank
        out = []
        for pos in range(first, first + self.per_rank):
            out.append((self.epoch_permutation(pos // self.n)[pos % self.n], _sample_seed(self.seed, pos)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = self.start_iter
        while True:
            yield self.batch(it)
            it += 1


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is loaded under RNGs seeded with ``seed`` (see module doc)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with _seeded_rngs(seed):
            return self.dataset[index]


def collate(batch):
    """``[(image, target), ...]`` → ``([images], [targets])`` (images keep their own sizes; the model pads)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _to_device(targets, device):
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


# ------------------------------------------------------------------------------------------ optimiser and schedule
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD (paper) or AdamW; normalisation-layer parameters get no weight decay (detectron2's WEIGHT_DECAY_NORM=0)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, _NORMS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'sgd' or 'adamw'")


def build_lr_lambda(cfg) -> Callable[[int], float]:
    """LR multiplier at iteration ``it``: linear warm-up from ``warmup_factor`` (detectron2), then step or cosine."""
    if cfg.lr_schedule not in ("step", "cosine"):
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose 'step' or 'cosine'")
    steps = sorted(cfg.lr_steps)

    def factor(it: int) -> float:
        if cfg.lr_schedule == "step":
            f = cfg.lr_gamma ** bisect.bisect_right(steps, it)
        else:
            f = 0.5 * (1.0 + math.cos(math.pi * min(it, cfg.max_iters) / max(cfg.max_iters, 1)))
        if it < cfg.warmup_iters:
            alpha = it / cfg.warmup_iters
            f *= cfg.warmup_factor * (1 - alpha) + alpha
        return f

    return factor


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); elsewhere bf16 autocast is emulated and
    slower than fp32, so :func:`autocast_policy` stays in fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def autocast_policy(cfg, device) -> tuple[bool, torch.dtype]:
    """``(enabled, dtype)`` of the training autocast: on CUDA ``cfg.amp`` (bf16 where supported, else fp16 with a
    GradScaler); on CPU ``cfg.amp_cpu`` and only with native bf16 (:func:`cpu_has_native_bf16`), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        enabled = bool(cfg.amp)
        return enabled, torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cfg.amp_cpu and cpu_has_native_bf16():
        return True, torch.bfloat16
    return False, torch.float32


# -------------------------------------------------------------------------------------------------- distributed
@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed() -> _Dist:
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return _Dist(rank, world, local, created_group=True)


def _all_true(flag: bool, dd: _Dist, device) -> bool:
    if not dd.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _from_rank0(flag: bool, dd: _Dist, device) -> bool:
    if not dd.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def _mean_over_ranks(values: dict, dd: _Dist, device) -> dict:
    if not dd.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / dd.world_size for k, v in zip(keys, t.tolist())}


# --------------------------------------------------------------------------------------------------- metrics log
def read_metrics(path: os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("iter", 0) <= iteration]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    dataset: Dataset,
    train_cfg,
    out_dir: os.PathLike,
    resume: bool = False,
    val_dataset: Optional[Dataset] = None,
    progress: bool | str = True,
    class_names: Optional[list] = None,
    device: Optional[torch.device | str] = None,
    on_step: Optional[Callable[[int, nn.Module, float], Optional[bool]]] = None,
) -> dict:
    """Train ``model`` on ``dataset`` with ``train_cfg`` (:class:`onestage.config.TrainConfig`), writing to ``out_dir``.

    Files in ``out_dir``: ``last.pt`` (latest checkpoint), ``final.pt`` (when training ends by ``max_iters`` or the
    time budget), ``metrics.jsonl`` (iter, losses, lr, timings), ``summary.json``, ``eval.json`` (if
    ``val_dataset``). ``resume=True`` continues from ``last.pt`` (and fails if there is none); without it an
    existing ``last.pt`` is an error rather than silently overwritten. Build the model *after* seeding if you need
    reproducible initial weights (the CLI does). Returns the summary dict (also written as ``summary.json``).

    ``progress``: True shows a tqdm bar, ``"lines"`` prints one line per log record instead (what a notebook run
    headless by papermill streams to the terminal, where a notebook's widget bar never arrives), False nothing.

    ``on_step(iteration, model, train_time_s)``, if given, is called after every completed iteration, outside the
    timed step (its time is not training time): e.g. the learning-curve benchmark evaluates the model there. It must
    leave the model as it found it (``train()`` mode, same weights); returning True ends training there (``stopped``
    = ``"on_step"``, checkpoints written as at any end). Single-process runs only.
    """
    cfg = train_cfg
    out = Path(out_dir)
    dd = _setup_distributed()
    if on_step is not None and dd.enabled:
        raise ValueError("on_step is for single-process training (a stop on rank 0 would leave the others waiting)")
    try:
        return _train(model, dataset, cfg, out, resume, val_dataset, progress, class_names, device, dd, on_step)
    finally:
        if dd.created_group:
            dist.destroy_process_group()


def _train(model, dataset, cfg, out, resume, val_dataset, progress, class_names, device, dd: _Dist,
           on_step=None) -> dict:
    if device is None:
        device = torch.device(f"cuda:{dd.local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    class_names = class_names if class_names is not None else getattr(dataset, "class_names", None)
    last_path, final_path, metrics_path = out / "last.pt", out / "final.pt", out / "metrics.jsonl"

    ckpt = None
    if resume:
        if not last_path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint {last_path} (start without --resume)")
        ckpt = load_checkpoint(last_path)
        old = ckpt.get("train_cfg") or {}
        changes = resume_changes(old, cfg)
        if changes:
            raise ResumeMismatchError(last_path, changes)
        if "max_iters" in old and old["max_iters"] != cfg.max_iters:
            log.info("resuming %s with max_iters %d (was %d): the %s schedule now ends there", last_path,
                     cfg.max_iters, old["max_iters"], cfg.lr_schedule)
        unwrap_model(model).load_state_dict(ckpt["model"])
    elif last_path.exists():
        raise FileExistsError(f"{last_path} exists: pass resume=True (--resume) to continue, or use a new out_dir")
    else:
        seed_everything(cfg.seed)
    _check_classes(unwrap_model(model), dataset, class_names, ckpt, last_path)
    check_dataset_files(dataset, cfg.skip_bad_images)
    if val_dataset is not None:
        check_dataset_files(val_dataset, cfg.skip_bad_images, what="validation data")
        from onestage.engine.evaluate import require_ground_truth

        require_ground_truth(val_dataset)  # now, not after the training it would evaluate

    model.to(device).train()
    if dd.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    bare = unwrap_model(model)

    optimizer = build_optimizer(bare, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(cfg))
    use_amp, amp_dtype = autocast_policy(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda" and amp_dtype == torch.float16)
    cache = None
    if cfg.cache_features:
        backbone = getattr(bare, "backbone", None)
        if backbone is None or not hasattr(backbone, "attach_feature_cache"):
            raise ValueError(f"cache_features: {type(bare).__name__} has no backbone with a feature cache")
        directory = cfg.feature_cache_dir
        if directory == "auto":  # beside the generated data sets, shared by every run on this machine
            from onestage.data.synthetic import default_data_root

            directory = default_data_root() / "feature_cache"
        cache = backbone.attach_feature_cache(directory)

    iteration, train_time = 0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        iteration = int(ckpt["iteration"])
        train_time = float(ckpt.get("train_time_s", 0.0))

    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _truncate_metrics(metrics_path, iteration)
        else:
            metrics_path.unlink(missing_ok=True)
        (out / "train_config.json").write_text(json.dumps({
            "train_cfg": dataclasses.asdict(cfg),
            "model_name": getattr(bare, "name", None),
            "model_cfg": dataclasses.asdict(bare.cfg) if dataclasses.is_dataclass(getattr(bare, "cfg", None)) else None,
            "world_size": dd.world_size,
        }, indent=2, default=str))

    sampler = InfiniteBatchSampler(len(dataset), cfg.batch_size, cfg.seed, iteration, dd.rank, dd.world_size)
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        # a private generator: creating the loader iterator must not consume the global torch RNG
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    def checkpoint(path: Path, it: int, rng=None, stopped=None) -> Path:
        bad = [k for k, v in bare.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # a checkpoint is only written from a good state: "last good" must mean it
            raise NonFiniteLossError(it, {f"weight {k}": float("nan") for k in bad[:3]},
                                     last_path if last_path.exists() else None, kind="weights")
        ck = make_checkpoint(bare, optimizer=optimizer, scheduler=scheduler, scaler=scaler, iteration=it,
                             train_cfg=cfg, class_names=class_names,
                             extra={"train_time_s": train_time, "world_size": dd.world_size, "stopped": stopped})
        if rng is not None:
            ck["rng"] = rng
        return save_checkpoint(ck, path)

    bar = None
    lines = progress == "lines" and dd.main
    if progress and not lines and dd.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_iters, initial=iteration, desc=f"train {getattr(bare, 'name', '')}".strip(),
                   dynamic_ncols=True, unit="it")
    budget = cfg.time_budget_s
    stopped, last_losses, logged_iter, last_rec = None, {}, iteration, {}
    metrics_file = open(metrics_path, "a") if dd.main else None
    loader_iter = iter(loader)
    step_in_progress, rng_at_start, buffers_at_start = False, None, None
    try:
        while True:
            if iteration >= cfg.max_iters:
                stopped = "max_iters"
                break
            if budget is not None and _from_rank0(train_time >= budget, dd, device):
                stopped = "time_budget"
                break
            rng_at_start = get_rng_state()
            # the forward pass updates BatchNorm statistics (and batch counters) before the step: an interrupt there
            # must checkpoint the buffers as they were, or the resumed run would apply this batch's update twice
            buffers_at_start = [(b, b.detach().clone()) for b in bare.buffers()]
            t0 = time.perf_counter()
            images, targets = next(loader_iter)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = _to_device(targets, device)
            t_data = time.perf_counter() - t0

            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                losses = model(images, targets)
            total = sum(losses.values())
            values = {k: float(v.detach()) for k, v in losses.items()}
            values["loss"] = float(total.detach())
            if not _all_true(all(math.isfinite(v) for v in values.values()), dd, device):
                raise NonFiniteLossError(iteration + 1, values, last_path if last_path.exists() else None)

            step_in_progress = True
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            grad_norm = None
            if cfg.clip_grad_norm:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.clip_grad_norm))
            if not scaler.is_enabled():  # (fp16 GradScaler skips non-finite steps itself)
                norm = grad_norm if grad_norm is not None else float(torch.nn.utils.get_total_norm(
                    [q.grad for q in bare.parameters() if q.grad is not None]))
                if not _all_true(math.isfinite(norm), dd, device):  # finite loss, overflowing gradients
                    raise NonFiniteLossError(iteration + 1, {**values, "grad_norm": norm},
                                             last_path if last_path.exists() else None, kind="gradients")
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            # from here the live RNG state and buffers are the right ones to save
            step_in_progress, rng_at_start, buffers_at_start = False, None, None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time += dt
            last_losses = values

            last_rec = {"lr": lr, "time": dt, "data_time": t_data, "grad_norm": grad_norm}
            if iteration % cfg.log_every == 0 or iteration == cfg.max_iters:
                logged_iter = iteration
                mean = _mean_over_ranks(values, dd, device)
                if dd.main:
                    rec = {"iter": iteration, **mean, "lr": lr, "time": dt, "data_time": t_data,
                           "train_time_s": train_time}
                    if grad_norm is not None:
                        rec["grad_norm"] = grad_norm
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    if lines:
                        print(f"iteration {iteration}/{cfg.max_iters}  loss {mean['loss']:.3f}  lr {lr:.2e}  "
                              f"{dt:.2f} s/it  {train_time:.0f} s of training", flush=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}",
                                **({"t": f"{train_time:.0f}/{budget:.0f}s"} if budget else {}))
            if iteration % cfg.checkpoint_every == 0 and dd.main:
                checkpoint(last_path, iteration)
            if on_step is not None and dd.main and on_step(iteration, bare, train_time):
                stopped = "on_step"
                break
    except KeyboardInterrupt:
        if dd.main:
            if step_in_progress:
                log.warning("interrupted during an optimiser step; keeping the previous checkpoint %s", last_path)
            else:
                if buffers_at_start is not None:  # interrupted inside iteration + 1: undo its forward pass's updates
                    with torch.no_grad():
                        for live, saved in buffers_at_start:
                            live.copy_(saved)
                path = checkpoint(last_path, iteration, rng=rng_at_start, stopped="interrupted")
                log.warning("interrupted at iteration %d; saved %s (resume with --resume)", iteration, path)
        raise
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        del loader_iter  # shuts DataLoader workers down
        if cache is not None:
            bare.backbone.detach_feature_cache()

    if iteration > logged_iter and last_losses:  # e.g. stopped by the budget between log steps: log the last one
        mean = _mean_over_ranks(last_losses, dd, device)
        if dd.main:
            rec = {"iter": iteration, **mean, **{k: v for k, v in last_rec.items() if v is not None},
                   "train_time_s": train_time}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if dd.main:
        checkpoint(last_path, iteration, stopped=stopped)
        share_checkpoint(last_path, final_path)  # the same file twice, stored once (a hard link where possible)
    if dd.enabled:
        dist.barrier()

    summary = {
        "out_dir": str(out),
        "iterations": iteration,
        "max_iters": cfg.max_iters,
        "stopped": stopped,
        "train_time_s": train_time,
        "time_budget_s": budget,
        "last_losses": last_losses,
        "checkpoint": str(final_path),
        "world_size": dd.world_size,
        "autocast": str(amp_dtype).replace("torch.", "") if use_amp else None,
        "feature_cache": dict(cache.stats, memory_mib=round(cache.memory_bytes / 2**20, 1)) if cache else None,
        "metrics": None,
    }
    if dd.main:
        if val_dataset is not None:
            from onestage.engine.evaluate import evaluate

            summary["metrics"] = evaluate(bare, val_dataset, progress=bool(progress) and not lines)
            (out / "eval.json").write_text(json.dumps(summary["metrics"], indent=2))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

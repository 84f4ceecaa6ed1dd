"""Atomic checkpoints: save, load, rebuild a model, capture and restore every RNG.

Why atomic: training can be killed at any instant (SIGKILL, OOM killer, a laptop lid). A checkpoint is first written
to ``path.tmp``, flushed and fsync'ed, then ``os.replace``d over ``path``; a crash at any point leaves either the old
file or the new one, never a truncated mix.

Why the full model config is stored (not just the preset name): presets are tuned over time; a checkpoint must
rebuild the exact architecture it was trained with, so ``load_model`` constructs the config dataclass from the stored
dict instead of re-deriving it from ``(name, preset)``.

Checkpoints hold only tensors and plain Python containers, so they load with ``torch.load(weights_only=True)`` and
reading one never executes pickled code.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

FORMAT = "onestage-checkpoint-v1"

__all__ = [
    "FORMAT",
    "atomic_torch_save",
    "save_checkpoint",
    "share_checkpoint",
    "ClassMismatchError",
    "check_num_classes",
    "class_mapping",
    "load_checkpoint",
    "make_checkpoint",
    "load_model",
    "checkpoint_card",
    "model_from_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "git_commit",
    "git_dirty",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def git_commit(cwd: Optional[os.PathLike] = None) -> Optional[str]:
    """The current git commit of the source tree (``None`` outside a repository), so a result can be traced to code."""
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


# --------------------------------------------------------------------------------------------------------------- RNG
def git_dirty(cwd: Optional[os.PathLike] = None) -> Optional[bool]:
    """Whether tracked files differ from HEAD: a result from a dirty tree cannot be traced to the commit alone."""
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(res.stdout.strip()) if res.returncode == 0 else None


def get_rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA, if initialised) generator states as tensors / plain containers."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only if the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ------------------------------------------------------------------------------------------------------- save / load
def atomic_torch_save(obj: Any, path: os.PathLike) -> Path:
    """``torch.save`` to ``path.tmp``, fsync, then atomically rename over ``path``.

    If anything fails before the rename, the temporary file is removed and the previous ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # fsync the directory too, so the rename itself survives a power cut (best effort: not every OS allows it)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _class_path(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}:{cls.__qualname__}"


def _plain(obj):
    """Keep only types ``torch.load(weights_only=True)`` accepts; anything exotic in a config is stored as text."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return str(obj)


def make_checkpoint(
    model: nn.Module,
    *,
    optimizer=None,
    scheduler=None,
    scaler=None,
    iteration: int = 0,
    train_cfg=None,
    class_names=None,
    extra: Optional[dict] = None,
) -> dict:
    """Assemble the checkpoint dict of docs/ARCHITECTURE.md from live training objects.

    ``model`` must carry ``.cfg`` (a dataclass) and ``.num_classes``; ``.name`` is used for the registry lookup.
    The config and model classes are also recorded by import path so that models outside the registry reload too.
    """
    model = unwrap_model(model)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        raise TypeError(f"{type(model).__name__} has no dataclass `.cfg`; onestage checkpoints need one to rebuild it")
    if train_cfg is not None and dataclasses.is_dataclass(train_cfg):
        train_cfg = dataclasses.asdict(train_cfg)
    ckpt = {
        "format": FORMAT,
        "model_name": getattr(model, "name", None),
        "model_preset": getattr(model, "preset", None),
        "model_cfg": _plain(dataclasses.asdict(cfg)),
        "model_cfg_class": _class_path(cfg),
        "model_class": _class_path(model),
        "num_classes": int(model.num_classes),
        "class_names": list(class_names) if class_names is not None else None,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": get_rng_state(),
        "iteration": int(iteration),
        "train_cfg": _plain(train_cfg),
        "git_commit": git_commit(),
        "torch_version": str(torch.__version__),
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(checkpoint: dict, path: os.PathLike) -> Path:
    """Atomically write a checkpoint dict (see :func:`make_checkpoint`)."""
    if checkpoint.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} dict (format={checkpoint.get('format')!r})")
    return atomic_torch_save(checkpoint, path)


class ClassMismatchError(ValueError):
    """A model's classes and a dataset's cannot be matched (see :func:`class_mapping`)."""


def check_num_classes(model, dataset, what: str = "the dataset") -> None:
    """ClassMismatchError when ``model.num_classes`` and ``dataset.num_classes`` are both known and differ."""
    have, want = getattr(model, "num_classes", None), getattr(dataset, "num_classes", None)
    if have is not None and want is not None and have != want:
        names = getattr(dataset, "class_names", None)
        raise ClassMismatchError(f"the model predicts {have} classes, {what} has {want}"
                                 + (f" ({list(names)})" if names is not None else ""))


def class_mapping(model_names, dataset_names, what: str = "the model") -> Optional[list]:
    """How ``model``'s contiguous labels map to the dataset's, compared by class name.

    None when they are the same list (or either side does not record names: nothing to compare); a list
    ``m[model_label] = dataset_label`` when both hold the same distinct names in another order (e.g. the same
    categories with ids in another order, which would otherwise score wrong classes silently); otherwise
    :class:`ClassMismatchError` naming both sides."""
    if model_names is None or dataset_names is None:
        return None
    model_names, dataset_names = list(model_names), list(dataset_names)
    if model_names == dataset_names:
        return None
    if sorted(model_names) == sorted(dataset_names) and len(set(model_names)) == len(model_names):
        index = {name: i for i, name in enumerate(dataset_names)}
        return [index[name] for name in model_names]
    raise ClassMismatchError(
        f"{what} was trained on {len(model_names)} classes {model_names}, the dataset has {len(dataset_names)} "
        f"{dataset_names}: they cannot be matched by name (use data with the model's classes, or train a new model)")


def share_checkpoint(src: os.PathLike, dst: os.PathLike) -> Path:
    """Make ``dst`` the same checkpoint as ``src`` without a second copy on disk: a hard link, put in place
    atomically (a temporary name, then ``os.replace``); a plain copy where the filesystem has no hard links. ``src``
    is later replaced by rename (:func:`atomic_torch_save`), never rewritten in place, so ``dst`` keeps its content."""
    import shutil

    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def load_checkpoint(path: os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint, with clear errors for a missing file or a file that is not an onestage checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an {FORMAT} file (format={fmt!r})")
    return ckpt


def _import(path: str):
    """``module:qualname`` of a class recorded in a checkpoint — only inside the ``onestage`` package, so that a
    crafted checkpoint cannot make the loader import (and so run) a module of its choosing."""
    module, _, qualname = path.partition(":")
    if module != "onestage" and not module.startswith("onestage."):
        raise ValueError(f"checkpoint names the class {path!r} outside the onestage package; only onestage's own "
                         "classes are loaded")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _model_classes(ckpt: dict):
    """(config class, model class): from the registry by name, else from the recorded import paths (onestage's own
    classes only, e.g. the toy detector of the tests, checked to be a config dataclass and an nn.Module)."""
    name = ckpt.get("model_name")
    if name:
        from onestage.modeling import MODELS

        if name in MODELS:
            return MODELS[name]
    if ckpt.get("model_cfg_class") and ckpt.get("model_class"):
        cfg_cls, model_cls = _import(ckpt["model_cfg_class"]), _import(ckpt["model_class"])
        if not (isinstance(cfg_cls, type) and dataclasses.is_dataclass(cfg_cls)
                and isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
            raise ValueError(f"checkpoint names {ckpt['model_cfg_class']!r} / {ckpt['model_class']!r}, which are not "
                             "a model config dataclass and an nn.Module")
        return cfg_cls, model_cls
    raise ValueError(f"checkpoint names model {name!r}, which is not registered (onestage.available_models())")


def config_from_dict(cfg_cls, cfg_dict: dict, ignore_unknown: bool = False):
    """Rebuild a config dataclass (a model config, :class:`onestage.config.TrainConfig`) from its stored fields —
    a checkpoint's or a JSON record's, where tuples have become lists (turned back into tuples here). A field the
    class no longer has is a clear error, or skipped with ``ignore_unknown``; missing fields take their defaults."""
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(cfg_dict) - known)
    if unknown and not ignore_unknown:
        raise ValueError(f"checkpoint config has fields {unknown} that {cfg_cls.__name__} no longer knows")
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items() if k in known})



def model_from_checkpoint(ckpt: dict, map_location="cpu") -> nn.Module:
    """Build the model recorded in a loaded checkpoint dict and load its weights (eval mode)."""
    cfg_cls, model_cls = _model_classes(ckpt)
    cfg = config_from_dict(cfg_cls, ckpt["model_cfg"])
    model = model_cls(cfg, num_classes=ckpt["num_classes"])
    model.name = ckpt.get("model_name") or getattr(model, "name", None)
    model.preset = ckpt.get("model_preset")
    model.load_state_dict(ckpt["model"])
    model.class_names = ckpt.get("class_names")
    if map_location is not None:
        model.to(map_location)
    return model.eval()


def load_model(path: os.PathLike, map_location="cpu") -> nn.Module:
    """Rebuild a model from an onestage checkpoint file, in eval mode, with ``.class_names`` attached."""
    return model_from_checkpoint(load_checkpoint(path, map_location="cpu"), map_location=map_location)


def checkpoint_card(path: os.PathLike) -> dict:
    """The card :func:`export_model` wrote beside a checkpoint (``<path>.json``: data, iterations, training time,
    metrics, machine, the command that remakes it), or ``{}`` when there is none (a training run's own ``final.pt``)."""
    card = Path(str(path) + ".json")
    return json.loads(card.read_text()) if card.is_file() else {}


def export_model(src: os.PathLike, dst: os.PathLike, half: bool = True, card: Optional[dict] = None) -> Path:
    """Write a small, model-only copy of a training checkpoint (no optimizer/scheduler/RNG state), with the
    floating-point weights in fp16 when ``half`` — what ``data/checkpoints/`` ships so notebooks can show trained
    behaviour without training first. :func:`load_model` reads it back (weights are cast to the model's fp32).
    ``card`` (JSON-serialisable facts: data, iterations, metrics, ...) is stored under ``"card"`` and also written
    beside the file as ``<dst>.json``."""
    ckpt = load_checkpoint(src)
    state = ckpt["model"]
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    keep = ("format", "model_name", "model_preset", "model_cfg", "model_cfg_class", "model_class", "num_classes",
            "class_names", "iteration", "train_cfg", "git_commit", "train_time_s")
    small = {k: ckpt[k] for k in keep if k in ckpt}
    small["model"] = state
    small["card"] = _plain(card or {})
    path = atomic_torch_save(small, dst)
    tmp = Path(str(dst) + ".json.tmp")
    tmp.write_text(json.dumps(small["card"], indent=2, sort_keys=True) + "\n")
    os.replace(tmp, str(dst) + ".json")
    return path

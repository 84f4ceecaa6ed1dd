"""Datasets: a synthetic shape generator, a COCO-format reader, and real samples from installed wheels.

Every source is materialised as COCO JSON + PNG and read by :class:`CocoDataset`, so training, evaluation
(COCOeval) and the notebooks see one format. :func:`get_dataset` turns a short spec into a dataset, and
:func:`datasets_for_config` is the one place that sizes them for a training config (every training path uses it)::

    train_ds, val_ds = datasets_for_config("synthetic", cfg)   # cfg: an onestage.config.TrainConfig
    get_dataset("synthetic", split="val", min_size=(320,), max_size=352)   # any size, no config

The heavy imports (torch, via :mod:`.coco`) are lazy so that the generator's worker processes start quickly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "get_dataset",
    "dataset_for_config",
    "datasets_for_config",
    "CocoDataset",
    "collate_fn",
    "pad_collate",
    "generate",
    "ensure_synthetic",
    "default_data_root",
    "CATEGORIES",
    "SPECS",
]

#: The dataset specs :func:`get_dataset` understands (``DIR`` / paths are user-chosen).
SPECS = ("synthetic[:DIR]", "synthetic-crowded[:DIR]", "coco:ANN.json:IMAGES_DIR", "nuclei", "voc")


def __getattr__(name):
    if name in ("CocoDataset", "collate_fn", "pad_collate"):
        from onestage.data import coco

        return getattr(coco, name)
    if name in ("generate", "ensure_synthetic", "default_data_root", "CATEGORIES"):
        from onestage.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'onestage.data' has no attribute {name!r}")


def dataset_for_config(spec: str, split: str, train_cfg, train: Optional[bool] = None, model: Optional[str] = None,
                       **kwargs):
    """The dataset of ``spec`` / ``split`` as a training config ``train_cfg`` wants it.

    ``train`` (default ``split == "train"``): the config's multi-scale sizes, ``flip_prob`` and ``skip_empty=True``
    (an image without a usable annotation teaches nothing); otherwise the single test size, no flips, every image
    kept (COCOeval counts them). ``model`` (a registered name) decides whether instance masks are read: a box-only
    model (``needs_masks = False``, FCOS) keeps the boxes whose polygon is unusable. ``kwargs`` go to
    :func:`get_dataset` (e.g. ``root``, ``with_masks``)."""
    if train is None:
        train = split == "train"
    if model is not None and "with_masks" not in kwargs:
        from onestage.modeling import MODELS

        if model in MODELS:
            kwargs["with_masks"] = bool(MODELS[model][1].needs_masks)
    if train:
        sizes = dict(min_size=train_cfg.min_size, max_size=train_cfg.max_size, flip_prob=train_cfg.flip_prob,
                     skip_empty=True)
    else:
        sizes = dict(min_size=(train_cfg.test_min_size,), max_size=train_cfg.test_max_size, flip_prob=0.0,
                     skip_empty=False)
    return get_dataset(spec, split, train=train, **{**sizes, **kwargs})


def datasets_for_config(spec: str, train_cfg, model: Optional[str] = None, **kwargs):
    """``(train, val)`` datasets of ``spec`` for ``train_cfg`` (:func:`dataset_for_config` of each split)."""
    return (dataset_for_config(spec, "train", train_cfg, model=model, **kwargs),
            dataset_for_config(spec, "val", train_cfg, model=model, **kwargs))


def get_dataset(
    spec: str,
    split: str = "train",
    train: Optional[bool] = None,
    min_size: Sequence[int] | int | None = (800,),
    max_size: Optional[int] = 1333,
    with_masks: bool = True,
    root=None,
    flip_prob: float = 0.5,
    skip_empty: bool = False,
    **generate_kwargs,
):
    """A :class:`CocoDataset` for ``spec`` (see :data:`SPECS`) and ``split`` (``"train"`` or ``"val"``).

    * ``synthetic`` / ``synthetic-crowded``: generated once under ``root`` (default
      :func:`default_data_root`, i.e. the checkout's ``data/generated``) in ``synthetic`` / ``synthetic-crowded``,
      or under ``DIR`` with ``synthetic:DIR``. Without ``num_train`` / ``num_val`` / ``image_size`` / ``seed``
      in ``generate_kwargs``, a complete dataset already in the folder is used whatever its parameters (so
      ``python -m onestage data synthetic --num-train 500`` followed by training on it just works), and a missing
      one is generated with the defaults (2000 / 200 / 320 px / seed 0). With them, ``generate_kwargs`` go to
      :func:`ensure_synthetic`, which regenerates the folder if it was made with other parameters.
    * ``coco:ANN.json:IMAGES_DIR``: any COCO-format dataset on disk (``split`` is ignored).
    * ``nuclei``: DSB-2018 tiles (128 px; 14 train tiles, 2 val tiles), written under ``root/nuclei``.
    * ``voc``: the one VOC photo (train and val are the same image), written under ``root/voc``.

    ``train`` defaults to ``split == "train"`` and switches on multi-scale resizing and flips. Pass the preset's
    sizes: ``min_size=cfg.min_size, max_size=cfg.max_size`` for training, ``(cfg.test_min_size,)`` and
    ``cfg.test_max_size`` for evaluation.
    """
    from onestage.data.coco import CocoDataset

    if train is None:
        train = split == "train"
    kind, _, arg = spec.partition(":")
    base = Path(root) if root is not None else None

    if kind == "coco":
        ann, sep, images = arg.partition(":")
        if not ann or not sep or not images:
            raise ValueError(f"coco spec must be 'coco:ANN.json:IMAGES_DIR', got {spec!r}")
        if generate_kwargs:
            raise TypeError(f"unexpected options for a coco spec: {sorted(generate_kwargs)}")
        ann_file, image_dir = ann, images
    else:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if kind in ("synthetic", "synthetic-crowded"):
            from onestage.data.synthetic import default_data_root, ensure_synthetic

            from onestage.data._cache import is_complete, split_paths

            folder = Path(arg) if arg else (base or default_data_root()) / kind
            shape_params = {"num_train", "num_val", "image_size", "seed"} & set(generate_kwargs)
            if not shape_params and is_complete(folder):
                paths = split_paths(folder)  # no parameters asked for: use whatever complete build is there
            else:
                paths = ensure_synthetic(folder, crowded=kind == "synthetic-crowded", **generate_kwargs)
        elif kind in ("nuclei", "voc") and not arg:
            if generate_kwargs:
                raise TypeError(f"unexpected options for {kind!r}: {sorted(generate_kwargs)}")
            from onestage.data import real
            from onestage.data.synthetic import default_data_root

            folder = (base or default_data_root()) / kind
            paths = real.ensure_nuclei(folder) if kind == "nuclei" else real.ensure_voc(folder)
        else:
            raise ValueError(f"unknown dataset spec {spec!r}; expected one of {', '.join(SPECS)}")
        ann_file, image_dir = paths[f"{split}_ann"], paths[f"{split}_images"]

    return CocoDataset(
        ann_file,
        image_dir,
        train=train,
        min_size=min_size,
        max_size=max_size,
        flip_prob=flip_prob,
        with_masks=with_masks,
        skip_empty=skip_empty,
    )

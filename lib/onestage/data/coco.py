"""COCO-format dataset (pycocotools) producing the images and targets of ``docs/ARCHITECTURE.md``.

One reader for every data source of the suite (synthetic shapes, nuclei tiles, the VOC photo, real COCO): they are
all written as COCO JSON, so training and COCOeval see exactly the same ground truth.

Bad input never produces a silently wrong target. It either raises with the file / annotation id in the message,
or is skipped (or repaired) and *counted* in ``dataset.skipped`` with a logged warning:

=============================  ==========================================================================
input                          handling
=============================  ==========================================================================
missing / unreadable JSON      ``FileNotFoundError`` / ``ValueError`` naming the file
category id not declared       ``ValueError`` at construction (annotation id, category id, file)
annotation without ``bbox``    ``ValueError`` at construction
box partly outside the image   clipped to the image; ``skipped["box_clipped"]`` (the annotation is kept)
zero-area / degenerate box     dropped; ``skipped["degenerate_box"]`` (also after clipping)
empty segmentation             dropped when masks are requested; ``skipped["empty_segmentation"]``
                               (no polygon with ≥ 3 points, empty RLE, or a mask that decodes to 0 pixels)
``iscrowd=1``                  excluded from training targets, counted in ``skipped["crowd"]`` (not warned:
                               COCO's convention; the GT JSON keeps them and COCOeval ignores matches to them)
missing image file             ``FileNotFoundError`` with the path, when the image is loaded
image size ≠ JSON size         ``ValueError`` naming the file (annotations would not line up)
RLE size ≠ image size          ``ValueError`` naming the annotation
=============================  ==========================================================================

The last three are found when an image loads, which in a training run may be hours in. :meth:`CocoDataset.check_files`
finds them all up front (every file exists and opens, its header size is the JSON's, every RLE has the image's size;
headers only, no image is decoded), and :meth:`CocoDataset.drop_images` removes the bad ones; training does both
before its first iteration (:func:`onestage.engine.train.train`, ``TrainConfig.skip_bad_images``).

Counts are per annotation (an annotation seen again in a later epoch is not counted twice). Problems found while
decoding masks are counted by the process that loads the image — a ``DataLoader`` worker's counts stay in that
worker; the construction-time checks (all but "decodes to an empty mask") are always in the main process.

Image modes: everything becomes RGB float in [0, 1]. 8-bit modes (L, LA, P, PA, RGBA, CMYK, 1, ...) go through
Pillow's ``convert("RGB")`` — alpha is dropped, not composited (as ``torchvision.io.read_image(mode=RGB)`` does).
16-bit grayscale (``I;16*``, and ``I`` holding values ≤ 65535, which is how Pillow opens 16-bit PNG/TIFF) is
divided by **65535**, the full range, not by the image maximum: intensities then mean the same in every image,
which is what a detector should learn from (normalise low-dynamic-range microscopy yourself before writing it,
as :func:`onestage.data.real.nuclei_coco` does). Other modes (float ``F``, 32-bit values > 65535) raise.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

__all__ = ["CocoDataset", "collate_fn", "pad_collate", "load_image", "ImageReadError", "resized_size", "FileProblem",
           "DatasetFilesError"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
class ImageReadError(OSError):
    """An image file that exists but cannot be decoded (truncated, not an image, unknown format); names the file."""


@dataclass(frozen=True)
class FileProblem:
    """One image of a COCO file that cannot be used as written: ``reason`` says why, in words."""

    image_id: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} (image id {self.image_id}): {self.reason}"


class DatasetFilesError(ValueError):
    """Images of an annotation file are missing, unreadable or of another size than the file says; lists them all."""

    def __init__(self, ann_file: str, problems: Sequence[FileProblem], hint: str = "", shown: int = 20):
        self.ann_file, self.problems = ann_file, list(problems)
        lines = [f"  {p}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"  ... and {len(self.problems) - shown} more")
        super().__init__(f"{ann_file}: {len(self.problems)} image(s) cannot be used{hint}:\n" + "\n".join(lines))


def load_image(path: str) -> Tensor:
    """Read an image file as a ``3×H×W`` float tensor in [0, 1], RGB (see the module docstring for the modes).

    A missing file raises ``FileNotFoundError``; a file Pillow cannot decode (truncated PNG/JPEG, not an image)
    raises :class:`ImageReadError` naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return _decode_image(path)
    except (OSError, SyntaxError) as e:  # Pillow: truncated or unidentified file (OSError), broken header (SyntaxError)
        raise ImageReadError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e


def _decode_image(path: str) -> Tensor:
    with Image.open(path) as im:
        mode = im.mode
        if mode.startswith("I;16") or mode == "I":
            arr = np.asarray(im).astype(np.float32)
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise ValueError(f"{path}: 32-bit integer image with values outside 0..65535 is not supported")
            arr = arr / 65535.0
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        if mode == "F":
            raise ValueError(f"{path}: floating-point images (mode F) are not supported: their range is unknown")
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


def resized_size(h: int, w: int, min_size: Optional[int], max_size: Optional[int]) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge``: shorter side → ``min_size``, longer side capped at ``max_size``.

    The aspect ratio is kept (up to rounding to whole pixels). ``min_size=None`` keeps the original size.
    """
    if not min_size:
        return h, w
    scale = min_size / min(h, w)
    if max_size and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def _nearest_resize(masks: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize of ``N×H×W`` masks by index gathering (exact, stays uint8, no float copy)."""
    n, h, w = masks.shape
    if (h, w) == (out_h, out_w):
        return masks
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return masks[:, rows][:, :, cols]


def _valid_polygons(segm) -> list:
    """The polygon parts with at least 3 points (6 numbers); fewer have no area and pycocotools rejects them."""
    return [p for p in segm if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]


def _segmentation_is_empty(segm) -> bool:
    if segm is None:
        return True
    if isinstance(segm, list):
        return len(_valid_polygons(segm)) == 0
    if isinstance(segm, dict):
        counts = segm.get("counts")
        return counts is None or len(counts) == 0 or "size" not in segm
    return True


def collate_fn(batch):
    """``[(image, target), ...]`` → ``(list[Tensor], list[dict])``: the model pads the images itself."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def pad_collate(batch, size_divisibility: int = 32):
    """Like :func:`collate_fn` but returns one padded ``B×3×Hp×Wp`` tensor (``onestage.structures.pad_images``).

    Returns ``(images, targets)``; each target's ``size`` is the un-padded ``(h, w)``. Masks are not padded.
    """
    from onestage.structures import pad_images

    images, targets = collate_fn(batch)
    padded, _ = pad_images(images, size_divisibility=size_divisibility)
    return padded, targets


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------
class CocoDataset(torch.utils.data.Dataset):
    """Images and targets of a COCO-format annotation file.

    ``train=True`` picks the short side at random from ``min_size`` (multi-scale training) and flips horizontally
    with probability ``flip_prob``; ``train=False`` uses ``min_size[0]`` and never flips. Randomness uses torch's
    generator, which ``DataLoader`` seeds per worker. Labels are contiguous ``0..C-1`` in sorted category-id order
    (``label_to_cat_id[label]`` maps back for COCOeval).

    ``skip_empty=True`` drops images without any usable (non-crowd, non-degenerate) annotation — for training,
    where such images only add background; keep them for evaluation.
    """

    def __init__(
        self,
        ann_file,
        image_dir,
        train: bool = False,
        min_size: Sequence[int] | int | None = (800,),
        max_size: Optional[int] = 1333,
        flip_prob: float = 0.5,
        with_masks: bool = True,
        skip_empty: bool = False,
    ):
        self.ann_file = str(ann_file)
        self.image_dir = str(image_dir)
        self.train = bool(train)
        if isinstance(min_size, int):
            min_size = (min_size,)
        self.min_size = tuple(min_size) if min_size else None
        self.max_size = max_size
        self.flip_prob = float(flip_prob)
        self.with_masks = bool(with_masks)
        self.skipped: Counter = Counter()
        self._counted: set = set()

        self.coco = self._load_coco(self.ann_file)
        cats = self.coco.dataset.get("categories")
        if not cats:
            raise ValueError(f"{self.ann_file}: no 'categories' declared")
        self.cat_ids = sorted(int(c["id"]) for c in cats)
        self.cat_id_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = list(self.cat_ids)
        self.class_names = [self.coco.cats[cid]["name"] for cid in self.cat_ids]
        self.num_classes = len(self.cat_ids)

        self._anns = self._prepare_annotations()
        ids = sorted(self.coco.imgs)
        if skip_empty:
            ids = [i for i in ids if self._anns[i]]
        self.ids = ids

    # -- construction --------------------------------------------------------------------------------------------
    @staticmethod
    def _load_coco(ann_file: str) -> COCO:
        """Parse the JSON ourselves (clear errors naming the file), then index it with pycocotools quietly."""
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"annotation file not found: {ann_file}")
        try:
            with open(ann_file) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{ann_file}: invalid JSON ({e})") from e
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{ann_file}: not a COCO annotation file (needs an object with 'images')")
        data.setdefault("annotations", [])
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

    def _count(self, reason: str, ann_id, message: str) -> None:
        """Count a skipped/repaired annotation once (not once per epoch) and log it."""
        if (reason, ann_id) in self._counted:
            return
        self._counted.add((reason, ann_id))
        self.skipped[reason] += 1
        if reason != "crowd":
            logger.warning("%s: annotation %s: %s", self.ann_file, ann_id, message)

    def _prepare_annotations(self) -> dict:
        """Validate every annotation once; keep, per image, ``(ann_id, label, xyxy box, segmentation)``."""
        prepared = {img_id: [] for img_id in self.coco.imgs}
        for ann in self.coco.dataset["annotations"]:
            ann_id = ann.get("id")
            cat_id = ann.get("category_id")
            if cat_id not in self.cat_id_to_label:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann_id} has category_id {cat_id!r}, "
                    f"which is not among the declared categories {self.cat_ids}"
                )
            img_id = ann.get("image_id")
            if img_id not in self.coco.imgs:
                raise ValueError(f"{self.ann_file}: annotation {ann_id} refers to unknown image_id {img_id!r}")
            if ann.get("iscrowd", 0):
                self._count("crowd", ann_id, "crowd region, excluded from training targets")
                continue
            if "bbox" not in ann or len(ann["bbox"]) != 4:
                raise ValueError(f"{self.ann_file}: annotation {ann_id} has no valid 'bbox' [x, y, w, h]")
            x, y, w, h = (float(v) for v in ann["bbox"])
            info = self.coco.imgs[img_id]
            W, H = float(info["width"]), float(info["height"])
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                self._count("degenerate_box", ann_id, f"degenerate box {ann['bbox']}, skipped")
                continue
            x0, y0, x1, y1 = x, y, x + w, y + h
            cx0, cy0, cx1, cy1 = min(max(x0, 0.0), W), min(max(y0, 0.0), H), min(max(x1, 0.0), W), min(max(y1, 0.0), H)
            if cx1 <= cx0 or cy1 <= cy0:
                self._count("degenerate_box", ann_id, f"box {ann['bbox']} lies outside the {W:g}x{H:g} image, skipped")
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                self._count("box_clipped", ann_id, f"box {ann['bbox']} extends outside the {W:g}x{H:g} image, clipped")
            segm = ann.get("segmentation")
            if self.with_masks and _segmentation_is_empty(segm):
                self._count("empty_segmentation", ann_id, "empty segmentation, skipped (masks were requested)")
                continue
            prepared[img_id].append((ann_id, self.cat_id_to_label[cat_id], (cx0, cy0, cx1, cy1), segm))
        return prepared

    # -- checks before a long run --------------------------------------------------------------------------------
    def check_files(self) -> list[FileProblem]:
        """Every problem that would stop :meth:`__getitem__` on a file, found without decoding any image: a missing
        or unopenable file, a header size other than the JSON's ``width`` × ``height``, an RLE whose ``size`` is not
        the image's. One entry per bad image (its first problem), in image-id order."""
        problems = []
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            path = os.path.join(self.image_dir, info["file_name"])
            reason = None
            if not os.path.isfile(path):
                reason = "file not found"
            else:
                try:
                    with Image.open(path) as im:  # reads the header only
                        w, h = im.size
                except (OSError, SyntaxError) as e:
                    reason = f"cannot open the image ({type(e).__name__}: {e})"
                else:
                    if (h, w) != (int(info["height"]), int(info["width"])):
                        reason = f"image is {w}x{h} but the annotation file says {info['width']}x{info['height']}"
            if reason is None and self.with_masks:
                for ann_id, _, _, segm in self._anns[img_id]:
                    if isinstance(segm, dict) and [int(v) for v in segm.get("size", ())] != [h, w]:
                        reason = f"annotation {ann_id}: RLE size {segm.get('size')} != image size {[h, w]}"
                        break
            if reason is not None:
                problems.append(FileProblem(int(img_id), path, reason))
        return problems

    def drop_images(self, image_ids) -> None:
        """Leave the images ``image_ids`` out of this dataset (``len`` and indices change; the JSON is untouched)."""
        drop = {int(i) for i in image_ids}
        before = len(self.ids)
        self.ids = [i for i in self.ids if int(i) not in drop]
        self.skipped["bad_image"] += before - len(self.ids)

    # -- access --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[self.ids[index]]["file_name"])

    def _decode(self, ann_id, segm, h: int, w: int) -> np.ndarray:
        """One annotation's mask (H×W uint8) from polygons, uncompressed RLE or compressed RLE."""
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(_valid_polygons(segm), h, w))
        else:
            if [int(s) for s in segm["size"]] != [h, w]:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann_id}: RLE size {segm['size']} != image size {[h, w]}"
                )
            rle = mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
        return mask_utils.decode(rle)

    def __getitem__(self, index: int):
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        path = self.image_path(index)
        image = load_image(path)
        h, w = int(image.shape[1]), int(image.shape[2])
        if (h, w) != (int(info["height"]), int(info["width"])):
            raise ValueError(
                f"{path}: image is {w}x{h} but {self.ann_file} says {info['width']}x{info['height']} (image id {img_id})"
            )

        anns = self._anns[img_id]
        boxes = [a[2] for a in anns]
        labels = [a[1] for a in anns]
        masks = None
        if self.with_masks:
            decoded, keep = [], []
            for i, (ann_id, _, _, segm) in enumerate(anns):
                m = self._decode(ann_id, segm, h, w)
                if not m.any():
                    self._count("empty_segmentation", ann_id, "segmentation decodes to an empty mask, skipped")
                    continue
                decoded.append(m)
                keep.append(i)
            boxes = [boxes[i] for i in keep]
            labels = [labels[i] for i in keep]
            masks = np.stack(decoded) if decoded else np.zeros((0, h, w), dtype=np.uint8)

        # resize
        if self.min_size:
            short = self.min_size[int(torch.randint(len(self.min_size), ()))] if self.train else self.min_size[0]
        else:
            short = None
        nh, nw = resized_size(h, w, short, self.max_size)
        boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if (nh, nw) != (h, w):
            image = torch.nn.functional.interpolate(
                image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
            )[0].clamp_(0, 1)
            boxes_t = boxes_t * torch.tensor([nw / w, nh / h, nw / w, nh / h])
            if masks is not None:
                masks = _nearest_resize(masks, nh, nw)

        # horizontal flip
        if self.train and self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob:
            image = image.flip(-1)
            boxes_t = torch.stack([nw - boxes_t[:, 2], boxes_t[:, 1], nw - boxes_t[:, 0], boxes_t[:, 3]], dim=1)
            if masks is not None:
                masks = masks[:, :, ::-1]

        target = {
            "boxes": boxes_t,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(img_id),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([nh, nw], dtype=torch.int64),
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
        return image, target

    def __repr__(self) -> str:
        return (
            f"CocoDataset({self.ann_file!r}, images={len(self)}, classes={self.num_classes}, train={self.train}, "
            f"min_size={self.min_size}, max_size={self.max_size}, skipped={dict(self.skipped)})"
        )

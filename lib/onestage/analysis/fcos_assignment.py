"""How FCOS labels locations, measured over a dataset: ambiguous samples and best possible recall (BPR).

FCOS paper (arXiv 1904.01355) §3.2 and §4.1.1 argue that two worries about anchor-free detection go away once FPN
levels split objects by size:

* **ambiguity** — a location inside several ground-truth boxes cannot regress all of them. Table 2 reports the share
  of positive locations that fall in more than one box ("ambiguous samples"), and the share that fall in boxes of
  *different classes* (only those can hurt classification), without and with FPN.
* **recall** — a box that no location is assigned to can never be detected. Table 1 reports the best possible recall
  (BPR: the share of ground-truth boxes assigned to at least one location — or anchor — in training) of FCOS without
  FPN, with FPN, and of the anchor-based RetinaNet under several low-quality-matching rules.

Everything here needs only boxes, labels and image sizes, so it runs on any COCO annotation file without images:
point it at COCO's ``instances_val2017.json`` / ``instances_train2017.json`` to compare with the paper's numbers.
Boxes are rescaled as the detector would see them (short side 800, long side ≤ 1333 in the paper).

The rules are FCOS's own (``onestage.modeling.fcos.location_candidates``), so the statistics describe exactly what
training assigns. "Without FPN" follows the paper's Table 1/2 setting: one feature map at stride 16 (P4) that takes
every object (sizes of interest disabled), no center sampling.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from onestage.modeling.fcos import location_candidates

INF = float("inf")


@dataclass(frozen=True)
class AssignmentSetting:
    """One row of the statistics table: which levels, which size ranges, center sampling or not."""

    name: str
    strides: tuple = (8, 16, 32, 64, 128)
    sizes_of_interest: Optional[tuple] = (64, 128, 256, 512)  # None: every level takes every size
    center_sampling: bool = False
    center_sampling_radius: float = 1.5


# The rows of FCOS Tables 1 and 2 (+ center sampling, the AdelaiDet default that came after the paper's tables).
FCOS_SETTINGS = (
    AssignmentSetting("FCOS w/o FPN (P4 only)", strides=(16,), sizes_of_interest=None),
    AssignmentSetting("FCOS w/ FPN"),
    AssignmentSetting("FCOS w/ FPN + center sampling", center_sampling=True),
)


@dataclass(frozen=True)
class AnchorSetting:
    """RetinaNet's anchors (Lin et al. 2017, §4): 3 scales × 3 aspect ratios per location, base size 4·stride
    (32..512 on P3..P7), positive at IoU ≥ 0.5. ``low_quality``: None (no extra matches), a float t (each box also
    takes its best anchors when their IoU ≥ t, the "≥ 0.4" row of FCOS Table 1) or 0.0 (always, the "All" row)."""

    name: str
    strides: tuple = (8, 16, 32, 64, 128)
    scales: tuple = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    base_size_per_stride: float = 4.0
    pos_iou: float = 0.5
    low_quality: Optional[float] = None


ANCHOR_SETTINGS = (
    AnchorSetting("RetinaNet anchors (IoU ≥ 0.5)"),
    AnchorSetting("RetinaNet anchors + low-quality ≥ 0.4", low_quality=0.4),
    AnchorSetting("RetinaNet anchors + all low-quality", low_quality=0.0),
)


def feature_size(image_size: int, stride: int) -> int:
    """Cells along one side of a level for an image padded to a multiple of 32 (stride-2 3×3 convs beyond)."""
    padded = int(math.ceil(image_size / 32) * 32)
    size = padded // min(stride, 32)
    s = min(stride, 32)
    while s < stride:  # P6, P7: 3×3 stride-2 convs with padding 1
        size = (size + 1) // 2
        s *= 2
    return size


def level_locations(height: int, width: int, strides: Sequence[int]) -> list[Tensor]:
    """Per-level ``Li×2`` (x, y) locations ``k·s + s//2`` over the padded feature maps (FCOS's
    ``compute_locations``)."""
    out = []
    for s in strides:
        h, w = feature_size(height, s), feature_size(width, s)
        ys, xs = torch.meshgrid(torch.arange(h) * s + s // 2, torch.arange(w) * s + s // 2, indexing="ij")
        out.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float())
    return out


@dataclass
class AssignmentCounts:
    """Running totals for one setting; ``summary()`` turns them into the paper's percentages."""

    name: str
    images: int = 0
    boxes: int = 0
    recalled_boxes: int = 0
    positives: int = 0
    ambiguous: int = 0
    ambiguous_diff_class: int = 0

    def add(self, other: "AssignmentCounts") -> None:
        for f in ("images", "boxes", "recalled_boxes", "positives", "ambiguous", "ambiguous_diff_class"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def summary(self) -> dict:
        pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
        return {
            "setting": self.name,
            "images": self.images,
            "boxes": self.boxes,
            "BPR": pct(self.recalled_boxes, self.boxes),
            "ambiguous": pct(self.ambiguous, self.positives),
            "ambiguous_diff_class": pct(self.ambiguous_diff_class, self.positives),
            "positives_per_box": self.positives / self.boxes if self.boxes else float("nan"),
        }


def fcos_image_counts(boxes: Tensor, labels: Tensor, height: int, width: int,
                      setting: AssignmentSetting) -> AssignmentCounts:
    """Counts for one image: positives (locations that are candidates of ≥ 1 box), ambiguous ones (≥ 2 boxes; of
    ≥ 2 classes), and boxes that keep ≥ 1 location after the min-area rule resolves ambiguity."""
    counts = AssignmentCounts(setting.name, images=1, boxes=int(boxes.shape[0]))
    if boxes.shape[0] == 0:
        return counts
    locations = level_locations(height, width, setting.strides)
    candidates = []
    for lvl, (locs, s) in enumerate(zip(locations, setting.strides)):
        if setting.sizes_of_interest is None:
            lo, hi = -1.0, INF
        else:
            bounds = [-1.0, *map(float, setting.sizes_of_interest), INF]
            lo, hi = bounds[lvl], bounds[lvl + 1]
        _, cand = location_candidates(locs, boxes, float(s), lo, hi, setting.center_sampling,
                                      setting.center_sampling_radius)
        candidates.append(cand)
    cand = torch.cat(candidates)  # L×M
    per_loc = cand.sum(dim=1)
    counts.positives = int((per_loc > 0).sum())
    counts.ambiguous = int((per_loc > 1).sum())
    # different classes among a location's candidates: some candidate's label differs from the smallest label there
    big = int(labels.max()) + 1 if labels.numel() else 1
    lab = labels.view(1, -1).expand_as(cand)
    min_lab = torch.where(cand, lab, big).min(dim=1).values
    max_lab = torch.where(cand, lab, -1).max(dim=1).values
    counts.ambiguous_diff_class = int(((per_loc > 1) & (min_lab != max_lab)).sum())
    # the min-area rule picks one box per positive location; a box is recalled if it wins somewhere
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).view(1, -1).expand_as(cand)
    winner = torch.where(cand, area, INF).argmin(dim=1)[per_loc > 0]
    counts.recalled_boxes = int(torch.unique(winner).numel())
    return counts


def anchors_for_image(height: int, width: int, setting: AnchorSetting) -> Tensor:
    """All RetinaNet anchors (xyxy) centred on the same locations FCOS uses."""
    out = []
    for locs, s in zip(level_locations(height, width, setting.strides), setting.strides):
        base = setting.base_size_per_stride * s
        shapes = []
        for scale in setting.scales:
            for ratio in setting.aspect_ratios:  # ratio = h / w, area kept at (base·scale)²
                w = base * scale / math.sqrt(ratio)
                h = base * scale * math.sqrt(ratio)
                shapes.append((w, h))
        wh = torch.tensor(shapes)  # A×2
        centres = locs[:, None, :]  # L×1×2
        half = wh[None] / 2
        out.append(torch.cat([centres - half, centres + half], dim=2).reshape(-1, 4))
    return torch.cat(out)


def anchor_image_counts(boxes: Tensor, height: int, width: int, setting: AnchorSetting,
                        anchors: Optional[Tensor] = None) -> AssignmentCounts:
    """BPR of anchor matching on one image (ambiguity is not defined the same way for anchors and is left 0)."""
    counts = AssignmentCounts(setting.name, images=1, boxes=int(boxes.shape[0]))
    if boxes.shape[0] == 0:
        return counts
    anchors = anchors if anchors is not None else anchors_for_image(height, width, setting)
    iou = box_iou(boxes, anchors)  # M×A
    matched = (iou >= setting.pos_iou).any(dim=1)
    if setting.low_quality is not None:
        best = iou.max(dim=1).values
        # d2/torchvision "allow_low_quality_matches": the best anchor(s) of a box become positives of it
        matched |= (best > 0) & (best >= setting.low_quality)
    counts.recalled_boxes = int(matched.sum())
    counts.positives = int((iou >= setting.pos_iou).any(dim=0).sum())
    return counts


def resize_scale(height: int, width: int, min_size: Optional[int], max_size: Optional[int]) -> float:
    """The detector's test-time resize factor (short side → ``min_size``, long side capped at ``max_size``)."""
    if not min_size:
        return 1.0
    scale = min_size / min(height, width)
    if max_size and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return scale


def iter_coco_boxes(ann_file, min_size: Optional[int] = 800, max_size: Optional[int] = 1333,
                    max_images: Optional[int] = None) -> Iterator[tuple]:
    """Yield ``(boxes xyxy, labels, height, width)`` per image of a COCO annotation file, resized as the detector
    sees them. Crowd regions and boxes of zero size are skipped (they are never training targets)."""
    data = json.loads(Path(ann_file).read_text())
    cat_ids = sorted(c["id"] for c in data.get("categories", []))
    cat_to_label = {c: i for i, c in enumerate(cat_ids)}
    per_image: dict[int, list] = {img["id"]: [] for img in data["images"]}
    for ann in data.get("annotations", []):
        if ann.get("iscrowd", 0) or ann["image_id"] not in per_image:
            continue
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        per_image[ann["image_id"]].append((x, y, x + w, y + h, cat_to_label[ann["category_id"]]))
    for n, img in enumerate(data["images"]):
        if max_images is not None and n >= max_images:
            break
        scale = resize_scale(img["height"], img["width"], min_size, max_size)
        height, width = round(img["height"] * scale), round(img["width"] * scale)
        rows = per_image[img["id"]]
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4) * scale
        labels = torch.tensor([r[4] for r in rows], dtype=torch.long)
        yield boxes, labels, height, width


def assignment_statistics(samples: Iterable[tuple], fcos_settings: Sequence[AssignmentSetting] = FCOS_SETTINGS,
                          anchor_settings: Sequence[AnchorSetting] = ANCHOR_SETTINGS,
                          progress: bool = False) -> list[dict]:
    """Accumulate the statistics of every setting over ``samples`` (``(boxes, labels, height, width)`` tuples, e.g.
    from :func:`iter_coco_boxes`) and return one summary dict per setting."""
    totals = {s.name: AssignmentCounts(s.name) for s in (*fcos_settings, *anchor_settings)}
    iterator = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="assignment statistics", unit="img")
    for boxes, labels, height, width in iterator:
        for s in fcos_settings:
            totals[s.name].add(fcos_image_counts(boxes, labels, height, width, s))
        anchors_cache: dict = {}
        for s in anchor_settings:
            key = (s.strides, s.scales, s.aspect_ratios, s.base_size_per_stride)
            if key not in anchors_cache:
                anchors_cache[key] = anchors_for_image(height, width, s)
            totals[s.name].add(anchor_image_counts(boxes, height, width, s, anchors_cache[key]))
    rows = []
    for name, c in totals.items():
        row = c.summary()
        if name in {s.name for s in anchor_settings}:
            row["ambiguous"] = row["ambiguous_diff_class"] = float("nan")
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict], published: Optional[dict] = None) -> str:
    """Markdown table of :func:`assignment_statistics` rows, with the paper's numbers beside them when given
    (``published``: setting name → {"BPR": .., "ambiguous": .., "ambiguous_diff_class": ..})."""
    published = published or {}
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = ["| setting | BPR % | paper | ambiguous % | paper | amb. diff. class % | paper |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = published.get(r["setting"], {})
        lines.append(f"| {r['setting']} | {fmt(r['BPR'])} | {fmt(p.get('BPR'))} | {fmt(r['ambiguous'])} | "
                     f"{fmt(p.get('ambiguous'))} | {fmt(r['ambiguous_diff_class'])} | "
                     f"{fmt(p.get('ambiguous_diff_class'))} |")
    return "\n".join(lines)


def with_setting(setting: AssignmentSetting, **changes) -> AssignmentSetting:
    """A copy of ``setting`` with some fields changed (for the notebook's sliders)."""
    return dataclasses.replace(setting, **changes)


# Rows of data/paper_tables/fcos_ambiguity_bpr.json → the setting that measures them.
PAPER_TABLE_ROWS = {
    "fcos_P4_only": FCOS_SETTINGS[0],
    "fcos_fpn": FCOS_SETTINGS[1],
    "fcos_fpn_center_sampling": FCOS_SETTINGS[2],
    "retinanet_lq_none": ANCHOR_SETTINGS[0],
    "retinanet_lq_0.4": ANCHOR_SETTINGS[1],
    "retinanet_lq_all": ANCHOR_SETTINGS[2],
}


def annotation_file_for(data: str) -> Path:
    """The annotation JSON behind a dataset spec: ``synthetic`` (its train split, generated if missing),
    ``coco:ANN.json[:IMAGES]`` or a path to a JSON file. The statistics need boxes only, never images."""
    if data.startswith("coco:"):
        return Path(data.split(":")[1])
    if data.endswith(".json"):
        return Path(data)
    if data.split(":")[0] in ("synthetic", "synthetic-crowded"):
        from onestage.data import get_dataset

        return Path(get_dataset(data, split="train").ann_file)
    raise ValueError(f"cannot take assignment statistics of {data!r}: give synthetic, coco:ANN.json or a .json path")

"""A toy detector and dataset that obey the model/data contracts of docs/ARCHITECTURE.md at almost no cost.

They exist so the engine (train loop, resume, DDP, checkpoints, evaluation) can be exercised and taught in seconds,
independently of the real models: the toy model has the same interface as FCOS (``.cfg`` dataclass, ``.name``,
``.num_classes``; train mode returns a dict of weighted losses, eval mode returns boxes/scores/labels), and the toy
dataset returns ``(image, target)`` pairs with the same keys as ``CocoDataset``, including a random horizontal flip
so that augmentation randomness is part of what resume has to reproduce.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from onestage.structures import pad_images


@dataclass
class ToyConfig:
    width: int = 4
    size_divisibility: int = 8
    loss_scale: float = 1.0  # multiply the losses (a huge value, or nan, drives the non-finite loss error path)


class ToyDetector(nn.Module):
    """One conv + pooled linear heads: predicts one box and class scores per image."""

    def __init__(self, cfg: ToyConfig, num_classes: int = 2):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.name = "toy"
        self.conv = nn.Conv2d(3, cfg.width, 3, padding=1)
        self.cls = nn.Linear(cfg.width, num_classes)
        self.box = nn.Linear(cfg.width, 4)

    def forward(self, images, targets=None):
        batch, sizes = pad_images(images, self.cfg.size_divisibility)
        feat = torch.relu(self.conv(batch)).mean(dim=(2, 3))
        logits = self.cls(feat)
        hw = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=feat.dtype, device=feat.device)
        boxes = torch.sigmoid(self.box(feat)) * hw
        if self.training:
            labels = torch.stack([t["labels"][0] for t in targets])
            gt = torch.stack([t["boxes"][0] for t in targets])
            return {
                "loss_cls": nn.functional.cross_entropy(logits, labels) * self.cfg.loss_scale,
                "loss_box": nn.functional.l1_loss(boxes / hw, gt / hw) * self.cfg.loss_scale,
            }
        scores, labels = logits.softmax(-1).max(-1)
        return [
            {"boxes": boxes[i : i + 1], "scores": scores[i : i + 1], "labels": labels[i : i + 1]}
            for i in range(len(images))
        ]


class ToyDataset(torch.utils.data.Dataset):
    """``n`` small random images, each with one box; a seeded, index-determined content plus a random flip."""

    def __init__(self, n: int = 12, size: int = 16, num_classes: int = 2, seed: int = 0, flip_prob: float = 0.5):
        self.n, self.size, self.num_classes, self.seed, self.flip_prob = n, size, num_classes, seed, flip_prob
        self.class_names = [f"class{i}" for i in range(num_classes)]

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(self.seed * 100_003 + idx)
        s = self.size
        image = torch.rand(3, s, s, generator=g)
        x0, y0 = torch.randint(0, s // 2, (2,), generator=g).tolist()
        box = torch.tensor([[x0, y0, x0 + s // 2, y0 + s // 2]], dtype=torch.float32)
        label = torch.tensor([idx % self.num_classes])
        if random.random() < self.flip_prob:  # global RNG on purpose: the engine must make this reproducible
            image = image.flip(-1)
            box = torch.stack([s - box[:, 2], box[:, 1], s - box[:, 0], box[:, 3]], dim=1)
        target = {"boxes": box, "labels": label, "image_id": idx + 1, "orig_size": (s, s), "size": (s, s)}
        return image, target

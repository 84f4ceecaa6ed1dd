"""SOLO, Decoupled SOLO and SOLOv2: grid assignment by hand, CoordConv channels, the decoupled product, Matrix NMS by
hand and against a direct O(n²) loop, the memory argument, and train/eval steps of all three models."""
import dataclasses
import math

import pytest
import torch

from onestage.modeling.solo import (
    DecoupledSOLO,
    DecoupledSOLOConfig,
    SOLO,
    SOLOConfig,
    SOLOHeadOutputs,
    _CoordTower,
    assign_levels,
    center_region_cells,
    coord_features,
    downsample_masks,
    grid_targets,
    matrix_nms,
    matrix_nms_decay,
    points_nms,
)
from onestage.modeling.solov2 import SOLOv2, SOLOv2Config, dynamic_masks
from onestage.structures import masks_to_boxes
from onestage.modeling.fast_inference import plain_inference

GRIDS = [40, 36, 24, 16, 12]
RANGES = [(1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)]


def _square(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# ------------------------------------------------------------------------------------------------ configs
def test_paper_presets_are_the_published_defaults():
    c = SOLOConfig.preset("paper")
    assert list(c.grid_numbers) == GRIDS and list(c.instance_strides) == [8, 8, 16, 32, 32]
    assert [tuple(r) for r in c.scale_ranges] == RANGES
    assert (c.sigma, c.dice_weight, c.focal_alpha, c.focal_gamma) == (0.2, 3.0, 0.25, 2.0)
    assert (c.num_convs, c.head_channels, c.coord_conv, c.head, c.nms) == (7, 256, 1, "vanilla", "matrix")
    assert (c.score_thresh, c.update_thresh, c.mask_thresh, c.nms_pre, c.detections_per_img) == (.1, .05, .5, 500, 100)
    assert (c.matrix_nms_kernel, c.matrix_nms_sigma) == ("gaussian", 2.0)
    assert c.in_features == ("p2", "p3", "p4", "p5", "p6") and c.fpn_extra_block == "maxpool"
    assert DecoupledSOLOConfig.preset("paper").head == "decoupled"
    v2 = SOLOv2Config.preset("paper")
    assert (v2.instance_channels, v2.num_instance_convs, v2.num_masks, v2.mask_channels) == (512, 4, 256, 128)
    assert list(v2.grid_numbers) == GRIDS and (v2.score_thresh, v2.update_thresh, v2.mask_thresh) == (.1, .05, .5)
    for cfg in (c, v2):  # the lead's bench overrides these two
        assert hasattr(cfg, "score_thresh") and hasattr(cfg, "detections_per_img")
    # override names of data/paper_tables/solo_*.json
    names = {f.name for f in dataclasses.fields(SOLOConfig)}
    assert {"multi_level", "grid_numbers", "coord_conv", "head", "nms"} <= names
    cpu = SOLOConfig.preset("cpu")
    assert cpu.backbone == "efficientnet_lite0" and list(cpu.grid_numbers) == GRIDS  # capacity changes, grids don't
    with pytest.raises(ValueError):
        SOLOConfig.preset("huge")


# ------------------------------------------------------------------------------------------------ targets
def test_small_object_claims_six_cells_of_level_0_by_hand():
    # a 20×20 square on a 128×128 canvas: scale sqrt(20·20) = 20 → level 0 only (1..96)
    mask = _square(128, 128, 40, 60, 60, 80)
    box = torch.tensor([60.0, 40, 80, 60])
    assert assign_levels(box[None], RANGES)[0].tolist() == [True, False, False, False, False]
    r = center_region_cells(mask, box, (128, 128), 40, 0.2)
    # mass centre (49.5, 69.5); half region σ·20/2 = 2 px; cells are 128/40 = 3.2 px
    assert r.mass_center == pytest.approx((49.5, 69.5))
    assert r.center_cell == (15, 21)          # floor(49.5/3.2), floor(69.5/3.2)
    assert (r.top, r.bottom, r.left, r.right) == (14, 16, 21, 22)  # floor(47.5/3.2)..floor(51.5/3.2), 67.5..71.5
    assert r.cells(40) == [581, 582, 621, 622, 661, 662]  # k = i·S + j


def test_large_object_trains_two_levels_and_is_clamped_to_3x3():
    mask = _square(128, 128, 0, 100, 0, 100)
    box = torch.tensor([0.0, 0, 100, 100])
    assert assign_levels(box[None], RANGES)[0].tolist() == [False, True, True, False, False]  # 100 in both ranges
    r36 = center_region_cells(mask, box, (128, 128), 36, 0.2)
    # centre cell floor(49.5·36/128) = 13; the σ region spans rows 11..16 but is clamped to 13 ± 1
    assert r36.center_cell == (13, 13) and (r36.top, r36.bottom, r36.left, r36.right) == (12, 14, 12, 14)
    r24 = center_region_cells(mask, box, (128, 128), 24, 0.2)
    assert r24.center_cell == (9, 9) and (r24.top, r24.bottom) == (8, 10)

    tgt = [dict(boxes=box[None], labels=torch.tensor([5]), masks=mask[None])]
    gt = grid_targets(tgt, (128, 128), 7, GRIDS, RANGES, 0.2, 10)
    assert [len(c) for c in gt.cells] == [0, 9, 9, 0, 0]
    assert sorted(gt.cells[1].tolist()) == [i * 36 + j for i in (12, 13, 14) for j in (12, 13, 14)]
    assert (gt.labels[1][0, gt.cells[1]] == 5).all() and int((gt.labels[1] != 7).sum()) == 9
    assert int((gt.labels[0] != 7).sum()) == 0
    assert gt.gt_inds[1].tolist() == [0] * 9


def test_grid_targets_batch_indices_and_collisions():
    # two objects with the same mass centre cell on level 0 (scale 20 and 16), in the second image
    m1 = _square(64, 64, 20, 40, 20, 40)
    m2 = _square(64, 64, 22, 38, 22, 38)
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                 masks=torch.zeros(0, 64, 64, dtype=torch.uint8))
    lone = dict(boxes=torch.tensor([[0.0, 0, 10, 10]]), labels=torch.tensor([0]), masks=_square(64, 64, 0, 10, 0, 10)[None])
    img = dict(boxes=torch.tensor([[20.0, 20, 40, 40], [22, 22, 38, 38]]), labels=torch.tensor([1, 2]),
               masks=torch.stack([m1, m2]))
    last = grid_targets([lone, empty, img], (64, 64), 3, [8], [(1, 96)], 0.2, 1, pairs="last")
    both = grid_targets([lone, empty, img], (64, 64), 3, [8], [(1, 96)], 0.2, 1, pairs="all")
    # both objects: mass centre 29.5 / 8 px cells → cell (3, 3), σ region 2 px → only that cell: k = 27
    s2 = 64
    assert last.cells[0].tolist() == [0, 2 * s2 + 27]          # lone object: cell 0 of image 0
    assert last.gt_inds[0].tolist() == [0, 2]                    # the later object (global index 2) wins
    assert int(last.labels[0][2, 27]) == 2 and last.labels[0].shape == (3, 64)
    assert both.cells[0].tolist() == [0, 2 * s2 + 27, 2 * s2 + 27] and both.gt_inds[0].tolist() == [0, 1, 2]
    # min_mask_area drops the 100-px object
    assert grid_targets([lone], (64, 64), 3, [8], [(1, 96)], 0.2, 101).cells[0].numel() == 0


def test_downsample_masks_by_hand():
    m = _square(6, 6, 0, 4, 0, 4)[None]  # image 6×6 on an 8×8 canvas
    out = downsample_masks(m, (8, 8), (2, 2))
    assert out.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]


# ------------------------------------------------------------------------------------------------ CoordConv
def test_coord_features_exact():
    c = coord_features(torch.zeros(2, 4, 3, 5))
    assert c.shape == (2, 2, 3, 5)
    assert c[1, 0].tolist() == [[-1.0, -0.5, 0.0, 0.5, 1.0]] * 3          # x: across the columns
    assert c[0, 1].tolist() == [[-1.0] * 5, [0.0] * 5, [1.0] * 5]          # y: down the rows
    assert coord_features(torch.zeros(1, 1, 3, 5), "y").shape == (1, 1, 3, 5)


@pytest.mark.parametrize("coord_conv", [0, 1, 2])
def test_coord_tower_feeds_the_coordinates_to_the_first_layers(coord_conv):
    tower = _CoordTower(4, 8, 3, coord_conv, "xy", 4)
    seen = []
    for layer in tower.layers:
        layer[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    x = torch.randn(1, 4, 3, 5)
    tower(x)
    assert [s.shape[1] for s in seen] == [(4 if i == 0 else 8) + (2 if i < coord_conv else 0) for i in range(3)]
    if coord_conv:
        assert torch.equal(seen[0][:, :4], x) and torch.equal(seen[0][:, 4:], coord_features(x))
    with pytest.raises(ValueError):
        _CoordTower(4, 8, 1, 2, "xy", 4)


def test_decoupled_towers_get_one_coordinate_each():
    model = DecoupledSOLO(DecoupledSOLOConfig.preset("smoke"), num_classes=3)
    assert model.head.mask_tower_x.layers[0][0].in_channels == 32 + 1
    assert model.head.mask_tower_y.which == "y" and model.head.mask_tower_x.which == "x"
    assert [m.out_channels for m in model.head.mask_preds_x] == GRIDS


# ------------------------------------------------------------------------------------------------ decoupled
def test_decoupled_product_equals_the_vanilla_channel():
    torch.manual_seed(0)
    van = SOLO(SOLOConfig.preset("smoke"), num_classes=3)
    dec = DecoupledSOLO(DecoupledSOLOConfig.preset("smoke"), num_classes=3)
    s, h, w = 40, 6, 7
    x, y = torch.randn(2, s, h, w), torch.randn(2, s, h, w)
    # the vanilla channel k = i·S + j holding logit(σ(y_i)·σ(x_j))
    prod = torch.sigmoid(y)[:, :, None] * torch.sigmoid(x)[:, None, :]       # B×S(i)×S(j)×h×w
    vanilla_logits = torch.logit(prod.reshape(2, s * s, h, w), eps=0)
    cate = [torch.zeros(2, 3, g, g) for g in GRIDS]
    out_v = SOLOHeadOutputs(cate, [vanilla_logits] + [None] * 4, None, None)
    out_d = SOLOHeadOutputs(cate, None, [x] + [None] * 4, [y] + [None] * 4)
    cells = torch.tensor([0, 1, 5 * s + 7, s * s + 39 * s + 2, 2 * s * s - 1])  # b·S² + i·S + j
    pv, pd = van.positive_mask_probs(out_v, 0, cells), dec.positive_mask_probs(out_d, 0, cells)
    assert torch.allclose(pv, pd, atol=1e-6)
    # by hand for cell (b=0, i=5, j=7)
    assert torch.allclose(pd[2], torch.sigmoid(y[0, 5]) * torch.sigmoid(x[0, 7]))


def test_mask_branch_memory():
    from onestage.analysis.solo_memory import mask_branch_memory, mask_branch_output_shapes

    tiny = mask_branch_memory([4], [8], (32, 32))
    assert tiny["vanilla"] == 16 * 8 * 8 * 4 and tiny["decoupled"] == 8 * 8 * 8 * 4 and tiny["ratio"] == 2
    assert mask_branch_output_shapes([40], [8], (800, 1344)) == [(1600, 200, 336)]
    paper = mask_branch_memory()
    # level 0 alone: 1600 maps of 200×336 floats ≈ 430 MB per image; decoupled 80 maps
    assert paper["levels"][0]["vanilla"] == 1600 * 200 * 336 * 4
    assert paper["levels"][0]["decoupled"] == 80 * 200 * 336 * 4
    assert paper["ratio"] > 15


# ------------------------------------------------------------------------------------------------ Matrix NMS
def _f(x, kernel, sigma):
    return math.exp(-sigma * x * x) if kernel == "gaussian" else 1 - x


def _direct_matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """Matrix NMS written as loops over pairs, straight from SOLOv2 §3.3 / Algorithm 1."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: -float(scores[i]))
    sets = [set(map(tuple, masks[i].nonzero().tolist())) for i in order]
    lab = [int(labels[i]) for i in order]

    def iou(a, b):
        u = len(sets[a] | sets[b])
        return len(sets[a] & sets[b]) / u if u else 0.0

    comp = [max([iou(k, i) for k in range(i) if lab[k] == lab[i]], default=0.0) for i in range(n)]
    out = [0.0] * n
    for j in range(n):
        decay = min([1.0] + [_f(iou(i, j), kernel, sigma) / _f(comp[i], kernel, sigma)
                             for i in range(j) if lab[i] == lab[j]])
        out[order[j]] = float(scores[order[j]]) * decay
    return torch.tensor(out)


def test_matrix_nms_three_masks_by_hand():
    a = _square(12, 12, 0, 10, 0, 10)      # 100 px, score .9
    b = _square(12, 12, 0, 10, 0, 8)       # inside a: IoU 80/100 = .8, score .8 → a duplicate
    c = _square(12, 12, 10, 12, 10, 12)    # no overlap, score .7 → kept
    masks, labels = torch.stack([b, c, a]).bool(), torch.tensor([1, 1, 1])
    scores = torch.tensor([0.8, 0.7, 0.9])  # not sorted: the result comes back in input order
    out = matrix_nms(masks, labels, scores)
    assert out[2] == pytest.approx(0.9)                      # the best mask is never decayed
    assert out[0] == pytest.approx(0.8 * math.exp(-2 * 0.64), rel=1e-5)   # exp(−σ·IoU²), σ = 2 → .222
    assert out[1] == pytest.approx(0.7)
    lin = matrix_nms(masks, labels, scores, kernel="linear")
    assert lin[0] == pytest.approx(0.8 * 0.2, rel=1e-5) and lin[1] == pytest.approx(0.7)
    # a different class never decays
    assert matrix_nms(masks, torch.tensor([2, 1, 1]), scores)[0] == pytest.approx(0.8)
    iou, decay = matrix_nms_decay(masks[[2, 0, 1]], labels)
    assert iou[0, 1] == pytest.approx(0.8) and iou[1, 0] == 0 and decay[:, 2].min() == pytest.approx(1.0)


def test_matrix_nms_compensation_by_hand():
    # a ⊃ b ⊃ c with IoU(a,b) = .8, IoU(a,c) = .6, IoU(b,c) = .75; c is decayed by a, compensated via b
    a, b, c = _square(10, 10, 0, 10, 0, 10), _square(10, 10, 0, 8, 0, 10), _square(10, 10, 0, 6, 0, 10)
    out = matrix_nms(torch.stack([a, b, c]).bool(), torch.zeros(3, dtype=torch.long), torch.tensor([0.9, 0.8, 0.7]))
    f = lambda x: math.exp(-2 * x * x)  # noqa: E731
    assert out[1] == pytest.approx(0.8 * f(0.8), rel=1e-5)
    assert out[2] == pytest.approx(0.7 * min(f(0.6), f(0.75) / f(0.8)), rel=1e-5)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_equals_the_direct_loop_on_random_masks(kernel):
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        n = 9
        base = torch.rand(3, 12, 12, generator=g) > 0.4
        masks = base[torch.randint(0, 3, (n,), generator=g)] & (torch.rand(n, 12, 12, generator=g) > 0.2)
        labels = torch.randint(0, 2, (n,), generator=g)
        scores = torch.rand(n, generator=g)
        ours = matrix_nms(masks, labels, scores, kernel=kernel)
        assert torch.allclose(ours, _direct_matrix_nms(masks, labels, scores, kernel), atol=1e-5)
        assert (ours <= scores + 1e-7).all()


def test_points_nms_keeps_local_maxima_of_the_asymmetric_window():
    heat = torch.tensor([[[[0.1, 0.5, 0.2], [0.3, 0.4, 0.6], [0.2, 0.1, 0.05]]]])
    kept = points_nms(heat)[0, 0]
    # a cell survives if ≥ its up, left and up-left neighbours
    assert torch.allclose(kept, torch.tensor([[0.1, 0.5, 0.0], [0.3, 0.0, 0.6], [0.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------ models
def _batch():
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 96), torch.rand(3, 64, 64)]
    targets = []
    for im in images[:2]:
        h, w = im.shape[1:]
        masks = torch.stack([_square(h, w, 8, 50, 10, 70), _square(h, w, 55, 75, 20, 40)])
        targets.append(dict(boxes=masks_to_boxes(masks), labels=torch.tensor([1, 4]), masks=masks))
    targets.append(dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                        masks=torch.zeros(0, 64, 64, dtype=torch.uint8)))  # an image without objects
    return images, targets


MODELS = [
    ("solo", lambda: SOLO(SOLOConfig.preset("smoke"), num_classes=7)),
    ("decoupled_solo", lambda: DecoupledSOLO(DecoupledSOLOConfig.preset("smoke"), num_classes=7)),
    ("solov2", lambda: SOLOv2(SOLOv2Config.preset("smoke"), num_classes=7)),
]


@pytest.mark.parametrize("name,build", MODELS, ids=[m[0] for m in MODELS])
def test_train_step_smoke(name, build):
    torch.manual_seed(0)
    model = build().train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 < float(losses["loss_mask"].detach()) <= 3.0 + 1e-4  # Dice ∈ [0, 1], × 3
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # no object at all: zero mask loss, still connected
    empty = model(images[2:], targets[2:])
    assert float(empty["loss_mask"].detach()) == 0.0 and empty["loss_mask"].requires_grad


def test_sparse_mask_channels_equal_the_dense_head():
    """Training and inference compute only the vanilla mask channels they read (``dense_masks=False``): same losses,
    same gradient on every parameter, same detections as the dense 1×1 conv over all S² channels."""
    torch.manual_seed(0)
    model = SOLO(SOLOConfig.preset("smoke"), num_classes=7).train()
    images, targets = _batch()
    batch, _ = model.preprocess(images)
    canvas = batch.shape[-2:]
    runs = {}
    for dense in (True, False):
        model.zero_grad()
        head_out = model.head(model.features(batch), dense_masks=dense)
        assert (head_out.mask_logits is None) != dense and (head_out.mask_feats is None) == dense
        losses = model.losses(head_out, targets, canvas)
        sum(losses.values()).backward()
        runs[dense] = ({k: v.detach() for k, v in losses.items()},
                       {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_d, grad_d), (loss_s, grad_s) = runs[True], runs[False]
    assert float(loss_d["loss_mask"]) > 0
    for k in loss_d:
        assert torch.allclose(loss_d[k], loss_s[k], atol=1e-6), k
    assert grad_d.keys() == grad_s.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in grad_d:
        assert torch.allclose(grad_d[n], grad_s[n], rtol=1e-4, atol=1e-6), n
    # a channel no positive cell reads gets exactly zero gradient on its 1×1 weights either way
    assigned = model.assign(targets, canvas)
    used = set((assigned.cells[0] % GRIDS[0] ** 2).tolist())
    unused = next(k for k in range(GRIDS[0] ** 2) if k not in used)
    assert not grad_s["head.mask_preds.0.weight"][unused].any()
    # inference: the sparse path (model.forward) gives the detections of the dense head's outputs
    _loosen(model).eval()
    with torch.no_grad(), plain_inference(model):
        sparse = model(images)
        batch, sizes = model.preprocess(images)
        dense = model.postprocess(model.head(model.features(batch)), sizes, batch.shape[-2:])
    for a, b in zip(sparse, dense):
        assert len(a["scores"]) > 0 and torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"])
        assert torch.allclose(a["scores"], b["scores"], atol=1e-6)


def _loosen(model):
    """Untrained heads predict near-empty masks at the prior; open them so the eval path has detections."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("mask_preds" in n or "kernel_pred" in n) and n.endswith("bias"):
                p.fill_(2.0)
    model.cfg = dataclasses.replace(model.cfg, score_thresh=0.0, update_thresh=0.0, detections_per_img=20)
    return model


@pytest.mark.parametrize("nms", ["matrix", "mask"])
@pytest.mark.parametrize("name,build", MODELS, ids=[m[0] for m in MODELS])
def test_eval_outputs_shaped_right(name, build, nms):
    torch.manual_seed(0)
    model = _loosen(build()).eval()
    model.cfg = dataclasses.replace(model.cfg, nms=nms)
    images, _ = _batch()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 3
    for img, p in zip(images, preds):
        n = len(p["scores"])
        assert 0 < n <= 20
        assert p["masks"].dtype == torch.bool and p["masks"].shape == (n, *img.shape[1:])
        assert p["boxes"].shape == (n, 4) and torch.equal(p["boxes"], masks_to_boxes(p["masks"]))
        assert p["labels"].dtype == torch.long and ((p["labels"] >= 0) & (p["labels"] < 7)).all()
        assert (p["scores"][:-1] >= p["scores"][1:]).all()


def test_published_thresholds_on_an_untrained_model_give_no_detections():
    # prior 0.01 on categories and masks: nothing passes score .1 — the threshold is applied, not ignored
    model = SOLO(SOLOConfig.preset("smoke"), num_classes=7).eval()
    with torch.no_grad():
        preds = model(_batch()[0][:1])
    assert preds[0]["masks"].shape == (0, 96, 128) and preds[0]["boxes"].shape == (0, 4)


def test_head_output_shapes_and_return_indices():
    model = SOLO(SOLOConfig.preset("smoke"), num_classes=7).eval()
    batch, sizes = model.preprocess(_batch()[0][:1])
    assert batch.shape[-2:] == (96, 128)
    out = model.head(model.features(batch))
    # masks at stride/2: 4, 4, 8, 16, 16 → 24×32, 24×32, 12×16, 6×8, 6×8
    assert [tuple(t.shape[1:]) for t in out.mask_logits] == [(s * s, *hw) for s, hw in
                                                             zip(GRIDS, [(24, 32)] * 2 + [(12, 16), (6, 8), (6, 8)])]
    assert [tuple(t.shape) for t in out.cate_logits] == [(1, 7, s, s) for s in GRIDS]
    _loosen(model)
    with torch.no_grad():
        det = model.postprocess(out, sizes, batch.shape[-2:], return_indices=True)[0]
    offsets = [0] + list(torch.tensor([s * s for s in GRIDS]).cumsum(0))
    for cell, lvl in zip(det["cells"].tolist(), det["fpn_levels"].tolist()):
        assert offsets[lvl] <= cell < offsets[lvl + 1]


def test_single_level_solo_and_coordconv_ablation_build_and_train():
    for overrides in (dict(multi_level=False, grid_numbers=(12,)), dict(coord_conv=0), dict(coord_conv=2)):
        model = SOLO(dataclasses.replace(SOLOConfig.preset("smoke"), **overrides), num_classes=7).train()
        images, targets = _batch()
        losses = model(images[:2], targets[:2])
        assert all(torch.isfinite(v) for v in losses.values())
    single = SOLO(dataclasses.replace(SOLOConfig.preset("smoke"), multi_level=False, grid_numbers=(12,)))
    assert single.strides == [8] and single.grid_numbers == [12]
    with pytest.raises(ValueError):
        SOLO(dataclasses.replace(SOLOConfig.preset("smoke"), multi_level=False))  # five grids for one level


def test_dynamic_masks_is_a_1x1_convolution():
    torch.manual_seed(0)
    kernels, feat = torch.randn(5, 16), torch.randn(16, 6, 7)
    ref = torch.nn.functional.conv2d(feat[None], kernels.view(5, 16, 1, 1))[0]
    assert torch.allclose(dynamic_masks(kernels, feat), ref, atol=1e-5)


def test_solov2_mask_feature_is_at_stride_4_with_coords_on_p5():
    model = SOLOv2(SOLOv2Config.preset("smoke"), num_classes=7).eval()
    assert model.mask_branch.levels[3][0][0].in_channels == 32 + 2
    assert model.mask_branch.levels[0][0][0].in_channels == 32
    with torch.no_grad():
        out = model.forward_parts([torch.rand(3, 96, 128)]).head
    assert out.mask_features.shape == (1, 16, 24, 32)
    assert [tuple(k.shape) for k in out.kernels] == [(1, 16, s, s) for s in GRIDS]
    assert SOLOv2(dataclasses.replace(SOLOv2Config.preset("smoke"), coord_conv=0)).mask_branch.levels[3][0][0] \
        .in_channels == 32


def test_overfit_sanity_mask_iou_grows():
    """A few steps on one image: the Dice loss falls (the targets and the mask path agree)."""
    torch.manual_seed(0)
    model = SOLOv2(SOLOv2Config.preset("smoke"), num_classes=7).train()
    images, targets = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        losses = model(images[:1], targets[:1])
        first = float(losses["loss_mask"].detach()) if first is None else first
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert float(losses["loss_mask"].detach()) < 0.7 * first


@pytest.mark.parametrize("name,build", MODELS, ids=[m[0] for m in MODELS])
def test_checkpoint_round_trip_rebuilds_the_model(name, build):
    from onestage.engine.checkpoint import make_checkpoint, model_from_checkpoint

    torch.manual_seed(0)
    model = build().eval()
    ckpt = make_checkpoint(model)
    again = model_from_checkpoint(ckpt)
    assert type(again) is type(model) and again.cfg == model.cfg
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        a, b = model.forward_parts([image]).head, again.forward_parts([image]).head
    assert torch.equal(a.cate_logits[0], b.cate_logits[0])


def test_fast_preset_scales_the_scale_ranges_to_its_training_size():
    """At 256 px instead of the paper's 800, an object of a given size relative to the image keeps the paper's
    levels (paper §3.1 ranges on sqrt(wh)); the cpu and paper presets keep the published pixel ranges."""
    from onestage.modeling import get_model_config
    from onestage.modeling.solo import PAPER_SCALE_RANGES, assign_levels, scaled_scale_ranges

    scaled = scaled_scale_ranges(256)
    assert scaled[0] == (0.32, 30.72) and scaled[4] == (122.88, 655.36)
    for name in ("solo", "decoupled_solo", "solov2"):
        assert tuple(map(tuple, get_model_config(name, "fast").scale_ranges)) == scaled
        assert tuple(map(tuple, get_model_config(name, "cpu").scale_ranges)) == PAPER_SCALE_RANGES
    f = 256 / 800
    for side in (20.0, 64.0, 150.0, 300.0, 700.0):  # square boxes, sqrt(wh) = side at 800 px
        paper = assign_levels(torch.tensor([[0.0, 0.0, side, side]]), PAPER_SCALE_RANGES)
        ours = assign_levels(torch.tensor([[0.0, 0.0, side * f, side * f]]), scaled)
        assert torch.equal(paper, ours), side

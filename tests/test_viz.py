"""Drawing: predictions become a Figure with the boxes and masks painted in; saving is atomic."""
import torch
from matplotlib.figure import Figure

from onestage.viz import draw_predictions, save_figure


def _preds():
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[0, 4:12, 4:20] = True
    masks[1, 16:30, 24:46] = True
    return {"boxes": torch.tensor([[4.0, 4, 20, 12], [24, 16, 46, 30]]), "scores": torch.tensor([0.9, 0.1]),
            "labels": torch.tensor([0, 1]), "masks": masks}


def test_draw_predictions_paints_only_confident_detections():
    image = torch.zeros(3, 32, 48)
    fig = draw_predictions(image, _preds(), ["ring", "star"], score_thresh=0.5)
    assert isinstance(fig, Figure)
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (32, 48, 3)
    assert shown[8, 10].sum() > 0  # inside the kept mask: coloured
    assert shown[22, 35].sum() == 0  # the low-score detection is not drawn
    assert "1 detections" in fig.axes[0].get_title()


def test_draw_targets_without_scores_and_save(tmp_path):
    target = {k: v for k, v in _preds().items() if k != "scores"}
    fig = draw_predictions(torch.rand(3, 32, 48), target, None)
    path = save_figure(fig, tmp_path / "a" / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "a" / "fig.png.tmp").exists()

"""KNN segmentation and LOST object discovery on features with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.eval.datasets import BoxAnnotation
from pipeline.eval.knn import KNNConfig, knn_segmentation, patch_labels
from pipeline.eval.lost import box_iou, lost_box, lost_corloc
from pipeline.eval.seg_metrics import ConfusionMeter, confusion_iou
from tests.eval_data import class_embeddings, label_features, make_voc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_patch_labels_take_the_majority_and_skip_ignored_cells():
    lab = np.zeros((8, 8), np.uint8)
    lab[:4, :4] = 2
    lab[:3, 4:] = 255
    lab[3, 4:] = 1  # cell (0, 1): one labelled row of class 1 under three ignored rows
    lab[4:, 4:] = 255
    got = patch_labels([lab], (2, 2), num_classes=3)
    assert got[0].tolist() == [[2, 1], [0, -1]]


def test_confusion_scores():
    iou = confusion_iou(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    assert iou[0] == pytest.approx(0.75) and iou[1] == pytest.approx(2 / 3) and torch.isnan(iou[2])
    meter = ConfusionMeter(3)
    meter.update(torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, 1], [255, 1]]))
    r = meter.result()
    assert r["aacc"] == pytest.approx(2 / 3) and r["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        meter.update(torch.zeros(1, 1), torch.full((1, 1), 7))


def test_knn_segmentation_transfers_labels_from_informative_features(tmp_path):
    from pipeline.eval.datasets import read_label, voc_pairs

    root = make_voc(tmp_path / "voc", n_train=24, n_val=8)
    tr = [read_label(lab) for _, lab in voc_pairs(str(root), "train")]
    va = [read_label(lab) for _, lab in voc_pairs(str(root), "val")]
    good = knn_segmentation(label_features(tr), tr, label_features(va, seed=1), va, 4)
    noise = knn_segmentation(torch.randn(24, 8, 8, 16), tr, torch.randn(8, 8, 8, 16), va, 4, KNNConfig(k=5))
    assert good["miou"] > 0.7 and noise["miou"] < good["miou"] - 0.3, (good["miou"], noise["miou"])
    assert good["train_patches"] == 24 * 64 and good["settings"]["k"] == 20
    with pytest.raises(ValueError, match="differ"):
        knn_segmentation(label_features(tr), tr, torch.randn(8, 4, 4, 16), va, 4)


def _planted(n: int, seed: int) -> tuple[torch.Tensor, list[BoxAnnotation]]:
    """Feature maps 8 x 8 with one object rectangle each (class embedding 1 on background 0) and its box."""
    rng = np.random.default_rng(seed)
    emb = class_embeddings(16)
    maps, anns = [], []
    for _ in range(n):
        h, w = rng.integers(2, 5, 2)
        y, x = rng.integers(0, 8 - h + 1), rng.integers(0, 8 - w + 1)
        f = emb[0].expand(8, 8, 16).clone()
        f[y:y + h, x:x + w] = emb[1]
        maps.append(f + 0.05 * torch.randn(8, 8, 16, generator=torch.Generator().manual_seed(int(rng.integers(1e6)))))
        anns.append(BoxAnnotation("img.jpg", np.array([[x * 10, y * 12, (x + w) * 10, (y + h) * 12]], float), 80, 96,
                                  np.array([False])))
    return torch.stack(maps), anns


def test_lost_finds_a_planted_object():
    maps, anns = _planted(12, seed=0)
    box, seed = lost_box(maps[0])
    x1, y1, x2, y2 = anns[0].boxes[0] / [10, 12, 10, 12]
    assert box.tolist() == [x1, y1, x2, y2] and x1 <= seed[1] < x2 and y1 <= seed[0] < y2
    assert lost_corloc(maps, anns)["corloc"] == 1.0
    noise = lost_corloc(torch.randn(12, 8, 8, 16, generator=torch.Generator().manual_seed(1)), anns)
    assert noise["corloc"] < 0.5 and noise["images"] == 12


def test_box_iou():
    assert box_iou(np.array([0, 0, 10, 10.0]), np.array([[5, 0, 15, 10], [20, 20, 30, 30]])).tolist() == \
        pytest.approx([50 / 150, 0.0])

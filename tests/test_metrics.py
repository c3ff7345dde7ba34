"""mIoU and pixel accuracy as the harness computes them, against a confusion matrix worked by hand."""

import pytest
import torch
from torch import nn

from harness.data.base import TensorSplit
from harness.engine.evaluate import count_flops, evaluate, ms_per_image


class FixedPrediction(nn.Module):
    """Returns logits whose argmax is a given label map, whatever the input."""

    def __init__(self, pred: torch.Tensor, num_classes: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float() * 10

    def forward(self, x):
        return self.logits[: len(x)]


def test_miou_and_pixel_accuracy_match_hand_computed_confusion_matrix():
    # 3 classes, one 2x4 image; 255 marks an ignored pixel.
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    # confusion (rows = target, cols = prediction), ignoring the 255 pixel:
    #   class 0: 3 pixels -> predicted 0,1,0  ; class 1: 2 -> 1,1 ; class 2: 2 -> 2,0
    # IoU0 = 2 / (3 + 3 - 2) = 0.5 ; IoU1 = 2 / (2 + 3 - 2) = 2/3 ; IoU2 = 1 / (2 + 1 - 1) = 0.5
    expected_miou = (0.5 + 2 / 3 + 0.5) / 3
    expected_acc = 5 / 7
    split = TensorSplit(torch.zeros(1, 1, 2, 4), target)
    out = evaluate(
        FixedPrediction(pred, 3),
        split,
        task="segmentation",
        num_classes=3,
        ignore_index=255,
        device=torch.device("cpu"),
    )
    assert abs(out["miou"] - expected_miou) < 1e-6
    assert abs(out["pixel_acc"] - expected_acc) < 1e-6
    assert [round(out[f"iou_{i}"], 6) for i in range(3)] == [0.5, round(2 / 3, 6), 0.5]


def test_class_absent_from_target_and_prediction_is_dropped_from_the_mean():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 0, 1, 0]]])
    split = TensorSplit(torch.zeros(1, 1, 1, 4), target)
    out = evaluate(
        FixedPrediction(pred, 4),
        split,
        task="segmentation",
        num_classes=4,
        ignore_index=255,
        device=torch.device("cpu"),
    )
    # IoU0 = 2/3, IoU1 = 1/2; classes 2 and 3 never appear, so the mean is over two classes
    assert abs(out["miou"] - (2 / 3 + 1 / 2) / 2) < 1e-6


def test_classification_accuracy():
    target = torch.tensor([0, 1, 2, 2])
    logits = torch.eye(3)[torch.tensor([0, 1, 1, 2])]

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[: len(x)]

    out = evaluate(
        Fixed(),
        TensorSplit(torch.zeros(4, 1, 2, 2), target),
        task="classification",
        num_classes=3,
        ignore_index=255,
        device=torch.device("cpu"),
    )
    assert out["accuracy"] == 0.75


def test_flops_of_a_single_conv_and_latency_is_positive():
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    x = torch.zeros(3, 1, 8, 8)
    # one multiply-add (2 FLOPs) per weight per output pixel, for one image
    assert count_flops(conv, x) == 2 * 4 * 9 * 64
    assert ms_per_image(conv, x, warmup=1, repeats=3) > 0


def test_per_class_iou_leaves_out_a_class_absent_from_target_and_prediction():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 0, 1, 2]]])
    split = TensorSplit(torch.zeros(1, 1, 1, 4), target)
    out = evaluate(
        FixedPrediction(pred, 4),
        split,
        task="segmentation",
        num_classes=4,
        ignore_index=255,
        device=torch.device("cpu"),
    )
    # class 2 is only predicted (IoU 0, a real score); class 3 appears nowhere: no score, not 0
    assert {k: round(v, 6) for k, v in out.items() if k.startswith("iou_")} == {
        "iou_0": 1.0,
        "iou_1": 0.5,
        "iou_2": 0.0,
    }


def test_trivial_predictor_scores_the_training_majority_class():
    from harness.data.base import DataSplits
    from harness.engine.evaluate import trivial_score

    # train: class 1 holds 3 labelled pixels, class 0 two, class 2 one; 255 pixels are not counted
    train = TensorSplit(torch.zeros(1, 1, 2, 4), torch.tensor([[[1, 1, 255, 255], [1, 0, 0, 2]]]))
    # test, everything predicted 1: IoU1 = 2 / 5 (5 labelled pixels predicted 1, 2 of them are 1),
    # IoU0 = IoU2 = 0 (present, never predicted); class 3 is absent: mIoU = (2/5) / 3
    test = TensorSplit(torch.zeros(1, 1, 2, 3), torch.tensor([[[0, 1, 1], [2, 0, 255]]]))
    seg = DataSplits("segmentation", train, test, test, num_classes=4, in_channels=1)
    assert trivial_score(seg, torch.device("cpu")) == {"trivial/test_miou": pytest.approx(2 / 5 / 3)}
    labels = DataSplits(
        "classification",
        TensorSplit(torch.zeros(4, 1, 2, 2), torch.tensor([2, 2, 1, 0])),
        None,
        TensorSplit(torch.zeros(5, 1, 2, 2), torch.tensor([2, 0, 1, 2, 2])),
        num_classes=3,
        in_channels=1,
    )
    assert trivial_score(labels, torch.device("cpu")) == {"trivial/test_accuracy": pytest.approx(3 / 5)}

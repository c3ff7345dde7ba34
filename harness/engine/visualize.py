"""Pictures of predictions: a grid of image | ground truth | prediction rows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def label_colours(num_classes: int, ignore_index: int) -> np.ndarray:
    """An RGB lookup for class ids; background black, ignore white."""
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    table = np.zeros((256, 3))
    table[1:num_classes] = cmap(np.arange(1, num_classes))[:, :3]
    table[ignore_index] = 1.0
    return table


def prediction_grid(
    images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, num_classes: int, ignore_index: int
):
    """A matplotlib figure with one row per image: the input, its ground truth, the model's prediction."""
    colours = label_colours(num_classes, ignore_index)
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for row in range(n):
        img = images[row].float().cpu()
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        panels = [img.numpy(), colours[targets[row].cpu().numpy()], colours[preds[row].cpu().numpy()]]
        for col, (panel, title) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            ax = axes[row, col]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    return fig

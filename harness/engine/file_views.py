"""Replayed teacher views for file-backed sources (folder, voc, cityscapes).

Their train split is a ``PairView`` whose ``JointTransform`` draws ``AugmentParams`` per sample inside the
DataLoader workers. For ``train.teacher_views: V`` every training image instead gets V parameter sets drawn
once, in image order from ``train.teacher_views_seed`` (``transforms.draw_params``: scale, crop box, flip and
the colour-jitter factors and order), kept as ``transforms.params_row`` rows (float64: bit for bit). The
teacher pass reads every (image, view) through a DataLoader whose workers apply those stored parameters
(``PairView.view``), and the store of engine/views.py keeps its outputs. During training ``FileReplaySplit``
picks one stored view per image each pass (``iterate_batches`` calls ``new_pass`` before its DataLoader
starts, so the workers see that pass's choice); its workers return (image, mask, index, view id), the loader
checks the view ids against the choice, and the teacher's outputs are looked up by (index, view).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from harness.data.loader import iterate_batches
from harness.data.transforms import PairView, params_row, row_params
from harness.engine.views import ViewChoice
from harness.errors import DataError


def is_file_split(split) -> bool:
    """True for the train split of a file-backed source (a PairView whose transform augments)."""
    return isinstance(split, PairView) and split.transform.train


class _AllViews(Dataset):
    """Item k: view k // N of image k % N, transformed by its stored parameters (the teacher pass)."""

    def __init__(self, split: PairView, rows: torch.Tensor):
        self.split, self.rows = split, rows

    def __len__(self) -> int:
        return self.rows.shape[0] * self.rows.shape[1]

    def __getitem__(self, k: int):
        i, v = k % len(self.rows), k // len(self.rows)
        return self.split.view(i, row_params(self.rows[i, v]))


class FileReplaySplit(ViewChoice):
    """The training split as stored views applied in DataLoader workers; ``split[i]`` shows the view chosen
    for image i in the current pass (view 0 in unshuffled passes)."""

    def new_pass(self, shuffle: bool) -> None:
        self.choose(shuffle)

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(image, mask, index, view id) of image ``i``'s view in this pass."""
        v = int(self.current[i])
        x, y = self.base.view(i, row_params(self.rows[i, v]))
        return x, y, i, v

    def __getitem__(self, i: int):
        return self.sample(i)[:2]

    def check_views(self, idx: torch.Tensor, views: torch.Tensor) -> None:
        """The workers applied the views the teacher's outputs will be looked up by."""
        if not torch.equal(views.long(), self.current[idx.long()]):
            raise DataError(
                "replayed views: a DataLoader worker applied another view than this pass chose; "
                "start each pass through iterate_batches (it calls new_pass before the workers start)"
            )


class FileViews:
    """Drawing, applying (in DataLoader workers) and replaying the stored views of a file-backed split."""

    def __init__(self, split: PairView):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def draw_image(self, i: int, views: int, generator: torch.Generator) -> torch.Tensor:
        """(views, len(PARAM_FIELDS)) parameters of image ``i``'s views; its size is read only when the
        parameters depend on it (no fixed ``resize``)."""
        transform = self.split.transform
        size = self.split.image_size(i) if transform.cfg.resize is None else None
        params = [params_row(transform.draw(size, generator)) for _ in range(views)]
        return torch.tensor(params, dtype=torch.float64)

    def probe(self, rows: torch.Tensor) -> torch.Tensor:
        return self.split.view(0, row_params(rows[0, 0]))[0][None]

    def batches(self, rows: torch.Tensor, batch: int):
        n = len(rows)
        cpu = torch.device("cpu")
        for x, _, k in iterate_batches(_AllViews(self.split, rows), batch, device=cpu, shuffle=False):
            yield x, k % n, k // n

    def replay(self, rows: torch.Tensor, seed: int) -> FileReplaySplit:
        return FileReplaySplit(self.split, rows, seed)

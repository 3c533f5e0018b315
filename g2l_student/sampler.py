"""The order a run reads its views in: one stream over all its epochs, resumable at any micro-batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from torch.utils.data import Sampler

from g2l_student.data import epoch_rows, fresh_item, samples_per_epoch


class RunSampler(Sampler):
    """Views (rows of views.parquet) of micro-batches [start, stop) of a whole run, epoch after epoch.

    The run reads one stream: epoch 0's draw (`epoch_rows(0)`: seeded view choice and order), then
    epoch 1's, and so on, cut into micro-batches; a batch may end one epoch and start the next, so no
    tile is ever dropped and K epochs in a row visit all K views of every tile, whatever the batch
    size. One sampler for the whole run means no pipeline stall at epoch boundaries, and a resumed run
    starts at its exact micro-batch without replaying the loader. With `record_to`, each epoch's
    draw is written to record_to/epoch_NNNNNN.parquet (column `view`) as it is made.

    With `fresh_from` = K, epoch e instead visits view K + e of every training tile, a view no
    cache holds (FreshViews items; recorded as columns `tile` and `k`).
    """

    def __init__(self, views: np.ndarray, tiles: np.ndarray, seed: int, mode: str, batch_size: int,
                 start: int, stop: int, record_to: Path | None = None, fresh_from: int | None = None):
        self.views, self.tiles, self.seed = views, tiles, seed
        self.mode = "one" if fresh_from is not None else mode
        self.batch_size, self.start, self.stop, self.record_to = batch_size, start, stop, record_to
        self.fresh_from = fresh_from
        self.per_epoch = samples_per_epoch(tiles, self.mode)

    def epoch_of(self, micro_batch: int) -> int:
        """The epoch the micro-batch's last sample belongs to."""
        return ((micro_batch + 1) * self.batch_size - 1) // self.per_epoch

    def _epoch(self, epoch: int) -> np.ndarray:
        rows = epoch_rows(self.tiles, epoch, self.seed, self.mode)
        if self.fresh_from is None:
            drawn, record = self.views[rows], {"view": self.views[rows]}
        else:
            k = self.fresh_from + epoch
            drawn, record = fresh_item(self.tiles[rows], k), {"tile": self.tiles[rows], "k": np.full(len(rows), k)}
        if self.record_to is not None:
            path = self.record_to / f"epoch_{epoch:06d}.parquet"
            if not path.exists():
                self.record_to.mkdir(parents=True, exist_ok=True)
                pl.DataFrame(record).write_parquet(path)
        return drawn

    def __iter__(self):
        epoch, drawn = None, None
        for position in range(self.start * self.batch_size, self.stop * self.batch_size):
            e, j = divmod(position, self.per_epoch)
            if e != epoch:
                epoch, drawn = e, self._epoch(e).tolist()
            yield drawn[j]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch_size

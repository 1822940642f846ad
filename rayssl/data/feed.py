"""One worker's training batches, epoch by epoch: Ray Data rows -> crops on the device.

``TrainFeed`` reads a worker's dataset shard (or a whole dataset, as the benchmark does) with
the run's local shuffle, and yields ``(crops, columns)`` per batch: the normalised float crops
(``data.augment_on=cpu``: cut by the Ray Data tasks and shipped as uint8; ``device``: decoded
and multi-cropped here, ``rayssl.data.gpu_augment``) and the extra batch columns a method
asked for (CDUL's image ``index``). No Ray import: ``source`` is anything with Ray Data's
``iter_batches`` / ``iter_torch_batches``.
"""

from __future__ import annotations

from functools import partial
from itertools import islice
from typing import Iterator, Sequence

import torch

from rayssl.data.multicrop import crop_spec
from rayssl.data.prefetch import ahead
from rayssl.data.tensors import to_float_images
from rayssl.sections import DataSection

__all__ = ["TrainFeed"]


class TrainFeed:
    """Batches of ``batch_size`` rows (the worker's share of the global batch) from ``source``.

    The local shuffle is seeded by (seed, epoch, rank), so a run is reproducible; with
    ``augment_on=device`` the crops are seeded per image by (seed, epoch, image key), as the
    Ray Data tasks seed them on the CPU path. ``local_shuffle=False``: no shuffle buffer, for
    rows already in a new order every epoch (``TrainData.shuffled_at_source``). ``prefetch``:
    with ``augment_on=device``, the next batches are decoded and cropped by a background thread
    (on a side CUDA stream) while the step runs (``rayssl.data.prefetch``; default: on CUDA).
    """

    def __init__(self, source, data: DataSection, device: torch.device, *, batch_size: int, seed: int,
                 rank: int = 0, columns: Sequence[str] = (), channels_last: bool = False,
                 local_shuffle: bool = True, prefetch: bool | None = None):
        self.source, self.data, self.device = source, data, device
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.columns, self.channels_last = tuple(columns), channels_last
        self.buffer = data.shuffle_buffer if local_shuffle else 0
        self.keys = [f"crop_{j}" for j in range(sum(data.crop_counts))]
        self.augment = None
        # augment_on=device: decode and crop the next batches while the step runs (None: on CUDA).
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        if data.augment_on == "device":
            from rayssl.data.gpu_augment import DeviceMultiCrop

            self.augment = DeviceMultiCrop(crop_spec(data), device, channels_last=channels_last)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[list[torch.Tensor], dict]]:
        """The batches of (0-based) ``epoch``: ``(crops, columns)``, after the first ``skip`` ones.

        ``skip``: batches this worker already trained on before a mid-epoch checkpoint. They are
        read and dropped (with ``augment_on=device`` before any decoding), so the epoch goes on
        from the same position: exactly the same rows with ``data.deterministic``."""
        buffer = self.buffer
        shuffle = {"local_shuffle_buffer_size": buffer or None,
                   "local_shuffle_seed": (self.seed * 100003 + epoch * 101 + self.rank) if buffer else None}
        if self.augment is not None:
            from rayssl.data.gpu_augment import device_crop_batch

            rows = islice(self.source.iter_batches(batch_size=self.batch_size, drop_last=True,
                                                   batch_format="numpy", **shuffle), skip, None)
            crop = partial(device_crop_batch, augment=self.augment, seed=self.seed, epoch=epoch, min_side=1)
            # depth 2: lockstep takes batch t+1 before step t (rayssl.data.prefetch)
            for batch in ahead(rows, crop, self.device, depth=2) if self.prefetch else map(crop, rows):
                if batch is not None:  # None: no image of the batch decoded
                    yield batch.pop("crops"), {k: batch[k] for k in self.columns}
            return
        for batch in islice(self.source.iter_torch_batches(batch_size=self.batch_size, drop_last=True,
                                                           device=self.device, **shuffle), skip, None):
            yield ([to_float_images(batch[k], channels_last=self.channels_last) for k in self.keys],
                   {k: batch[k] for k in self.columns})

"""One worker's training batches, epoch by epoch: Ray Data rows -> crops on the device.

``TrainFeed`` reads a worker's dataset shard (or a whole dataset, as the benchmark does) with
the run's local shuffle, and yields ``(crops, columns)`` per batch: the normalised float crops
(``data.augment_on=cpu``: cut by the Ray Data tasks and shipped as uint8; ``device``: decoded
and multi-cropped here, ``rayssl.data.gpu_augment``) and the extra batch columns a method
asked for (CDUL's image ``index``, left on the host). No Ray import: ``source`` is anything with Ray Data's
``iter_batches`` / ``iter_torch_batches``.
"""

from __future__ import annotations

from functools import partial
from itertools import islice
from typing import Callable, Iterator, Sequence

import torch

from rayssl.data.multicrop import crop_spec
from rayssl.data.prefetch import ahead, started
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
    ``start(epoch)``: the epoch's pipeline starts now, before ``epoch(epoch)`` reads it.
    """

    def __init__(self, source, data: DataSection, device: torch.device, *, batch_size: int, seed: int,
                 rank: int = 0, columns: Sequence[str] = (), channels_last: bool = False,
                 local_shuffle: bool = True, prefetch: bool | None = None):
        if device.type == "cuda" and device.index is None:  # read on a background thread too, whose current device is 0
            device = torch.device("cuda", torch.cuda.current_device())
        self.source, self.data, self.device = source, data, device
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.buffer = data.shuffle_buffer if local_shuffle else 0
        self.keys = [f"crop_{j}" for j in range(sum(data.crop_counts))]
        self._started: tuple[int, int, Iterator] | None = None  # (epoch, skip, rows): start()
        self._reading: Iterator | None = None  # the rows of the epoch read last
        # augment_on=device: decode and crop the next batches while the step runs (None: on CUDA).
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        self.layout(columns, channels_last)

    def layout(self, columns: Sequence[str], channels_last: bool) -> None:
        """What the step takes: the extra batch ``columns`` the method names and channels_last
        crops. Set again once the engine is built when ``start`` came before it."""
        self.columns, self.channels_last = tuple(columns), channels_last
        self.augment = None
        if self.data.augment_on == "device":
            from rayssl.data.gpu_augment import DeviceMultiCrop

            self.augment = DeviceMultiCrop(crop_spec(self.data), self.device, channels_last=channels_last)

    def start(self, epoch: int, skip: int = 0) -> None:
        """Start reading (0-based) ``epoch`` now: a background thread reads the epoch before to
        its end (``_after``), then asks Ray Data for this one's first batch, so the pipeline's
        start-up (its tasks launched, the first rows made) runs while the caller still trains;
        ``epoch(epoch, skip)`` then reads on from it. The caller announces the epoch first (its
        rows are seeded by it), and only once every consumer holds its last batch of the epoch
        before: the rows it trains on were seeded by the epoch announced before."""
        if self._started is not None:
            raise ValueError(f"epoch {self._started[0]} was started and not read yet")
        self._started = (epoch, skip, started(self._open(epoch, skip)))

    def close(self) -> None:
        """Stop reading: the epoch read last is closed now (its pipeline shut down), not when the
        garbage collector finds it. Call it when the run's last epoch is done."""
        reading, self._reading, self._started = self._reading, None, None
        if reading is not None:
            reading.close()

    def _open(self, epoch: int, skip: int) -> Iterator:
        """``epoch``'s rows after the first ``skip``, opened once the epoch read last is read to
        its end (``_after``); that one is no longer this feed's to close."""
        previous, self._reading = self._reading, None
        return _after(previous, self._opener(epoch, skip))

    def _opener(self, epoch: int, skip: int) -> Callable[[], Iterator]:
        """Opens Ray Data's batches of ``epoch`` after the first ``skip``: on the device as torch
        tensors (``augment_on=cpu``), or NumPy rows of encoded images for ``augment_on=device``.
        It holds the source, not this feed (no reference cycle keeps a pipeline running)."""
        source, device, batch_size, encoded = self.source, self.device, self.batch_size, self.data.augment_on == "device"
        buffer = self.buffer
        shuffle = {"local_shuffle_buffer_size": buffer or None,
                   "local_shuffle_seed": (self.seed * 100003 + epoch * 101 + self.rank) if buffer else None}
        # A method's columns (CDUL's image index) are read on the host, where its label store is:
        # Ray Data then hands the batch over in pinned host memory and ``epoch`` moves the crops
        # alone, without a blocking copy back of the index at every step.
        where = ({"device": "cpu", "pin_memory": device.type == "cuda"} if self._host_columns()
                 else {"device": device})

        def rows() -> Iterator:
            if encoded:
                return islice(source.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy",
                                                  **shuffle), skip, None)
            return islice(source.iter_torch_batches(batch_size=batch_size, drop_last=True, **where, **shuffle),
                          skip, None)

        return rows

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[list[torch.Tensor], dict]]:
        """The batches of (0-based) ``epoch``: ``(crops, columns)``, after the first ``skip`` ones.
        Read from where ``start`` left it, else opened once the epoch read before is read to its end.

        ``skip``: batches this worker already trained on before a mid-epoch checkpoint. They are
        read and dropped (with ``augment_on=device`` before any decoding), so the epoch goes on
        from the same position: exactly the same rows with ``data.deterministic``."""
        begun, self._started = self._started, None
        if begun is not None and begun[:2] != (epoch, skip):
            raise ValueError(f"epoch {begun[0]} (skip {begun[1]}) was started, epoch {epoch} (skip {skip}) asked for")
        rows = self._reading = begun[2] if begun is not None else self._open(epoch, skip)
        if self.augment is not None:
            from rayssl.data.gpu_augment import device_crop_batch

            crop = partial(device_crop_batch, augment=self.augment, seed=self.seed, epoch=epoch, min_side=1)
            # depth 2: lockstep takes batch t+1 before step t (rayssl.data.prefetch)
            for batch in ahead(rows, crop, self.device, depth=2) if self.prefetch else map(crop, rows):
                if batch is not None:  # None: no image of the batch decoded
                    yield batch.pop("crops"), {k: batch[k] for k in self.columns}
            return
        for batch in rows:  # (already on the device unless the columns stay on the host)
            yield ([to_float_images(batch[k].to(self.device, non_blocking=True), channels_last=self.channels_last)
                    for k in self.keys], {k: batch[k] for k in self.columns})

    def _host_columns(self) -> bool:
        """Whether the method's columns stay on the host while the crops go to the device."""
        return bool(self.columns) and self.device.type != "cpu"


def _after(previous: Iterator | None, open_rows: Callable[[], Iterator]) -> Iterator:
    """The rows ``open_rows`` opens, once ``previous`` (the epoch read before) is read to its end.

    A dataset shard hands out an epoch's blocks until its end, and an iterator of the epoch
    before left unread would still be talking to it when the next epoch starts: a get still
    waiting would take a block of the new epoch (Ray 2.60's ``SplitCoordinator.get`` reads the
    current output), and its late clean-up would tell the coordinator the new epoch's split is
    done. Rows left there (at most a batch a worker's equal share holds beyond the epoch's
    steps) are dropped, as they were before."""
    for _ in previous or ():
        pass
    yield from open_rows()

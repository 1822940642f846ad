"""The CDUL label store (no Ray); the labelling job's Parquet output is ``rayssl.data.pseudo_labels``.

Design. Every image gets a dense integer ``index`` when it is pseudo-labelled (its
position in the listing of the source, or the scene number); the training rows carry that
index through Ray Data, so images may arrive in any order, on any worker. Each training
worker holds one replica of the store: a (N, C) table of *latent* labels (the logit of
the soft label, the quantity gradient alignment moves). Labels are read locally; every
update is all-gathered (index rows + new latent rows, one global batch per step) and
applied by every worker in the same order, so the replicas stay identical without a
parameter server. Rank 0 saves the table in the checkpoint (``model.pt``), so a resume
(with any number of workers) continues with the updated labels. No image is ever held.

Memory cost: N x C x bytes per element, per worker (plus the same once in a checkpoint).
float32: 1 M images x 100 classes = 400 MB; 10 M x 300 = 12 GB. ``cdul.store_dtype=float16``
halves it (latents kept to ~3 significant digits), and ``cdul.store_dir=/local/ssd`` puts
the table in a memory-mapped file per worker, so the OS pages in only the rows touched
(the table then costs disk, not RAM: 10 M x 300 x 2 B = 6 GB of local disk per worker).
Network per step: global batch x C x 4 B (e.g. 4096 x 300 x 4 B = 5 MB).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from rayssl.data.pseudo_labels import read_pseudo_labels

# A soft label of exactly 0 or 1 has an infinite logit: clamp before taking it.
LABEL_EPS = 1e-4


def to_latent(soft: torch.Tensor) -> torch.Tensor:
    p = soft.float().clamp(LABEL_EPS, 1.0 - LABEL_EPS)
    return torch.log(p) - torch.log1p(-p)


class LabelStore:
    """(N, C) latent labels indexed by image index; ``soft(idx) = sigmoid(latent[idx])``.

    Args:
        num_rows: N, one more than the largest image index.
        num_classes: C.
        dtype: storage dtype (torch.float32 or torch.float16).
        directory: if given, back the table by a memory-mapped file there.
    """

    def __init__(self, num_rows: int, num_classes: int, dtype: torch.dtype = torch.float32,
                 directory: str | None = None):
        if num_rows < 1 or num_classes < 1:
            raise ValueError(f"label store needs >= 1 row and class, got {num_rows} x {num_classes}")
        self.num_rows, self.num_classes, self.dtype = int(num_rows), int(num_classes), dtype
        self.updates = 0  # number of update calls applied (a resume restores it)
        if directory:
            os.makedirs(directory, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="cdul-labels-", suffix=".npy", dir=directory)
            os.close(fd)
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(self.num_rows, self.num_classes))
            os.unlink(path)  # the mapping stays valid; nothing is left behind on exit
            self.latent = torch.from_numpy(arr)
        else:
            self.latent = torch.zeros(self.num_rows, self.num_classes, dtype=dtype)
        self.known = torch.zeros(self.num_rows, dtype=torch.bool)  # rows that hold a label

    @property
    def nbytes(self) -> int:
        return self.latent.numel() * self.latent.element_size() + self.known.numel()

    def _check(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).cpu().reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_rows):
            raise IndexError(f"image index out of range [0, {self.num_rows}): {idx.min().item()}..{idx.max().item()}")
        return idx

    def set_soft(self, idx, soft: torch.Tensor) -> None:
        idx = self._check(idx)
        self.latent[idx] = to_latent(soft.cpu()).to(self.dtype)
        self.known[idx] = True

    def get_latent(self, idx) -> torch.Tensor:
        idx = self._check(idx)
        if not bool(self.known[idx].all()):
            missing = idx[~self.known[idx]][:5].tolist()
            raise KeyError(f"no pseudo-label for image index(es) {missing}: the training rows and "
                           "the --pseudo-labels table disagree")
        return self.latent[idx].float()

    def get_soft(self, idx) -> torch.Tensor:
        return torch.sigmoid(self.get_latent(idx))

    def set_latent(self, idx, latent: torch.Tensor) -> None:
        idx = self._check(idx)
        self.latent[idx] = latent.detach().cpu().to(self.dtype)
        self.updates += 1

    def soft_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of known rows, their soft labels (M, C) float32)."""
        idx = torch.nonzero(self.known).reshape(-1)
        return idx, torch.sigmoid(self.latent[idx].float())

    def state_dict(self) -> dict:
        return {"latent": self.latent.clone(), "known": self.known.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        lat = state["latent"]
        if tuple(lat.shape) != (self.num_rows, self.num_classes):
            raise ValueError(f"stored label table is {tuple(lat.shape)}, expected "
                             f"{(self.num_rows, self.num_classes)} (other --pseudo-labels?)")
        self.latent.copy_(lat.to(self.dtype))
        self.known.copy_(state["known"])
        self.updates = int(state.get("updates", 0))


def store_from_pseudo_labels(uri: str, dtype: torch.dtype = torch.float32, directory: str | None = None,
                             options=None) -> tuple[LabelStore, dict]:
    meta, cols = read_pseudo_labels(uri, options=options)
    idx = torch.from_numpy(cols["index"].astype(np.int64))
    store = LabelStore(int(meta["num_rows"]), len(meta["classes"]), dtype=dtype, directory=directory)
    store.set_soft(idx, torch.from_numpy(cols["soft_label"]))
    return store, meta

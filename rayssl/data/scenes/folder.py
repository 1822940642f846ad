"""Writing the built-in scenes as image files (``python -m rayssl.data.scenes``)."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from rayssl.data.scenes.generate import generate_scene, split_seed

__all__ = ["write_image_folder"]


def write_image_folder(out_dir: str | Path, n: int, seed: int = 0, size: int = 64,
                       fmt: str = "png", layout: str = "flat", split: str = "train",
                       overwrite: bool = False) -> Path:
    """Write scenes 0..n-1 of stream ``split_seed(seed, split)`` as image files.

    Layouts:
        "flat":        ``out_dir/scene-000000.png``
        "imagefolder": ``out_dir/<dominant>/scene-000000.png`` (torchvision ImageFolder)
    Plus ``out_dir/labels.csv`` with columns ``id,classes,dominant,caption``: ``id`` is
    the file stem, ``classes`` are joined by ``|``.

    Refuses to write into a non-empty directory unless ``overwrite=True``; even then
    it only replaces files of the same names and deletes nothing.

    Returns:
        ``out_dir`` as a Path.
    """
    fmt = fmt.lower()
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in ("png", "jpg"):
        raise ValueError(f"fmt must be 'png' or 'jpg', got {fmt!r}")
    if layout not in ("flat", "imagefolder"):
        raise ValueError(f"layout must be 'flat' or 'imagefolder', got {layout!r}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; refusing to write scenes into it (files could be "
            "overwritten). Choose an empty or new directory, or pass overwrite=True "
            "(--overwrite) to replace same-named files.")
    stream = split_seed(seed, split)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(int(n) - 1)))
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "classes", "dominant", "caption"])
        for i in range(int(n)):
            scene = generate_scene(i, seed=stream, size=size)
            stem = f"scene-{i:0{digits}d}"
            folder = out / scene.dominant if layout == "imagefolder" else out
            folder.mkdir(exist_ok=True)
            img = Image.fromarray(scene.image)
            if fmt == "png":
                img.save(folder / f"{stem}.png")
            else:
                img.save(folder / f"{stem}.jpg", quality=95)
            writer.writerow([stem, "|".join(scene.classes), scene.dominant, scene.caption])
    return out

"""The labelling job's output on disk: Parquet rows of images by index, and a side file.

``python -m rayssl.pseudolabel --out URI`` writes Parquet rows ``index, id, path, soft_label``
(+ ``global``, ``aggregated``; + ``gt`` for generated scenes; + ``offset``, ``length`` for tar
members, which training reads again) and ``pseudolabels.json`` (classes, settings, number of
rows, where the images came from). Training reads the rows back by index (``rayssl.data.indexed``)
and fills CDUL's label store (``rayssl.pseudolabel.store``) from them. No Ray import.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayssl.storage import exists, filesystem, pyarrow_filesystem, read_text, write_text

META_FILE = "pseudolabels.json"

__all__ = ["META_FILE", "meta_path", "read_meta", "read_pseudo_labels", "scenes_source", "write_meta",
           "write_soft_labels"]


def meta_path(uri: str) -> str:
    """The side file of the labels table at ``uri``: where one is, nothing may be written over it."""
    return f"{uri.rstrip('/')}/{META_FILE}"


def scenes_source(seed: int, size: int, num_images: int) -> dict:
    """The meta's ``source`` for generated scenes: what training needs to re-generate them."""
    return {"kind": "scenes", "uri": "scenes", "seed": int(seed), "size": int(size), "num_images": int(num_images)}


def write_meta(uri: str, meta: dict, options=None) -> None:
    """Write the side file ``read_meta`` reads (whole or not at all)."""
    write_text(meta_path(uri), json.dumps(meta, indent=1), options)


def write_soft_labels(uri: str, classes: list[str], soft: np.ndarray, source: dict, rows=None,
                      options=None) -> str:
    """A labels table without a CLIP: one Parquet file of ``index, path, soft_label`` rows (image
    ``rows[i]``, default 0..N-1, gets ``soft[rows[i]]``) and its side file, ``source`` naming the
    images. For the benchmark's CDUL step and for tests; returns ``uri``. A table already there
    is refused, never overwritten."""
    if exists(meta_path(uri), options):
        raise FileExistsError(f"{uri} already holds pseudo-labels ({META_FILE}); write them elsewhere")
    n = len(soft)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    fs, root = filesystem(uri, options)
    fs.makedirs(root, exist_ok=True)
    table = pa.table({"index": rows, "path": [""] * n,
                      "soft_label": pa.array(list(np.asarray(soft, np.float32)[rows]), pa.list_(pa.float32()))})
    with fs.open(f"{root.rstrip('/')}/part-0.parquet", "wb") as f:
        pq.write_table(table, f)
    write_meta(uri, {"classes": list(classes), "num_rows": n, "source": source}, options)
    return uri


def read_meta(uri: str, options=None) -> dict:
    """The side file the labelling job writes next to its Parquet files."""
    path = meta_path(uri)
    if not exists(path, options):
        raise FileNotFoundError(f"--pseudo-labels: {uri} holds no {META_FILE}; make it with "
                                "`python -m rayssl.pseudolabel --out URI ...`")
    return json.loads(read_text(path, options))


def read_pseudo_labels(uri: str, columns=("index", "soft_label"), options=None) -> tuple[dict, dict]:
    """(meta, {column: numpy array}) of a labelling job's output; vector columns are (M, C)."""
    meta = read_meta(uri, options)
    fs, root = filesystem(uri, options)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"--pseudo-labels: {uri} holds no .parquet files")
    table = pq.read_table(files, columns=list(columns), filesystem=pyarrow_filesystem(fs))
    out = {}
    c = len(meta["classes"])
    for name in columns:
        col = table.column(name).combine_chunks()
        if hasattr(col, "flatten") and str(col.type).startswith(("fixed_size_list", "list")):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, c).astype(np.float32)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return meta, out

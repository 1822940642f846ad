"""The plotting functions (matplotlib, Agg backend; inputs are plain arrays, no Ray, no model).

Each function validates its inputs, draws one figure, writes it as a PNG through
``save_figure`` (atomic: the PNG is complete or absent) and returns the numbers it drew,
so callers and tests can check what the picture shows.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

from rayssl.outfile import write_bytes
from rayssl.storage import S3Options


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op when already chosen
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str, dpi: int = 110, options: S3Options | None = None) -> str:
    """Render ``fig`` to PNG bytes and write them to ``out`` (local or s3://) in one go."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    write_bytes(out, buf.getvalue(), options=options)
    return out


# ------------------------------------------------------------------ training curves

CURVE_PANELS = (("loss", "loss"), ("lr", "learning rate"), ("images_per_s", "images / s"))
PROBE_PANELS = ("probe_top1", "probe_map")  # eval.online_probe's score, drawn when the run reports it


def plot_training_curves(history: Sequence[dict], out: str, metric: str | None = None,
                         title: str | None = None,
                         options: S3Options | None = None) -> dict[str, list[tuple[float, float]]]:
    """Loss, learning rate, images/s, the method's metric and the online probe's score against the epoch.

    Args:
        history: one dict per reported epoch (``epoch`` plus any of ``loss``, ``lr``,
            ``images_per_s`` and ``metric``), in any order; later duplicates of an epoch win.
        metric: the method's metric key (e.g. ``knn_top1``); its ``<metric>_random_init``
            value, when present, is drawn as a dashed reference line.
    Returns:
        ``{key: [(epoch, value), ...]}`` for every panel drawn.
    """
    by_epoch: dict[float, dict] = {}
    for row in history:
        if "epoch" not in row:
            raise ValueError(f"history row without 'epoch': {sorted(row)}")
        by_epoch[float(row["epoch"])] = row
    if not by_epoch:
        raise ValueError("no epochs to plot (empty history)")
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    panels = list(CURVE_PANELS) + ([(metric, metric.replace("_", " "))] if metric else [])
    panels += [(k, f"online probe {k.split('_')[1]}") for k in PROBE_PANELS
               if k != metric and any(k in r for r in rows)]
    series: dict[str, list[tuple[float, float]]] = {}
    for key, _ in panels:
        pts = [(float(r["epoch"]), float(r[key])) for r in rows
               if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        series[key] = pts
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False, layout="constrained",
                             sharex=True)  # one epoch axis, even for a metric evaluated once
    for ax, (key, label) in zip(axes[0], panels):
        pts = series[key]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        else:
            ax.text(0.5, 0.5, "not reported yet", ha="center", va="center", transform=ax.transAxes, color="gray")
        if key == metric:
            base = [r.get(f"{metric}_random_init") for r in rows if r.get(f"{metric}_random_init") is not None]
            if base:
                ax.axhline(float(base[-1]), ls="--", color="gray", label="random init")
                ax.legend(fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, out, options=options)
    return series


# ------------------------------------------------------------------ SwAV prototypes


def prototype_usage(assignments: np.ndarray, num_prototypes: int) -> np.ndarray:
    """(N,) prototype index per image -> (K,) number of images assigned to each prototype."""
    a = np.asarray(assignments, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= num_prototypes):
        raise ValueError(f"assignments must lie in [0, {num_prototypes})")
    return np.bincount(a, minlength=num_prototypes)


def plot_prototype_usage(counts: np.ndarray, out: str, title: str | None = None,
                         options: S3Options | None = None) -> dict:
    """Bar chart of images per prototype, most used first (a collapse shows as one tall bar).

    Returns ``{"used", "total", "effective", "largest_share"}``: prototypes with at least one
    image, all prototypes, exp(entropy) of the usage distribution (the "effective number"
    of prototypes: K when perfectly balanced, 1 when collapsed), and the largest share.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size == 0 or (c < 0).any() or c.sum() <= 0:
        raise ValueError("counts must be a non-empty, non-negative vector with a positive sum")
    p = c / c.sum()
    nz = p[p > 0]
    stats = {"used": int((c > 0).sum()), "total": int(c.size),
             "effective": float(np.exp(-(nz * np.log(nz)).sum())), "largest_share": float(p.max())}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    order = np.sort(c)[::-1]
    ax.bar(np.arange(c.size), order, width=1.0, color="tab:blue")
    ax.axhline(c.sum() / c.size, ls="--", color="gray", lw=1, label="uniform")
    ax.set_xlabel("prototype (sorted by use)")
    ax.set_ylabel("images assigned")
    ax.legend(fontsize=8)
    ax.set_title((title + "\n" if title else "") +
                 f"{stats['used']}/{stats['total']} prototypes used, effective {stats['effective']:.1f}, "
                 f"largest {100 * stats['largest_share']:.1f}% of images", fontsize=9)
    save_figure(fig, out, options=options)
    return stats


# ------------------------------------------------------------------ image grids


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x


def _tile(ax, image, title: str = "", colour: str | None = None, fontsize: int = 7,
          interpolation: str | None = None) -> None:
    ax.imshow(image, interpolation=interpolation)
    ax.set_xticks([])
    ax.set_yticks([])
    if colour:
        for s in ax.spines.values():
            s.set_edgecolor(colour)
            s.set_linewidth(3)
    if title:
        ax.set_title(title, fontsize=fontsize)


def plot_positives_grid(queries: np.ndarray, gallery: np.ndarray, indices: np.ndarray, sims: np.ndarray,
                        out: str, query_labels: Sequence[set] | None = None,
                        gallery_labels: Sequence[set] | None = None, title: str | None = None,
                        options: S3Options | None = None) -> dict:
    """MLS's own visualisation: each query image, then the k queue images chosen as its positives.

    Args:
        queries: uint8 (Q, H, W, 3).
        gallery: uint8 (G, H, W, 3), the images whose keys fill the queue.
        indices: (Q, k) int, gallery rows chosen as positives (top-k of g1 . Q_g), best first.
        sims: (Q, k) float, their cosine similarities.
        query_labels, gallery_labels: optional class-name sets; a positive sharing a class with
            its query is framed green, one sharing none red.
    Returns:
        ``{"k", "queries", "shared_class_fraction"}`` (the last only with labels).
    """
    q, g = _check_images(queries, "queries"), _check_images(gallery, "gallery")
    idx, s = np.asarray(indices), np.asarray(sims, dtype=np.float64)
    if idx.ndim != 2 or idx.shape[0] != len(q) or s.shape != idx.shape:
        raise ValueError(f"indices and sims must be ({len(q)}, k); got {idx.shape} and {s.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= len(g)):
        raise ValueError(f"indices must lie in [0, {len(g)})")
    labelled = query_labels is not None and gallery_labels is not None
    k = idx.shape[1]
    plt = _plt()
    fig, axes = plt.subplots(len(q), k + 1, figsize=(1.25 * (k + 1), 1.4 * len(q)), squeeze=False)
    hits = []
    for r in range(len(q)):
        qtitle = "query" + (f"\n{','.join(sorted(query_labels[r]))}" if labelled else "")
        _tile(axes[r][0], q[r], qtitle, "black")
        for j in range(k):
            colour = None
            if labelled:
                shared = bool(set(query_labels[r]) & set(gallery_labels[idx[r, j]]))
                hits.append(shared)
                colour = "tab:green" if shared else "tab:red"
            _tile(axes[r][j + 1], g[idx[r, j]], f"{s[r, j]:.2f}", colour)
    fig.suptitle((title + ": " if title else "") + f"query, then its top-{k} queue positives (cosine)", fontsize=9)
    save_figure(fig, out, options=options)
    stats = {"k": k, "queries": len(q)}
    if labelled:
        stats["shared_class_fraction"] = float(np.mean(hits)) if hits else float("nan")
    return stats


def top_labels(scores: np.ndarray, class_names: Sequence[str], top: int) -> list[list[tuple[str, float]]]:
    """Per row, the ``top`` classes by score as (name, score), highest first (ties: lower index)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, axis=1, kind="stable")[:, :top]
    return [[(class_names[c], float(s[r, c])) for c in order[r]] for r in range(s.shape[0])]


def plot_cdul_labels(images: np.ndarray, before: np.ndarray, after: np.ndarray, class_names: Sequence[str],
                     out: str, top: int = 3, truth: np.ndarray | None = None, title: str | None = None,
                     captions: Sequence[str] | None = None, options: S3Options | None = None) -> dict:
    """CDUL: sample images with their top pseudo-labels before and after gradient alignment.

    Args:
        images: uint8 (N, H, W, 3).
        before, after: (N, C) soft labels (e.g. CLIP initialisation, and after alignment).
        class_names: C names.
        top: labels listed per image.
        truth: optional (N, C) {0, 1}; labels that are true are marked with a check mark.
        captions: optional N short texts drawn above the images (e.g. the image id).
    Returns:
        ``{"before": [[(name, score)]...], "after": [...], "changed": rows whose top label changed}``.
    """
    x = _check_images(images, "images")
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    n, c = len(x), len(class_names)
    if b.shape != (n, c) or a.shape != (n, c):
        raise ValueError(f"before and after must be ({n}, {c}) for {n} images and {c} class names; "
                         f"got {b.shape} and {a.shape}")
    if truth is not None and np.asarray(truth).shape != (n, c):
        raise ValueError(f"truth must be ({n}, {c}), got {np.asarray(truth).shape}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions must hold {n} texts, got {len(captions)}")
    if not 1 <= top <= c:
        raise ValueError(f"top must be in [1, {c}], got {top}")
    tb, ta = top_labels(b, class_names, top), top_labels(a, class_names, top)
    index = {name: i for i, name in enumerate(class_names)}

    def text(rows, r):
        mark = (lambda name: " \u2713" if truth is not None and truth[r][index[name]] else "")
        return "\n".join(f"{name} {score:.2f}{mark(name)}" for name, score in rows)

    plt = _plt()
    fig, axes = plt.subplots(n, 3, figsize=(5.4, 1.4 * n), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1.0, 1.3, 1.3]})
    for r in range(n):
        # nearest: the pixels as they are (small scenes stay sharp, and the PNG stays small)
        _tile(axes[r][0], x[r], captions[r] if captions is not None else "", interpolation="nearest")
        for col, (name, rows) in enumerate((("before alignment", tb[r]), ("after alignment", ta[r])), start=1):
            ax = axes[r][col]
            ax.axis("off")
            ax.text(0.02, 0.95, text(rows, r), va="top", ha="left", fontsize=8, family="monospace",
                    transform=ax.transAxes)
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, out, dpi=100, options=options)
    changed = [r for r in range(n) if tb[r][0][0] != ta[r][0][0]]
    return {"before": tb, "after": ta, "changed": changed}

"""Pictures a user can look at: training curves, SwAV prototype usage, MLS positives, CDUL labels.

The plotting functions (``figures``) take plain arrays / dicts and write one PNG each
(matplotlib, Agg backend, written atomically); ``tracking`` feeds the curves from a live
run, and ``pictures`` draws the model pictures of ``rayssl viz`` from a checkpoint.
"""

from .figures import (
    plot_cdul_labels,
    plot_positives_grid,
    plot_prototype_usage,
    plot_training_curves,
    save_figure,
)

__all__ = ["plot_cdul_labels", "plot_positives_grid", "plot_prototype_usage", "plot_training_curves", "save_figure"]

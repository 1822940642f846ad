"""The built-in "scenes" dataset: seeded, synthetic multi-object RGB images (see ``generate``)."""

from rayssl.data.scenes.folder import write_image_folder
from rayssl.data.scenes.generate import SPLITS, Scene, epoch_order, generate_batch, generate_scene, scenes_from_range_batch, split_seed
from rayssl.data.scenes.shapes import COLOURS, SHAPES

__all__ = ["COLOURS", "SHAPES", "SPLITS", "Scene", "epoch_order", "generate_batch", "generate_scene", "scenes_from_range_batch",
           "split_seed", "write_image_folder"]

"""A rayssl checkpoint's backbone for torchvision, timm or detectron2 (see ``formats``)."""

from rayssl.export.formats import FORMATS, ExportError, detectron2_key, export_backbone, to_detectron2

__all__ = ["FORMATS", "ExportError", "detectron2_key", "export_backbone", "to_detectron2"]

"""rayssl: self-supervised pretraining of image backbones on Ray."""
__version__ = "0.1.0"

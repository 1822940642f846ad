"""CDUL stage 1: CLIP global-local pseudo-labels (``python -m rayssl.pseudolabel``).

``labels``: the formulas (pure torch); ``clip``: open_clip loading (hub tag or file);
``store``: the label store used in training (its Parquet input: ``rayssl.data.pseudo_labels``);
``job``: the Ray Data job; ``tiny_clip``: a CLIP trained here on generated scenes, for tests
and offline experiments.
"""

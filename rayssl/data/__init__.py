"""Images in, crops out: one job per file.

Where images are (``formats``, ``sources``, ``tar``), what they are labelled (``labels``,
``pseudo_labels``), how one is decoded (``decode``) and cut into crops (``multicrop``,
``photometric``; on the device: ``gpu_augment``, ``ship``), the built-in ``scenes``; the Ray Data
pipelines (``pipeline``, ``indexed``) with their counts (``stats``), how a training worker reads
them (``feed``, ``tensors``), and writing shards (``shards``).
"""

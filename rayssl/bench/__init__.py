"""The throughput benchmark (``python -m rayssl.bench``): the training step alone (``step``), fed by
the real Ray Data pipeline (``pipeline``), the collectives each method adds (``comm``), and the
pipeline's ingest alone; ``run`` puts them together."""

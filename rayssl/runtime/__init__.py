"""Everything that starts Ray or uses Ray Train: ``cluster`` (start or join Ray, what the
cluster holds, the placement rule), ``driver`` (one training run as a TorchTrainer), ``worker``
(the function every Ray Train worker runs: glue around ``rayssl.engine``), ``callbacks``
(metrics recorder, stop on a non-finite loss), ``internals`` (every use of Ray's private APIs,
resume among them) and ``errors`` (Ray-wrapped failures as one line)."""

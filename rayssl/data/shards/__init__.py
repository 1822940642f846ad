"""Writing image shards (WebDataset ``.tar`` or Parquet) in parallel on Ray (see ``write``)."""

from rayssl.data.shards.write import (FORMATS, ShardError, ShardPlan, ShardTask, plan_shards, write_one_shard,
                                      write_planned, write_shards)

__all__ = ["FORMATS", "ShardError", "ShardPlan", "ShardTask", "plan_shards", "write_one_shard", "write_planned",
           "write_shards"]

"""Run under ``torchrun --nproc_per_node 2``: each rank's workers skipped different kinds; the logged
``data/skipped_*`` counts are the run's (``training.dist.summed_counts`` over gloo). Writes the sum each
rank got to argv[1]/rank<r>.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from mmpretrain.config.schema import TrainConfig
from mmpretrain.training.dist import init_distributed, shutdown, summed_counts

info = init_distributed(TrainConfig(device="cpu"))
mine = {"bad_image": 2, "corrupt_shard": 1} if info.rank == 0 else {"bad_image": 3, "empty_caption": 4}
total = summed_counts(mine, info)
Path(sys.argv[1], f"rank{info.rank}.json").write_text(json.dumps(total))
assert dist.is_initialized()
shutdown()

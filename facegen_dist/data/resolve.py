"""Where a config's data lives: a shard folder, or the embedded avatar set (rendered on first use)."""

from __future__ import annotations

from pathlib import Path

from facegen_dist.config import EMBEDDED_PREFIX
from facegen_dist.data.make_avatars import ensure_embedded_avatars


def resolve_data_dir(data_cfg, accelerator) -> Path:
    if not data_cfg.path.startswith(EMBEDDED_PREFIX):
        return Path(data_cfg.path)
    # Each node's first process renders the set if its cache lacks it; the others wait.
    with accelerator.local_main_process_first():
        return ensure_embedded_avatars(
            data_cfg.cache_dir,
            data_cfg.make_num,
            data_cfg.make_size,
            data_cfg.make_seed,
            progress=accelerator.is_local_main_process,
        )

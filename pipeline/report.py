"""Small end-of-stage helpers: peak memory, a summary table, a clean distributed shutdown."""

from __future__ import annotations

import resource
import sys


def peak_memory_mb(device) -> float:
    """On a GPU `device` (the stage's): the peak torch allocated on it. On the CPU: the peak resident set size of this
    process (a CPU stage on a machine with a GPU read the GPU's 0)."""
    import torch

    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def print_table(title: str, rows: dict) -> None:
    """A stage's figures on the console, numbers to 5 significant digits (the manifest keeps them whole)."""
    width = max(len(k) for k in rows)
    print(f"\n== {title} ==")
    for k, v in rows.items():
        # 0.78739, 2759.3, 1e-05, 1.2346e+07 (not 12346000.0); + 0.0: a mean rounded to -0.0 shows as 0, not -0
        shown = f"{v + 0.0:.5g}" if isinstance(v, float) else v
        print(f"  {k.ljust(width)}  {shown}")


def finish_distributed() -> None:
    """Wait for every rank at the end of a stage. The process group itself is torn down by pipeline.run.main_guard,
    once main() has returned and its trainer (and DDP's reducer, which holds the group) is garbage."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    """Tear down the process group: without it a gloo rank can SIGABRT at exit. Call it only
    after every object holding the group is gone: a DDP reducer freed after the group joins a gloo thread forever.
    A process that never imported torch has no group: it is not imported here (3 s of a light stage's start)."""
    import gc

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

"""Process helpers of stage 1 (pair mining and alignment): torch.distributed barrier and gather, and
freeing accelerator memory after a large model (the LLM miner, the aligned encoders)."""

import gc

import torch

from recbole_mm.utils import dist_rank_world as _dist_info


def _barrier():
    import torch.distributed as dist

    if _dist_info()[1] > 1:
        dist.barrier()


def _all_gather_object(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

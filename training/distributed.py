"""torchrun's process group: which rank this is, its device and backend, and the few collectives we need.

Launched by torchrun (RANK and WORLD_SIZE in the environment), `session()` joins the process group: NCCL when
the rank runs on a GPU (cuda:LOCAL_RANK), gloo on the CPU. Started plainly, it is one process and every helper
here does nothing, so the one-process path stays exactly as it was.
"""
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def backend(self):
        return dist.get_backend() if self.distributed else "none"



def pick_device(requested="auto"):
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested} asked for, but CUDA is not available")
    return device

def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(requested, local_rank):
    """Each rank's device under torchrun: cuda:LOCAL_RANK for "auto" (with CUDA) and "cuda", else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK: pass --device cuda or auto, not "
                         f"{requested} (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                         f"start at most that many processes per node")
    return torch.device("cuda", local_rank)


@contextmanager
def session(requested_device="auto"):
    """Yields the Context; under torchrun joins the process group for the duration and leaves it after."""
    if not launched_by_torchrun():
        yield Context(device=pick_device(requested_device))
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = rank_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield Context(device=device, rank=rank, world_size=world, local_rank=local_rank, distributed=True)
    finally:
        dist.destroy_process_group()


def shard_range(count, rank, world_size):
    """(start, end) of rank's contiguous share of `count` rows; the first count % world_size get one more."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def barrier(ctx):
    if ctx.distributed and ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    elif ctx.distributed:
        dist.barrier()


def sum_across_ranks(ctx, values):
    """Element-wise sums of a list of numbers over all ranks (float64)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_json(ctx, value):
    """Every rank's JSON-serialisable `value`, in rank order (sent as UTF-8 bytes: nothing is pickled)."""
    if not ctx.distributed:
        return [value]
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=ctx.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=ctx.device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=ctx.device)
    padded[:len(data)] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(part[:int(size)].tolist()).decode()) for part, size in zip(parts, sizes)]


def check_same_on_all_ranks(ctx, text, what):
    """Raises ValueError unless every rank holds the same `text` (compared by SHA-256)."""
    digests = gather_json(ctx, hashlib.sha256(text.encode()).hexdigest())
    if len(set(digests)) > 1:
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"{what} differs between ranks (ranks {differing} disagree with rank 0): every node must "
                         f"see the same files")


def broadcast_buffers(ctx, module):
    """Rank 0's buffers (batch-norm running statistics) on every rank."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def exit_with_error(error, same_on_every_rank=False):
    """Ends a CLI with "error: ..." and status 1. Under torchrun the message names the rank; an error that every
    rank meets alike (a check of shared input) is printed by rank 0 alone."""
    rank = os.environ.get("RANK") if launched_by_torchrun() else None
    if rank not in (None, "0") and same_on_every_rank:
        raise SystemExit(1)
    raise SystemExit(f"error{f' (rank {rank})' if rank is not None else ''}: {error}")

"""Distributed Data Parallel under ``torchrun``: this process's place, the process group, collectives, sharding.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (and node) and tells each, through
its environment, how many there are (``WORLD_SIZE``), its global rank (``RANK``) and its GPU on the node
(``LOCAL_RANK``). With ``WORLD_SIZE`` > 1, :func:`session` joins the processes in a group (NCCL on CUDA, gloo on
CPU); without torchrun (or with one process) nothing is initialised: the process is rank 0 of a world of 1,
:func:`wrap` leaves the model as it is and the collectives return their input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

T = TypeVar("T")

# The ranks other than 0 wait in a collective while rank 0 validates and writes the epoch's records:
# NCCL's default timeout (10 minutes) would abort them during a long validation.
TIMEOUT = timedelta(hours=1)


def world_size() -> int:
    """The number of training processes: ``WORLD_SIZE`` under torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return world_size() > 1


def rank() -> int:
    """This process's global rank: ``RANK`` under torchrun, else 0. Readable before and after :func:`session`."""
    return int(os.environ["RANK"]) if launched() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that logs, tracks and writes (always true without torchrun)."""
    return rank() == 0


@contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """Under torchrun, be part of the process group for the ``with`` block; yield the device to train on.

    A CUDA ``device`` becomes ``cuda:LOCAL_RANK`` (one GPU per process). The block's normal end waits for every
    rank (so that none leaves the group while rank 0 still writes) and any end leaves the group, errors
    included. Without torchrun: yield ``device`` and do nothing.
    """
    if not launched():
        yield device
        return
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT, device_id=device if cuda else None)
    try:
        yield device
        dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` inside a :func:`session` (it starts
    every rank from rank 0's weights and buffers and averages the gradients over the ranks in each backward),
    else ``model`` itself.

    A model with trainable parameters that take no part in the loss needs ``find_unused_parameters`` (a search
    of the autograd graph at each step), else DDP raises at the next step, naming them. Mask R-CNN needs none:
    torchvision keeps every head in the graph, with zero losses on images without any cell.
    """
    if not dist.is_initialized():
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself outside a :func:`session`."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (every rank passes the same keys), in the order of ``values``; a copy
    outside a :func:`session`."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)  # the ranks' orders may differ
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    summed = dict(zip(keys, total.tolist()))
    return {key: summed[key] for key in values}


class ShardSampler(Sampler[int]):
    """This rank's share of ``num_samples`` indices of ``range(length)`` drawn at random, anew at each pass.

    The indices are ``randperm(length, generator)[:num_samples]``, as torch's ``RandomSampler`` draws them (more
    than ``length``: further permutations follow, each index once per permutation), so that every rank, seeding
    ``generator`` alike, draws the same ones; rank ``rank`` of ``world`` takes every ``world``-th from the
    ``rank``-th, after the last ``num_samples % world`` are dropped so that each rank gets
    ``num_samples // world``. The shards are disjoint and a world of 1 takes all ``num_samples``.
    """

    def __init__(self, length: int, num_samples: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        self.length, self.generator, self.rank, self.world = length, generator, rank, world
        self.per_rank = num_samples // world

    def __iter__(self) -> Iterator[int]:
        wanted = self.per_rank * self.world
        permutations = max(1, -(-wanted // self.length)) if self.length else 1
        drawn = torch.cat([torch.randperm(self.length, generator=self.generator) for _ in range(permutations)])
        return iter(drawn[:wanted][self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank

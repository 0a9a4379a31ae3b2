"""The order in which training examples are visited: deterministic, sharded, resumable.

Epoch e visits the examples in a permutation drawn from `seed + e`, cut into global batches of
`per_device * world_size` examples; process r takes its slice of each global batch. So one process
with batch 4 sees, per step, exactly the examples that two processes with batch 2 see together, and
a position (epoch, batch index) is all a resumed run needs to continue where it stopped.

Validation visits every example once, in order, each process its share (`eval_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_batches(
    n_examples: int, per_device: int, world_size: int, rank: int, seed: int, epoch: int
) -> list[list[int]]:
    """This process's example indices, one list per global batch, for one epoch.

    With several processes a trailing incomplete global batch is dropped, so that every process
    takes the same number of steps; one process keeps it.
    """
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    global_size = per_device * world_size
    batches = []
    for start in range(0, n_examples, global_size):
        chunk = order[start : start + global_size]
        if len(chunk) < global_size and world_size > 1:
            break
        batches.append(chunk[rank * per_device : (rank + 1) * per_device] if world_size > 1 else chunk)
    return batches


def batches_from(
    position: tuple[int, int], n_examples: int, per_device: int, world_size: int, rank: int, seed: int
) -> Iterator[tuple[tuple[int, int], list[int]]]:
    """Endless (position after this batch, indices) from `position` = (epoch, batch index) on."""
    epoch, index = position
    while True:
        batches = epoch_batches(n_examples, per_device, world_size, rank, seed, epoch)
        for i in range(index, len(batches)):
            yield (epoch, i + 1), batches[i]
        epoch, index = epoch + 1, 0


def batches_per_epoch(n_examples: int, per_device: int, world_size: int) -> int:
    """How many batches `epoch_batches` yields (a trailing partial batch counts on one process only)."""
    if world_size > 1:
        return n_examples // (per_device * world_size)
    return -(-n_examples // per_device)


def eval_batches(n_examples: int, per_device: int, world_size: int, rank: int) -> list[tuple[list[int], bool]]:
    """This process's validation batches as (example indices, counted): every `world_size`-th example from `rank`
    on, `per_device` at a time, so the processes see every example once between them. Every process gets as many
    batches (a sharded model's forward is a collective); one whose share runs out first repeats its first example
    (or the first one) in a batch that is not counted."""
    mine = list(range(rank, n_examples, world_size))
    share = -(-n_examples // world_size)  # the largest process's share
    return [(mine[i : i + per_device] or mine[:1] or [0], i < len(mine)) for i in range(0, share, per_device)]

"""Every process's random number streams (Python's, torch's, CUDA's), saved in a checkpoint so that a resumed
run draws what the uninterrupted one would have: each process restores its own stream (one entry per rank)."""

from __future__ import annotations

import random

import torch

from lopt.parallel import distributed


def rng_state() -> dict:
    """This process's streams."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (CUDA's only where there is CUDA)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every process's `rng_state`, indexed by rank (every process calls it: a collective)."""
    if distributed.world_size() == 1:
        return [rng_state()]
    states = [None] * distributed.world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states

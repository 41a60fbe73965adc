"""torch's global RNG state (CPU, and every CUDA device once CUDA is initialised), as
saved in checkpoints so that shuffling and sampling resume where they stopped."""
from __future__ import annotations

import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

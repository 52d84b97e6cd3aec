"""The global random generators: seeding repeats the draws, and a saved state (through a weights-only
checkpoint) replays them."""

import random

import numpy as np
import torch

from metaquant.rng import rng_state, seed_everything, set_rng_state


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_seeding_repeats_the_draws_of_every_generator():
    seed_everything(1)
    first = _draws()
    seed_everything(1)
    assert _draws() == first
    seed_everything(2)
    assert _draws() != first


def test_a_state_saved_in_a_weights_only_checkpoint_replays_every_generator(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    drawn = _draws()
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= set(saved)
    set_rng_state(saved)
    assert _draws() == drawn

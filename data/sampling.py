"""Which dataset items each rank reads, in which order, batch by batch.

Train: one permutation per epoch derived from (seed, epoch); the first floor(N / (B*W)) * B * W items
are dealt round-robin to the W ranks, so every rank gets the same number of full batches and the tail is
dropped. Val: contiguous, nearly equal blocks in file order, so every image is read exactly once over
all ranks (no padding duplicates, no dropped tail); the last batch of a rank may be short.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The train order of `epoch`: the same on every rank and every restart."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def train_batches(num_items: int, batch_size: int, rank: int, world_size: int, seed: int,
                  epoch: int) -> list[np.ndarray]:
    """This rank's batches (arrays of dataset indices) for one train epoch."""
    per_rank = num_items // (batch_size * world_size) * batch_size
    order = epoch_permutation(num_items, seed, epoch)[: per_rank * world_size]
    mine = order[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


def val_batches(num_items: int, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's batches for evaluation: its contiguous block of the file list, last batch short."""
    mine = np.array_split(np.arange(num_items), world_size)[rank]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

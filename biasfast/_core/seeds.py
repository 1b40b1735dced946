"""One seed-keying rule: a random stream depends only on (seed, key...), never on the order things ran in, so a
resumed run, a sharded run and an uninterrupted run draw the same numbers."""

from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _part(part: int | str) -> int:
    if isinstance(part, str):  # a stable hash (Python's hash() of a str changes between processes)
        return int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")
    return part & _MASK64


def seed_for(seed: int, *key: int | str) -> int:
    """A 63-bit seed that depends only on `seed` and the parts of `key` (ints or stream names), chained through
    splitmix64 (a counter-based mix, so a device can compute the same keys without a host round trip)."""
    value = _splitmix64(seed & _MASK64)
    for part in key:
        value = _splitmix64(value ^ _part(part))
    return value >> 1


def generator_for(seed: int, *key: int | str) -> torch.Generator:
    """A CPU generator seeded with `seed_for(seed, *key)`."""
    return torch.Generator().manual_seed(seed_for(seed, *key))

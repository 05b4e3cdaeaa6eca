"""Seeds derived from (run seed, outer step, tags): every random draw of a run is a pure function of them.

A CPU run is repeatable, a resumed run draws exactly what the uninterrupted one would have, and one
simulated fine-tuning can be recomputed (or moved to another process) from its seed alone.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings (strings hashed with CRC-32)."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence([abs(i) for i in ints]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive(*parts))


def rng(*parts: int | str) -> np.random.Generator:
    return np.random.default_rng(derive(*parts))

"""Uniform draws keyed by sample: a counter-based generator, vectorised over a batch.

A sample's augmentation parameters are a fixed function of its key (``folder.sample_seed``: the
run's seed, the epoch and the sample's index) and of a column number: column c of key k is
SplitMix64's output function of ``mix(k) + (c + 1) * golden_gamma`` (SplitMix64's own sequence
from the state ``mix(k)``). So a whole batch draws every parameter of every sample in a few
numpy operations, and a sample's values depend on nothing but its key: not on the worker that
loads it, the batch it lands in, or where a resumed run starts.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["KEY_LIMIT", "new_key", "uniforms"]

KEY_LIMIT = 2 ** 63 - 1  # keys are non-negative int64
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S11 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(11)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of 64-bit words), wrapping arithmetic."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """(N, count) float64 uniforms in [0, 1): row i is key i's columns 0 to count - 1."""
    state = _mix(np.asarray(keys, dtype=np.int64).reshape(-1, 1).astype(np.uint64))
    counters = np.arange(1, count + 1, dtype=np.uint64) * _GAMMA
    return (_mix(state + counters) >> _S11).astype(np.float64) * 2.0 ** -53


def new_key() -> int:
    """A key from torch's CPU generator, for a sample drawn without one (``torch.manual_seed``
    then makes it reproducible)."""
    return int(torch.randint(0, KEY_LIMIT, ()))

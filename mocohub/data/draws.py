"""torch's random draws, computed in Python from one look at the generator's state.

A view's parameters take about 20 single-number draws from torch's CPU generator
(``RandomResizedCrop.get_params``, the coins, ``ColorJitter.get_params``...); each is a torch call
of a few microseconds, more than the rest of a 32 px view costs. The CPU generator is an MT19937:
``Words`` reads its state once (``torch.get_rng_state``), computes the next 32-bit outputs with
numpy, and lets the stages draw from them what torch's kernels would draw (``rand``, ``uniform``,
``randint``, ``randperm``), then advances torch's generator by exactly the words used. The values
are those the torch calls give, bit for bit; ``fast_draws_available`` checks it once per process
against the torch calls themselves (the float32 ``uniform_`` arithmetic is fused on some CPU
capabilities and not on others, so both forms are tried), and the callers fall back to the torch
calls if anything differs (another generator layout, another torch version's kernels).
"""
from __future__ import annotations

import struct
import threading

import numpy as np
import torch

__all__ = ["Words", "fast_draws_available", "f32"]

_N, _M = 624, 397
_STATE_BYTES = 24 + 8 * _N  # THGeneratorState: seed (u64), left (i32), seeded (i32), next (u64), state[624] (u64)
_LOW24 = 0xFFFFFF
_2M24 = 2.0 ** -24
_PACK = struct.Struct("f")
_pack, _unpack = _PACK.pack, _PACK.unpack
_BOUNDS: dict[tuple[float, float], tuple[float, float]] = {}  # (low, high) -> float32 low, float32 span


def f32(value: float) -> float:
    """``value`` rounded to float32 (round to nearest even), as a Python float."""
    return _unpack(_pack(value))[0]


_U = np.uint64  # numpy scalars as operands: Python ints would be converted at every operation
_UPPER, _LOWER, _MATRIX, _ONE = _U(0x80000000), _U(0x7FFFFFFF), _U(0x9908B0DF), _U(1)
_B, _C = _U(0x9D2C5680), _U(0xEFC60000)
_S1, _S7, _S11, _S15, _S18 = _U(1), _U(7), _U(11), _U(15), _U(18)


def _temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> _S11)
    y ^= (y << _S7) & _B
    y ^= (y << _S15) & _C
    y ^= y >> _S18
    return y


def _twisted_head(mt: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` (<= 227) words of the state after MT19937's regeneration of ``mt``:
    word i depends only on the old words i, i + 1 and i + 397 while i < 227."""
    y = (mt[:count] & _UPPER) | (mt[1:count + 1] & _LOWER)
    out = mt[_M:_M + count] ^ (y >> _S1)
    out ^= (y & _ONE) * _MATRIX
    return out


def _peek(count: int) -> list[int]:
    """The next ``count`` (<= 227) outputs of torch's default CPU generator, not drawn."""
    raw = torch.get_rng_state().numpy()
    mt = raw[24:_STATE_BYTES].view(np.uint64)  # the words, one per uint64 slot
    pos = _N + 1 - int.from_bytes(raw[8:12].tobytes(), "little", signed=True)  # from `left`: see below
    # torch regenerates the state when `left` counts down to 0; the next word is state[625 - left]
    if pos >= _N:
        ahead = _twisted_head(mt, count)
    elif pos + count <= _N:
        ahead = mt[pos:pos + count]
    else:
        ahead = np.concatenate([mt[pos:], _twisted_head(mt, count - (_N - pos))])
    return _temper(ahead).tolist()


_LOCAL = threading.local()  # per-thread scratch tensors


class Words:
    """The generator's next outputs, drawn one by one as torch's CPU kernels draw them.

    ``Words(n)`` reads ahead ``n`` words; ``commit()`` advances torch's generator past the ones
    used, so the generator ends where the torch calls would have left it.
    """

    __slots__ = ("words", "used")
    fused: bool = True  # float32 uniform_ as x * (to - from) + from in one rounding (set by the self-check)

    def __init__(self, count: int):
        self.words, self.used = _peek(count), 0

    def word(self) -> int:
        w = self.words[self.used]
        self.used += 1
        return w

    def rand(self) -> float:
        """``torch.rand(1).item()``."""
        w = self.words[self.used]
        self.used += 1
        return (w & _LOW24) * _2M24

    def uniform(self, low: float, high: float) -> float:
        """``torch.empty(1).uniform_(low, high).item()`` (float32 arithmetic)."""
        x = (self.words[self.used] & _LOW24) * _2M24
        self.used += 1
        bounds = _BOUNDS.get((low, high))
        if bounds is None:
            low32 = f32(low)
            bounds = _BOUNDS[low, high] = (low32, f32(f32(high) - low32))
        low32, span = bounds
        if Words.fused:
            return _unpack(_pack(x * span + low32))[0]
        return _unpack(_pack(_unpack(_pack(x * span))[0] + low32))[0]

    def randint(self, high: int) -> int:
        """``torch.randint(0, high, (1,)).item()`` for a small ``high`` (image sizes; larger ranges draw otherwise)."""
        return self.word() % high

    def randperm4(self) -> list[int]:
        """``torch.randperm(4).tolist()``: Fisher-Yates, one word per swap."""
        order = [0, 1, 2, 3]
        for i in range(3):
            z = self.word() % (4 - i) + i
            order[i], order[z] = order[z], order[i]
        return order

    def commit(self) -> None:
        """Advance torch's generator past the words used (one 32-bit word per float32 draw)."""
        if self.used:
            buffer = getattr(_LOCAL, "advance", None)
            if buffer is None or len(buffer) < self.used:
                buffer = _LOCAL.advance = torch.empty(max(256, self.used))
            buffer[:self.used].uniform_()


def exp32(value: float) -> float:
    """``torch.exp`` of a float32 scalar (its vectorised exp, not the C library's, which differs
    in the last bit about once in a hundred), through a one-element buffer per thread."""
    buffer = getattr(_LOCAL, "exp", None)
    if buffer is None:
        buffer = _LOCAL.exp = torch.empty(1)
    return buffer.fill_(value).exp_().item()


_CHECKED: bool | None = None


def fast_draws_available() -> bool:
    """Whether ``Words`` reproduces this process's torch draws exactly (checked once, on a fixed
    seed, leaving the global generator as it was)."""
    global _CHECKED
    if _CHECKED is None:
        _CHECKED = _self_check()
    return _CHECKED


def _draw_uniforms(count: int) -> list[float]:
    got = []
    while len(got) < count:  # several reads, across a regeneration of the 624-word state
        words = Words(100)
        got.extend(words.uniform(0.6, 1.4) for _ in range(100))
        words.commit()
    return got[:count]


def _seed(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed reseeds CUDA's


def _self_check() -> bool:
    with torch.random.fork_rng(devices=()):
        try:
            for seed in (0, 12345, 2**40 + 7):
                _seed(seed)
                ref = torch.empty(700).uniform_(0.6, 1.4).tolist()
                matches = {}
                for fused in (True, False):
                    Words.fused = fused
                    _seed(seed)
                    matches[fused] = _draw_uniforms(len(ref)) == ref
                if not any(matches.values()):
                    return False
                Words.fused = matches[True]
                _seed(seed)
                ref_mixed = [torch.randint(0, 37, (1,)).item(), torch.randperm(4).tolist(), torch.rand(1).item(),
                             torch.randint(0, 60000, (1,)).item(), torch.empty(1).uniform_(-0.1, 0.1).item()]
                state = torch.get_rng_state()
                _seed(seed)
                words = Words(16)
                mine = [words.randint(37), words.randperm4(), words.rand(), words.randint(60000),
                        words.uniform(-0.1, 0.1)]
                words.commit()
                if mine != ref_mixed or not torch.equal(torch.get_rng_state(), state):
                    return False
            return True
        except Exception:  # noqa: BLE001 - any surprise in torch's internals: use the torch calls
            return False

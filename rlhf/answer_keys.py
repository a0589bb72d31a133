"""Counter-based random numbers for sampling: each answer's draws depend on its key alone.

A ``torch.Generator`` shared by a batch hands its numbers out by row, so an answer's tokens depend on the batch
it was sampled in, on its row and on which process sampled it: two processes (or a batch size of 32 instead of
64) give other answers than one. Here answer ``i`` of the stream seeded ``(s1, s2, ...)`` has the key
``hash(s1, s2, ..., i)``, and its token at step ``t`` is drawn by inverting the cumulative distribution at

    u = hash(key, t) in (0, 1)

(the first token whose cumulative probability exceeds u; a token of probability 0 is never drawn). So the same
prompts with the same keys give the same answers on any number of processes and in any batch, and a resumed run
(on another number of processes too) samples what the uninterrupted one would have.

The hash is Wellons's ``lowbias32`` on 32-bit integers kept in int64 tensors (multiplications split so no
intermediate overflows): one number per answer and step, element-wise on the device, no Python loop over rows or
tokens. A step costs a cumulative sum over the vocabulary, as ``torch.multinomial`` does.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """(x * c) mod 2**32 for 32-bit x and c, with every intermediate below 2**49."""
    hi, lo = c >> 16, c & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """lowbias32: a bijection of 32-bit integers whose output bits each depend on every input bit."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine(key: torch.Tensor | int, value: torch.Tensor | int) -> torch.Tensor | int:
    """The key of ``value`` under ``key``: a tensor of 32-bit values, or an int of 64 bits, either sign (its two
    32-bit halves are hashed in turn, so -1 and 0, or 2**32 and the parts (0, 1), give different keys)."""
    if isinstance(value, int):
        return _combine32(_combine32(key, value & _MASK), (value >> 32) & _MASK)
    return _combine32(key, value)


def _combine32(key: torch.Tensor | int, value: torch.Tensor | int) -> torch.Tensor | int:
    return mix32(key ^ mix32(value + _GOLDEN))


def uniform(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform number in (0, 1) per row, float64 (B,): row b's from (keys[b], step) alone."""
    return (combine(keys, torch.full_like(keys, step)).double() + 0.5) * 2.0**-32


def sample(probs: torch.Tensor, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row (B,) from ``probs`` (B, V), by inverting each row's cumulative distribution (float64) at
    its number for ``step``."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    target = uniform(keys, step)[:, None] * cdf[:, -1:]  # (B, 1), below the row's total
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


class AnswerStream:
    """Keys of a stream of answers: answer ``i`` of ``AnswerStream(*seed)`` has the key ``hash(*seed, i)``.

    ``take(n)`` hands out the next n answers' keys (an evaluation's batches in turn); ``keys(index)`` those of given
    answer numbers (an iteration's rows, wherever they are sampled). ``manual_seed`` restarts the stream."""

    def __init__(self, *seed: int) -> None:
        self.manual_seed(*seed)

    def manual_seed(self, *seed: int) -> AnswerStream:
        self.root, self.next_index = 0x2545F491, 0
        for part in seed:
            self.root = combine(self.root, int(part))
        return self

    def keys(self, index: torch.Tensor) -> torch.Tensor:
        """The keys (B,) int64 of answers number ``index`` (B,)."""
        return combine(torch.full_like(index, self.root, dtype=torch.int64), index.to(torch.int64))

    def take(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The next ``n`` answers' keys (n,)."""
        index = torch.arange(self.next_index, self.next_index + n, device=device)
        self.next_index += n
        return self.keys(index)

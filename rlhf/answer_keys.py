"""Counter-based random numbers for sampling: each answer's draws depend on its key alone.

A ``torch.Generator`` shared by a batch hands its numbers out by row, so an answer's tokens depend on the batch
it was sampled in, on its row and on which process sampled it: two processes (or a batch size of 32 instead of
64) give other answers than one. Here answer ``i`` of the stream seeded ``(s1, s2, ...)`` has the key
``hash(s1, s2, ..., i)``, and its token at step ``t`` is drawn with the uniform numbers

    u[v] = hash(key, t, v)   for every vocabulary entry v

through the exponential race (the Gumbel-max trick): ``argmax_v p[v] / -log u[v]`` is distributed as ``p``. So
the same prompts with the same keys give the same answers on any number of processes, in any batch, and a
resumed run (on another number of processes too) samples what the uninterrupted one would have.

The hash is Wellons's ``lowbias32`` on 32-bit integers kept in int64 tensors (multiplications split so no
intermediate overflows), element-wise on the device: no Python loop over rows or tokens.
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
    """The key of ``value`` (an int or a tensor of them, any sign and size) under ``key``."""
    if isinstance(value, int):
        value = (value & _MASK) ^ ((value >> 32) & _MASK)
    return mix32(key ^ mix32(value + _GOLDEN))


def uniform(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), float32 (B, V): entry v of row b from (keys[b], step, v) alone."""
    per_step = combine(keys, step)[:, None]  # (B, 1)
    entries = mix32(torch.arange(vocab, device=keys.device, dtype=torch.int64) + _GOLDEN)  # (V,)
    bits = mix32(per_step ^ entries)  # (B, V)
    return ((bits >> 9).float() + 0.5) * 2.0**-23  # the top 23 bits, centred: exact in float32, never 0 or 1


def sample(probs: torch.Tensor, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row (B,) from ``probs`` (B, V): the exponential race with the rows' numbers at ``step``."""
    race = -torch.log(uniform(keys, step, probs.shape[-1]))  # (B, V) Exp(1)
    return (probs / race).argmax(-1)


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

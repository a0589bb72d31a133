"""The rollout batch with everything an on-policy update needs, computed once per batch under no_grad."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .rollout import Samples


@dataclass
class Experience:
    """A rollout batch and its experience.

    All (B, R) tensors are aligned with the answer tokens; ``mask`` is 1 up to and including EOS.
    Critic-free methods leave ``old_values`` and ``returns`` empty.
    """

    samples: Samples
    mask: torch.Tensor  # (B, R)
    old_logp: torch.Tensor  # (B, R) log pi_old(y_t)
    ref_logp: torch.Tensor  # (B, R) log pi_ref(y_t)
    scores: torch.Tensor  # (B,)   reward-model score as used (shifted, penalised, normalised)
    advantages: torch.Tensor  # (B, R) per token (a sequence's advantage repeated on its tokens for critic-free methods)
    old_values: torch.Tensor | None = None  # (B, R) V(x, y_<t)
    returns: torch.Tensor | None = None  # (B, R) value targets

    def __getitem__(self, idx) -> Experience:
        tensors = (None if (t := getattr(self, f.name)) is None else t[idx] for f in fields(self)[1:])
        return Experience(self.samples[idx], *tensors)

    def trimmed(self) -> Experience:
        """Without the padding every row shares (:meth:`Samples.trimmed`): what an update's forwards run on."""
        samples = self.samples.trimmed()
        width = samples.response_ids.shape[1]
        cut = lambda t: t if t is None or t.dim() == 1 else t[:, :width]  # noqa: E731
        return Experience(samples, *(cut(getattr(self, f.name)) for f in fields(self)[1:]))

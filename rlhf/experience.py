"""The rollout batch with everything an on-policy update needs, computed once per batch under no_grad."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from accelerate.utils import pad_across_processes

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
    engine_logp: torch.Tensor | None = None  # (B, R) log mu(y_t) of the rollout engine where it is not the trainer

    def __getitem__(self, idx) -> Experience:
        tensors = (None if (t := getattr(self, f.name)) is None else t[idx] for f in fields(self)[1:])
        return Experience(self.samples[idx], *tensors)

    def trimmed(self) -> Experience:
        """Without the padding every row shares (:meth:`Samples.trimmed`): what an update's forwards run on."""
        samples = self.samples.trimmed()
        width = samples.response_ids.shape[1]
        cut = lambda t: t if t is None or t.dim() == 1 else t[:, :width]  # noqa: E731
        return Experience(samples, *(cut(getattr(self, f.name)) for f in fields(self)[1:]))


def every_process(samples: Samples, per_row: dict[str, torch.Tensor], accelerator, pad_id: int):
    """Every process's rollout rows and their per-row tensors (``per_row``: (B,) or (B, R) aligned with the answers),
    laid end to end in process order on every process: each samples a contiguous block of the iteration's answers,
    so this is the iteration's batch as one process would have sampled it. Prompts are left-padded and answers
    right-padded to the widest process's first (positions come from the masks, so padding changes no forward).
    Advantages, whitening and statistics then see the whole batch, and every process the same numbers."""

    def gather(t: torch.Tensor | None, pad: float = 0, left: bool = False) -> torch.Tensor | None:
        if t is None:
            return None
        dtype = t.dtype
        t = t.long() if dtype == torch.bool else t  # gloo gathers no bool
        if t.dim() == 2:
            t = pad_across_processes(t, dim=1, pad_index=pad, pad_first=left)
        return accelerator.gather(t).to(dtype)

    s = samples
    everyone = Samples(
        gather(s.prompt_ids, pad_id, left=True),
        gather(s.prompt_mask, 0, left=True),
        gather(s.response_ids, pad_id),
        gather(s.response_mask),
        gather(s.ended),
        gather(s.logprobs),
        gather(s.engine_logprobs),
    )
    return everyone, {k: gather(v) for k, v in per_row.items()}

"""The promotion gate of a campaign round: the challenger replaces the champion only on held-out evidence.

Promote when both hold:

    gain - z * se(gain) > 0        gain: the challenger's paired per-prompt gain over the champion (the objective's
                                   reward: gold where the task has one, else the proxy), se: its standard error
    KL(challenger || SFT) <= budget   on the challenger's held-out answers, nats

Otherwise the challenger is rejected with the first rule it failed as the reason (a value that is not finite, or a
comparison on one prompt, which has no standard error, fails first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    evidence: dict  # the numbers the decision read, as the version's tags carry them


def gain_kind(objective: str) -> str:
    """The reward a gate compares on: gold for an objective on the gold reward, else proxy."""
    return "gold" if "gold" in objective else "proxy"


def decide(metrics: dict, kind: str, z: float, kl_budget: float) -> Decision:
    """The gate on a comparison's metrics (``eval/<kind>_gain``, ``..._se``, ``eval/kl``)."""
    gain, se, kl = metrics[f"eval/{kind}_gain"], metrics[f"eval/{kind}_gain_se"], metrics["eval/kl"]
    evidence = {
        f"gate.{kind}_gain": gain,
        f"gate.{kind}_gain_se": se,
        "gate.z": z,
        "gate.kl_to_sft": kl,
        "gate.kl_budget": kl_budget,
        f"gate.win_rate_{kind}": metrics.get(f"eval/win_rate_{kind}", float("nan")),
    }
    if not all(math.isfinite(v) for v in (gain, se, kl)):  # a diverged model: never promoted
        return Decision(False, f"not finite: {kind} gain {gain}, SE {se}, KL {kl}", evidence)
    if metrics.get("eval/n_prompts", 2) < 2:
        return Decision(False, "one held-out prompt has no standard error: raise eval.n_prompts", evidence)
    if not gain - z * se > 0:
        why = f"{kind} gain {gain:+.4f} (SE {se:.4f}) does not clear {z:g} standard errors over the champion"
        return Decision(False, why, evidence)
    if not kl <= kl_budget:
        return Decision(False, f"KL to SFT {kl:.3f} nats exceeds the budget of {kl_budget:g}", evidence)
    return Decision(
        True, f"{kind} gain {gain:+.4f} clears {z:g} SE ({se:.4f}); KL to SFT {kl:.3f} within {kl_budget:g}", evidence
    )

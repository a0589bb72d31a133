"""The over-optimisation guard: which held-out checkpoint an on-policy stage keeps, and when it stops training.

It never sees gold. At each held-out evaluation, checkpoints within ``guard_kl_budget`` (held-out KL to the
reference) are eligible; among them it keeps the best ``eval_guard_score`` (``guard=conservative|both``) or the
latest (``guard=kl``). Training stops after ``guard_patience`` evaluations without a better eligible checkpoint
(one past the budget counts as none); with ``guard_patience=0`` it runs to the end. The kept checkpoint is the
stage's model.
"""

from __future__ import annotations

GUARD_DIR = "guard_best"  # the checkpoint the guard keeps (a stage folder's)


class Guard:
    """The guard's rule (``cfg``: an :class:`~rlhf.config_training.OnPolicyConfig`) and its memory, ``state`` (plain
    data: it goes into checkpoints)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.state = {"best": None, "iteration": None, "since": 0, "stopped": None}

    @property
    def on(self) -> bool:
        return self.cfg.guard != "none"

    @property
    def stopped(self) -> bool:
        return self.state["stopped"] is not None

    def keeps(self, held_out: dict, iteration: int) -> bool:
        """After an evaluation (``eval_kl``, ``eval_guard_score``): True if this iteration's checkpoint is now the kept
        one; counts towards stopping otherwise."""
        cfg, g = self.cfg, self.state
        within = cfg.guard_kl_budget is None or held_out["eval_kl"] <= cfg.guard_kl_budget
        score = held_out["eval_guard_score"] if cfg.guard in ("conservative", "both") else float(iteration)
        if within and (g["best"] is None or score > g["best"]):
            g.update(best=score, iteration=iteration, since=0)
            return True
        g["since"] += 1
        if cfg.guard_patience and g["since"] >= cfg.guard_patience:
            g["stopped"] = iteration
        return False

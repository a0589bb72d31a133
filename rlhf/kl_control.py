"""KL coefficient controllers for PPO (Ziegler et al. 2019, section 2.2)."""

from __future__ import annotations


class FixedKLController:
    """beta stays at its configured value."""

    def __init__(self, beta: float) -> None:
        self.value = beta

    def update(self, current_kl: float, n_samples: int) -> None:
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Proportional control of beta toward a target KL.

    e      = clip(KL / target - 1, -0.2, 0.2)
    beta  <- beta * (1 + e * n_samples / horizon)
    """

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def make_controller(beta: float, adaptive: bool, target: float, horizon: int) -> FixedKLController:
    return AdaptiveKLController(beta, target, horizon) if adaptive else FixedKLController(beta)

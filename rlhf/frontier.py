"""Over-optimisation curves of Gao et al. (2022), "Scaling laws for reward model overoptimization".

With d = sqrt(KL(policy || initial policy)) and R the reward gained over the initial policy:

    best-of-n:  R(d) = d (alpha - beta d)
    RL:         R(d) = d (alpha - beta ln d)

Both are linear in (alpha, beta), so :func:`fit` is ordinary least squares on the columns (d, -d^2) or
(d, -d ln d) (with 0 ln 0 = 0), through the origin: no gain at no distance. For the gold reward the
curve peaks at d* (best-of-n: alpha / (2 beta); RL: exp(alpha / beta - 1)); past it the policy is
over-optimising the proxy. R^2 is 1 - SS_res / SS_tot around the mean of R.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMS = ("rl", "bon")


def _columns(form: str, d: torch.Tensor) -> torch.Tensor:
    if form == "bon":
        return torch.stack([d, -d * d], 1)
    d_ln_d = torch.where(d > 0, d * torch.log(d.clamp(min=1e-12)), torch.zeros_like(d))
    return torch.stack([d, -d_ln_d], 1)


@dataclass(frozen=True)
class Fit:
    form: str  # rl | bon
    alpha: float
    beta: float
    r2: float
    n_points: int

    @property
    def d_star(self) -> float:
        """Where the curve peaks (inf when it never turns: beta <= 0)."""
        if self.beta <= 0:
            return math.inf
        return self.alpha / (2 * self.beta) if self.form == "bon" else math.exp(min(self.alpha / self.beta - 1, 700))

    def predict(self, d) -> torch.Tensor:
        d = torch.as_tensor(d, dtype=torch.float64)
        return _columns(self.form, d.reshape(-1)) @ torch.tensor([self.alpha, self.beta], dtype=torch.float64)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_alpha": self.alpha,
            f"{prefix}_beta": self.beta,
            f"{prefix}_r2": self.r2,
            f"{prefix}_d_star": self.d_star if math.isfinite(self.d_star) else -1.0,
        }


def fit(form: str, d, gain) -> Fit:
    """Least-squares (alpha, beta) of ``form`` (rl | bon) through the points (d_i, gain_i)."""
    d, gain = (
        torch.as_tensor(d, dtype=torch.float64).reshape(-1),
        torch.as_tensor(gain, dtype=torch.float64).reshape(-1),
    )
    if form not in FORMS or len(d) < 2:
        raise ValueError(f"fit needs form in {FORMS} and at least 2 points (got {form!r}, {len(d)})")
    x = _columns(form, d)
    coef = torch.linalg.lstsq(x, gain[:, None]).solution[:, 0]
    residual = gain - x @ coef
    total = ((gain - gain.mean()) ** 2).sum()
    r2 = float(1 - (residual**2).sum() / total) if total > 0 else 0.0
    return Fit(form, float(coef[0]), float(coef[1]), r2, len(d))


def distance(kl) -> torch.Tensor:
    """d = sqrt(KL), a negative KL estimate (k1 on few samples) counted as 0."""
    return torch.as_tensor(kl, dtype=torch.float64).clamp(min=0).sqrt()


def figure(points: dict[str, tuple[list, list]], fits: dict[str, Fit], title: str, xlabel: str = "d = sqrt(KL to SFT)"):
    """Reward gains against d, one series per name, each with its fitted curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, (d, gain)) in enumerate(points.items()):
        color = f"C{i}"
        ax.scatter(d, gain, color=color, label=name, s=18)
        if name in fits:
            f = fits[name]
            grid = torch.linspace(0, max(max(d, default=0) * 1.1, 1e-3), 100)
            ax.plot(
                grid,
                f.predict(grid),
                color=color,
                lw=1,
                label=f"{f.form} fit: a={f.alpha:.3g} b={f.beta:.3g} R2={f.r2:.2f}"
                + (f" d*={f.d_star:.2f}" if math.isfinite(f.d_star) else ""),
            )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward gain over SFT")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig

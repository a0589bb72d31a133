"""Best-of-n stage: n answers from the SFT policy, the reward model picks one; no training.

The "policy" is a sampler: for each prompt, sample n answers from SFT and keep the one the reward model
scores highest (under the scoring rule of every stage: raw score minus the missing-EOS penalty). The eval
stage samples it through :func:`sample`. Its KL to SFT has a closed form for continuous rewards
(Stiennon et al. 2020; Gao et al. 2022):

    KL(best-of-n || SFT) = log n - (n - 1) / n

logged as ``eval/kl_analytic`` beside the sampled estimate ``eval/kl``: for the chosen answer y*,
log pi_bon(y*) / pi_sft(y*) = log n + (n - 1) log F(r(y*)), with F the SFT answers' score CDF at the
prompt, estimated from a second pool of n SFT answers by the plus-one rank (#{pool <= r*} + 1) / (n + 1)
(Beirami et al. 2024 show the closed form is an upper bound: the estimate may sit below it).
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..algorithms import PolicyInputs
from ..config import ModelConfig
from ..config_algorithms import BestOfNConfig
from ..context import StageContext
from ..rollout import Samples


def analytic_kl(n: int) -> float:
    """KL(best-of-n || SFT) = log n - (n - 1) / n for a continuous reward (0 for n = 1)."""
    return math.log(n) - (n - 1) / n


def candidate_seed(eval_seed: int, seed: int) -> int:
    """The seed of the candidates' stream: derived from (eval.seed, algo.seed) by a hash, so it never equals the seed
    of the SFT answers the eval stage compares them with (eval.seed), whatever the two settings."""
    digest = hashlib.sha256(f"best_of_n/{eval_seed}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _select(candidates: Samples, scores: torch.Tensor, n: int) -> tuple[Samples, torch.Tensor]:
    """The best of each prompt's n consecutive candidates, and its score."""
    best = scores.view(-1, n).argmax(1) + torch.arange(
        0, len(scores), n, device=scores.device
    )  # (G,) rows of the winners
    return candidates[best], scores[best]


@torch.no_grad()
def sample(env, prompt_ids: list[list[int]], args: dict) -> tuple[list[Samples], torch.Tensor, dict]:
    """The eval stage's sampler (:data:`rlhf.stages.evaluate.Sampler`): best-of-n answers to ``prompt_ids``,
    the sampled KL estimate per answer, and ``eval/kl_analytic``."""
    n = args["n"]
    env.stream.manual_seed(candidate_seed(env.cfg.seed, args.get("seed", 0)))
    group = max(1, env.cfg.sampling.batch_size // n)  # prompts per generation batch, n candidates each
    answers, kls = [], []
    for i in range(0, len(prompt_ids), group):
        repeated = [p for p in prompt_ids[i : i + group] for _ in range(n)]
        candidates = env.sample_batch(env.sft, repeated)
        chosen, best = _select(candidates, env.score(candidates), n)
        answers.append(chosen)
        if n == 1:  # an SFT answer from the candidates' own stream: KL 0, and no second draw
            kls.append(torch.zeros(len(best)))
            continue
        pool = env.score(env.sample_batch(env.sft, repeated)).view(-1, n)
        below = (pool <= best[:, None]).float().sum(1)  # (G,)
        kls.append((math.log(n) + (n - 1) * torch.log((below + 1) / (n + 1))).cpu())
    return answers, torch.cat(kls), {"eval/kl_analytic": analytic_kl(n), "eval/best_of_n": n}


def run(cfg: BestOfNConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    """Nothing to train: the record names the SFT model and n, which the eval stage samples with :func:`sample`."""
    ctx.sink.log_metrics({"best_of_n/n": cfg.n, "best_of_n/kl_analytic": analytic_kl(cfg.n)}, 0)
    return {
        "model_path": inputs.sft_path,
        "sampler_args": {"n": cfg.n, "seed": cfg.seed},
        "metrics": {"best_of_n/kl_analytic": analytic_kl(cfg.n)},
        "steps": 0,
    }

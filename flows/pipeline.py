"""The command line of the pipeline.

    python -m flows.pipeline [hydra overrides]      (also the console script ``rlhf-pipeline``)
    rlhf_pipeline(load_config([...overrides]))     (tests, benchmarks: flows.dag's flow, flows.compose's config)

A run whose every stage is already cached is answered here, from the stage keys and the persisted results,
without starting Prefect or loading a model (:mod:`flows.cached`); the rest goes to the Prefect flow.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from flows.compose import CONF_DIR, to_container
from rlhf.validate import validate


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra app: compose, validate (fails before any training), run the flow; returns the objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flows.sweep import sweep_id_for

    logging.getLogger("httpx").setLevel(logging.WARNING)
    container = to_container(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        container["sweep_id"] = container.get("sweep_id") or sweep_id_for(hydra_cfg.sweep.dir)
        container["sweep_member"] = hydra_cfg.job.num
    cfg = validate(container)
    objective = cfg.objective_metric()  # a wrong objective fails here, before any training
    if cfg.runtime.node_rank > 0:  # another machine of a multi-machine run: it joins machine 0's training stages
        from flows.follow import follow

        follow(cfg)
        return 0.0
    from flows.cached import cached_run

    result = cached_run(cfg)
    if result is None:
        from flows.dag import rlhf_pipeline
        from rlhf.preemption import Preempted

        try:
            result = rlhf_pipeline(container)
        except Preempted as stopped:  # a stop signal mid-stage: say so and exit as a signalled process does
            print(stopped, flush=True)
            sys.exit(stopped.exit_code)
    m = result["metrics"]
    print("\n".join(f"{k:28s} {v:.4f}" for k, v in sorted(m.items())))
    return float(m[objective])


if __name__ == "__main__":
    main()

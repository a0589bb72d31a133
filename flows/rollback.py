"""Move the registry alias ``champion`` back to an earlier policy version, recording who and why.

    python -m flows.rollback VERSION --reason TEXT [--by NAME] [hydra overrides]

The overrides are the campaign's (``tracking.*``, ``paths.root``): they say which MLflow store and which
registered policy. The next campaign round starts from the version rolled back to.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m flows.rollback", description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="the policy version the alias champion moves to")
    parser.add_argument("--reason", required=True, help="why (kept in the version's tags)")
    parser.add_argument("--by", default=None, help="who (default: this user)")
    args, overrides = parser.parse_known_args(argv)
    from mlflow.tracking import MlflowClient

    from flows.compose import load_config
    from rlhf.champion import rollback
    from rlhf.preflight import preflight
    from rlhf.validate import validate

    cfg = validate(load_config(overrides))
    name = cfg.tracking.policy_model_name
    done = rollback(MlflowClient(preflight(cfg)), name, args.version, args.reason, args.by)
    print(f"{name}@champion is version {done['version']} (was {done['rollback.from']}): {args.reason}")
    return done


if __name__ == "__main__":
    main(sys.argv[1:])

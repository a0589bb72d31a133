"""Manifests for one pipeline run on several machines under Kubernetes (``deploy/kubernetes-multinode.yaml.j2``).

    python -m flows.multinode --name rlhf-7b --nodes 4 --gpus-per-node 8 --image <image> [options] -- <overrides>
        | kubectl apply -f -

An Indexed Job with one pod per machine (its completion index is ``runtime.node_rank``) and a headless Service
that names pod 0 for the torchrun rendezvous. The pipeline's overrides are validated first, as a run on machine 0
would take them: a bad override fails here, not on the cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes-multinode.yaml.j2"


def render(overrides: list[str], **values) -> str:
    """The manifests (YAML, two documents) for ``values`` (the template's placeholders) and the pipeline overrides."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(TEMPLATE.read_text()).render(overrides=overrides, **values)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--name", required=True, help="the Job's and Service's name (a DNS label: lower case, digits, -)")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--nodes", type=int, required=True, help="machines (pods, one per machine)")
    ap.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per machine: processes per machine")
    ap.add_argument("--image", required=True, help="an image with this project installed (a CUDA base image)")
    ap.add_argument("--port", type=int, default=29400, help="the rendezvous port on pod 0")
    ap.add_argument("--rlhf-home", default="/rlhf", help="where every pod mounts the shared volume (paths.root)")
    ap.add_argument("--rlhf-home-claim", default="rlhf-home", help="its ReadWriteMany PersistentVolumeClaim")
    ap.add_argument(
        "--tracking-uri", default="http://mlflow.mlflow.svc:5000", help="the MLflow server every pod reaches"
    )
    ap.add_argument("--cpu", default="32", help="CPU request per pod")
    ap.add_argument("--memory", default="512Gi", help="memory request and limit per pod")
    ap.add_argument("--termination-grace-s", type=int, default=600, help="seconds to finish a step after SIGTERM")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the pipeline (after --)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from flows.compose import load_config
    from rlhf.validate import validate

    placement = [f"runtime.num_machines={args.nodes}", f"runtime.num_processes={args.gpus_per_node}"]
    placement.append(f"runtime.rdzv_endpoint={args.name}-0.{args.name}:{args.port}")
    validate(load_config([*args.overrides, *placement]))  # what machine 0 will compose, before anything is applied
    values = {k: v for k, v in vars(args).items() if k != "overrides"}
    sys.stdout.write(render(args.overrides, **values))


if __name__ == "__main__":
    main()

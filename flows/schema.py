"""The config schema in Hydra's ConfigStore: the dataclasses of rlhf/config.py (and each algorithm's) are
the base of the primary config and of the ``algo`` options, so they hold every default, a YAML option
holds only what it changes, a key that is in the schema can be overridden without ``+``, and ``--help``
lists every field with its type, default and help text.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from hydra.core.config_store import ConfigStore

from rlhf.algorithms import registry
from rlhf.config import DispatchConfig, PipelineConfig

SCHEMA = "pipeline_schema"  # the primary config's base (conf/config.yaml's first default)


def algo_schema(name: str) -> str:
    """The ConfigStore name of an algorithm's schema in the ``algo`` group (conf/algo/<name>.yaml's first default)."""
    return f"{name}_schema"


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} | null"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else "???"


def field_lines(cls: type, prefix: str, nested: bool = True) -> list[str]:
    """``key: type = default`` and the help text for every field of ``cls``; nested dataclasses are
    flattened (or left out with ``nested=False``)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += field_lines(tp, key + ".") if nested else []
            continue
        if f.name == "algo" and tp is typing.Any:  # the algo group's schema: listed per algorithm
            continue
        bounds = ", ".join(f"{k} {v}" for k, v in f.metadata.items() if k != "help")
        lines.append(
            f"  {key}: {_type_name(tp)} = {_default(f)!r}\n      {f.metadata.get('help', '')}"
            + (f" [{bounds}]" if bounds else "")
        )
    return lines


def config_groups(conf_dir: Path) -> str:
    """``group: option, ...`` for every group folder of ``conf/`` (the schemas in the ConfigStore are no options)."""
    return "\n".join(
        f"{d.name}: {', '.join(sorted(p.stem for p in d.glob('*.yaml')))}"
        for d in sorted(conf_dir.iterdir())
        if d.is_dir()
    )


def help_template(conf_dir: Path) -> str:
    """Hydra's help page: the config groups, then every field of the schema with its type, default and help."""
    hints = typing.get_type_hints(PipelineConfig)
    sections = [
        f"-- {f.name} --\n" + "\n".join(field_lines(hints[f.name], f"{f.name}."))
        for f in dataclasses.fields(PipelineConfig)
        if dataclasses.is_dataclass(hints[f.name])
    ]
    sections += [f"-- algo={name} --\n" + "\n".join(field_lines(a.schema, "algo.")) for name, a in registry().items()]
    sections.append("-- top level --\n" + "\n".join(field_lines(PipelineConfig, "", nested=False)))
    # Hydra reads the template through OmegaConf (${...} interpolates, \\${ is a literal) and then string.Template ($$
    # is a literal $).
    body = "\n\n".join(sections).replace("$", "$$").replace("${", "\\${")
    return (
        "rlhf-pipeline: data -> SFT -> reward model -> policy ("
        + " | ".join(registry())
        + ") -> held-out eval, as a cached "
        "Prefect flow tracked in MLflow.\n\nUsage: python -m flows.pipeline [group=option ...] [key=value ...] (-m: a "
        "sweep; "
        "--cfg job: the composed config)\n\n== Config groups (group=option) ==\n" + config_groups(conf_dir) + "\n\n"
        "== Every field: key: type = default ==\n" + body + "\n\n== Hydra ==\n$FLAGS_HELP"
    )


def register(conf_dir: Path) -> None:
    """Store the primary schema, each algorithm's schema and the generated help (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA, node=PipelineConfig)
    cs.store(name="dispatch_schema", node=DispatchConfig, package="dispatch")  # conf/deploy.yaml's
    for name, algorithm in registry().items():
        cs.store(group="algo", name=algo_schema(name), node=algorithm.schema)
    cs.store(
        group="hydra/help",
        name="rlhf",
        node={"app_name": "rlhf-pipeline", "header": "", "footer": "", "template": help_template(conf_dir)},
    )

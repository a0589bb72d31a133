"""mkdocs hook: the pages that come from the code and from the measurements, built at every `mkdocs build`.

A page writes a macro where generated content goes:

    {{ report methods }}                             a benchmark's report, rendered from benchmarks/results/methods.json
    {{ value compile_cpu runs ours update_s .3f }}   one number of a results JSON (its keys, then a format spec)
    {{ metrics_reference }}                          the metric reference: docs/metrics.yaml
    {{ config_reference }}                           every config field: the schema's dataclasses
    {{ config_groups }}                              the config groups and their options: conf/'s folders
    {{ memory_table }}                               weights and optimizer memory per stage, from parameter counts
    {{ layout }}                                     the packages and modules, with the first line of each docstring

so no measured number is typed into prose (tests/test_docs.py checks) and no list of fields or metrics is
kept by hand beside the code. The benchmarks' figures are added to the site from benchmarks/results/.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"
MACRO = re.compile(r"\{\{\s*(\w+)([^}]*)\}\}")


def _reports() -> dict:
    """Each results JSON's report renderer: the function its benchmark writes the ``.md`` with."""
    if str(PROJECT) not in sys.path:  # `mkdocs build` from anywhere: the renderers live in benchmarks/, beside rlhf/
        sys.path.insert(0, str(PROJECT))
    from benchmarks import campaign, default_run, methods, reward_hacking, rollout_engines, scale, throughput
    from benchmarks import compile as compile_bench

    return {
        "default_run": default_run.markdown,
        "methods": lambda d: methods.markdown(d["methods"], d["best_of_n"], d["meta"]),
        "throughput_cpu": throughput.markdown,
        "compile_cpu": compile_bench.markdown,
        "scale_cpu": scale.markdown,
        "rollout_engines_cpu": rollout_engines.markdown,
        "overoptimisation": reward_hacking.overoptimisation_markdown,
        "ensembles": reward_hacking.ensembles_markdown,
        "beta_sweep": reward_hacking.beta_sweep_markdown,
        "campaign": campaign.markdown,
    }


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def report(name: str) -> str:
    """The benchmark's report from its JSON, its headings two levels down (it sits in a section of a page)."""
    text = _reports()[name](load(name))
    return re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", text, flags=re.M)


def value(name: str, *path_and_spec: str) -> str:
    """One number (or string) of a results JSON: the keys down to it (a list's index as a number), then a format
    spec."""
    *path, spec = path_and_spec
    node = load(name)
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return format(node, spec)


def metrics_reference() -> str:
    """docs/metrics.yaml as tables, one per group."""
    import yaml

    groups = yaml.safe_load((PROJECT / "docs" / "metrics.yaml").read_text())
    out = []
    for group, entries in groups.items():
        out += [f"### {group}", "", "| metric | meaning |", "|---|---|"]
        out += [f"| `{name}` | {meaning} |" for name, meaning in entries.items()]
        out.append("")
    return "\n".join(out)


def config_reference() -> str:
    """Every field of the schema (rlhf/config*.py, each algorithm's too): key, type, default, bounds and help."""
    import dataclasses
    import typing

    from flows.schema import _default, _type_name
    from rlhf.algorithms import registry
    from rlhf.config import PipelineConfig

    def rows(cls: type, prefix: str) -> list[str]:
        hints, lines = typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines += rows(tp, f"{prefix}{f.name}.")
            elif not (f.name == "algo" and tp is typing.Any):
                bounds = ", ".join(f"{k} {v}" for k, v in f.metadata.items() if k != "help")
                default = repr(_default(f)).replace("|", "\\|")
                text = f.metadata.get("help", "").replace("|", "\\|") + (f" [{bounds}]" if bounds else "")
                lines.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{default}` | {text} |")
        return lines

    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(PipelineConfig)
    out = []
    for f in dataclasses.fields(PipelineConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [f"### {f.name}", "", *head, *rows(hints[f.name], f"{f.name}."), ""]
    for name, algorithm in registry().items():
        out += [f"### algo={name}", "", *head, *rows(algorithm.schema, "algo."), ""]
    top = [r for r in rows(PipelineConfig, "") if r.count("`") >= 2 and "." not in r.split("`")[1]]
    return "\n".join([*out, "### top level", "", *head, *top, ""])


def config_groups() -> str:
    """Each config group of conf/ and its options, from the folders."""
    groups = sorted(d for d in (PROJECT / "conf").iterdir() if d.is_dir())
    return "\n".join(f"- `{d.name}/`: " + ", ".join(f"`{p.stem}`" for p in sorted(d.glob("*.yaml"))) for d in groups)


HUB_PARAMETERS = {"gpt2": 124_439_808, "Qwen2.5-0.5B": 494_032_768}  # the published models' parameter counts
BYTES = {
    "SFT": (1, 0),
    "reward": (1, 0),
    "DPO (reference freed before training)": (1, 0),
    "PPO (policy + value trained, reference + reward frozen)": (2, 2),
}  # (trained, frozen) copies of the weights


def memory_table() -> str:
    """Weights and AdamW state per stage, from parameter counts: 16 bytes per trained parameter (fp32 weights,
    gradients,
    two moments), 4 per frozen one; PPO under LoRA holds each base once, frozen (adapters negligible). Before
    activations."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from rlhf.config import ModelConfig
    from rlhf.settings import from_dict
    from rlhf.tiny import model_config

    counts = dict(HUB_PARAMETERS)
    for name in ("qwen2_450m", "llama_400m"):  # built from a config: counted on the meta device, nothing allocated
        cfg = from_dict(
            ModelConfig, OmegaConf.to_container(OmegaConf.load(PROJECT / "conf" / "model" / f"{name}.yaml"))
        )
        with torch.device("meta"):
            counts[name] = sum(
                p.numel()
                for p in AutoModelForCausalLM.from_config(model_config(cfg, cfg.vocab_size, 0, 1)).parameters()
            )
    gb = lambda n, trained, frozen: f"{n * (16 * trained + 4 * frozen) / 1e9:.1f} GB"  # noqa: E731
    out = ["| model (params) | " + " | ".join(BYTES) + " | PPO with `lora_r=16` |", "|---|" + "---|" * (len(BYTES) + 1)]
    out += [
        f"| {name} ({n / 1e6:.0f} M) | " + " | ".join(gb(n, *b) for b in BYTES.values()) + f" | {gb(n, 0, 2)} |"
        for name, n in counts.items()
    ]
    return "\n".join(out)


LAYERS = {
    "conf": "Hydra option files, one group per concern (only what an option changes): what runs",
    "flows": "the Prefect flows: in which order the stages run",
    "tasks": "one Prefect task per stage: how a stage is cached, tracked and placed",
    "rlhf": "the ML, importable without Prefect: how the math works",
    "rlhf/stages": "one module per stage: `run(...) -> record`",
    "benchmarks": "measurements against the peers; results/ holds what they measured",
    "tests": "the test suite (`make test`)",
}


def layout() -> str:
    """Each package's modules with the first line of their docstring: the layout, read from the code."""
    import ast

    out = []
    for folder, what in LAYERS.items():
        out += [f"### `{folder}/`: {what}", ""]
        for path in sorted((PROJECT / folder).glob("*.py")) if folder != "conf" else []:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if path.name != "__init__.py" or doc:
                out.append(f"- `{path.name}`: {doc.splitlines()[0] if doc else ''}")
        out.append("")
    return "\n".join(out)


MACROS = {
    "report": report,
    "value": value,
    "metrics_reference": metrics_reference,
    "config_reference": config_reference,
    "config_groups": config_groups,
    "memory_table": memory_table,
    "layout": layout,
}


def expand(markdown: str) -> str:
    """Every macro of a page replaced by what it stands for."""
    return MACRO.sub(lambda m: MACROS[m.group(1)](*shlex.split(m.group(2))), markdown)


# ---- mkdocs events ---------------------------------------------------------------------------------
def on_page_markdown(markdown: str, page, config, files) -> str:
    return expand(markdown)


def on_files(files, config):
    """The benchmarks' figures, which the reports show, beside the pages."""
    from mkdocs.structure.files import File

    for png in sorted(RESULTS.glob("*.png")):
        files.append(File(png.name, str(RESULTS), config["site_dir"], config["use_directory_urls"]))
    return files

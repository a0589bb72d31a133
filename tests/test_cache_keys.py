"""Cache keys hash the code a stage really runs: every project module its entry module imports, transitively,
and the versions of the packages they import; editing any of them re-runs that stage, editing anything else
re-runs nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import code_version as cv
from rlhf.algorithms import registry
from tasks.keys import STAGE_MODULES, entry_module

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "tasks", "flows")
STAGES = (*STAGE_MODULES, *registry())


def copy_project(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(PROJECT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT / "conf", dest / "conf")
    return dest


def versions(root: Path) -> dict[str, str]:
    """Each stage's code version, computed afresh from the files (an edit keeps the graph: closures stay cached)."""
    cv.code_version.cache_clear()
    return {stage: cv.code_version(entry_module(stage), root) for stage in STAGES}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_editing_a_module_changes_exactly_the_keys_of_the_stages_that_import_it(tmp_path):
    root = copy_project(tmp_path)
    before = versions(root)
    imported_by = {stage: set(cv.closure(entry_module(stage), root)[0]) for stage in STAGES}
    modules = sorted(path for package in PACKAGES for path in root.glob(f"{package}/**/*.py"))
    unused = []
    for path in modules:
        name = module_name(path, root)
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        after = versions(root)
        path.write_text(original)
        changed = {s for s in STAGES if after[s] != before[s]}
        assert changed == {s for s in STAGES if name in imported_by[s]}, name
        if not changed:
            unused.append(name)
    assert versions(root) == before
    # the test covers both sides: modules some stage runs, and modules no stage runs (which change nothing)
    assert (
        "rlhf.stats" in imported_by["eval"]
        and "rlhf.chat" in imported_by["sft"]
        and "rlhf.kl_control" in imported_by["rloo"]
    )
    assert "rlhf.frontier" in imported_by["grpo"] and "rlhf.reward_report" in imported_by["reward"]
    assert {"rlhf.tracking", "tasks.runner", "flows.dag"} <= set(unused), (
        unused
    )  # how a stage is tracked and ordered, not what it computes


def test_the_static_graph_holds_every_module_a_stage_loads(tmp_path):
    """What importing a stage's module really loads is in its key (nothing reached by a route the graph misses)."""
    entries = sorted({entry_module(stage) for stage in STAGES})
    # one process: the project's modules are dropped between entries, the packages (torch, ...) stay loaded
    script = f"""
import json, sys, importlib
ours = lambda: {{n for n in sys.modules if n.split('.')[0] in {PACKAGES!r}}}
loaded = {{}}
for m in sys.argv[1:]:
    for n in ours():
        del sys.modules[n]
    importlib.import_module(m)
    loaded[m] = sorted(ours())
print(json.dumps(loaded))
"""
    out = subprocess.run(
        [sys.executable, "-c", script, *entries], cwd=PROJECT, capture_output=True, text=True, timeout=300, check=True
    )
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert sorted(loaded) == entries
    for entry, modules in loaded.items():
        assert entry in modules and set(modules) <= set(cv.closure(entry)[0]), (
            entry,
            set(modules) - set(cv.closure(entry)[0]),
        )


def test_a_package_upgrade_changes_every_key_that_uses_the_package(monkeypatch):
    before = versions(cv.PROJECT_ROOT)
    real = cv.metadata.version
    monkeypatch.setattr(cv.metadata, "version", lambda dist: "99.0" if dist == "datasets" else real(dist))
    after = versions(cv.PROJECT_ROOT)
    uses_datasets = {s for s in STAGES if "datasets" in cv.closure(entry_module(s))[1]}
    assert "data" in uses_datasets and "best_of_n" not in uses_datasets
    assert {s for s in STAGES if after[s] != before[s]} == uses_datasets
    monkeypatch.undo()
    versions(cv.PROJECT_ROOT)


@pytest.mark.slow
def test_editing_stats_in_a_copy_reruns_eval_and_only_the_stages_that_import_it(tmp_path):
    """The keys a fresh process computes in a copy of the project, before and after an edit of rlhf/stats.py."""
    root = copy_project(tmp_path / "copy")
    script = (
        "import json, rlhf; from flows.compose import load_config; from rlhf.validate import validate; "
        "from tasks.keys import pipeline_keys; print(rlhf.__file__); "
        "print(json.dumps(pipeline_keys(validate(load_config(['algo=ppo'])))))"
    )

    def keys() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        *_, where, printed = out.stdout.splitlines()
        assert where == str(root / "rlhf" / "__init__.py")  # the copy's code, not the checkout's
        return json.loads(printed)

    before = keys()
    stats = root / "rlhf" / "stats.py"
    stats.write_text(stats.read_text().replace("def mean_se", "def mean_se  ", 1))  # a real edit of the code
    after = keys()
    assert {s for s in before if before[s] != after[s]} == {"reward", "ppo", "eval"}  # data and SFT stay cached


def test_the_rollout_engine_keys_the_stages_that_sample_and_its_memory_settings_key_nothing():
    from flows.compose import load_config
    from rlhf.validate import validate
    from tasks.keys import pipeline_keys

    keys = lambda *o: pipeline_keys(validate(load_config(["algo=ppo", "model.n_head=4", *o])))  # noqa: E731
    base, vllm = keys(), keys("rollout.engine=hf")
    assert {s for s in base if base[s] != vllm[s]} == {"ppo", "eval"}  # auto -> hf: another engine's answers
    assert keys("rollout.gpu_memory_utilization=0.9", "rollout.sleep=false", "rollout.sync_check_tol=0.1") == base
    dpo = pipeline_keys(validate(load_config(["rollout.engine=hf"])))
    assert {s for s, k in pipeline_keys(validate(load_config([]))).items() if dpo[s] != k} == {
        "eval"
    }  # dpo samples not

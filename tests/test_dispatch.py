"""Placement config and deployment definitions (no servers: the loopback test is tests/test_deployments.py)."""

import json
import re
from pathlib import Path

import pytest

from flows.compose import load_config
from flows.deploy import base_job_template, load_deploy_config
from rlhf.settings import ConfigError
from rlhf.validate import validate
from tasks.keys import pipeline_keys

PROJECT = Path(__file__).resolve().parents[1]


def test_placement_never_changes_a_cache_key():
    local = pipeline_keys(validate(load_config(["dispatch=local"])))
    pools = pipeline_keys(validate(load_config(["dispatch=pools", "dispatch.stages=[dpo]"])))
    assert local == pools


@pytest.mark.parametrize(
    "override, field",
    [
        ("dispatch.stages=[sft,eval]", "dispatch.stages"),
        ("dispatch.deployment=gpu", "dispatch.deployment"),
        ("dispatch.mode=ray", "dispatch.mode"),
        ("dispatch.poll_s=0", "dispatch.poll_s"),
    ],
)
def test_bad_placement_names_the_field_and_the_fix(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        validate(load_config(["dispatch=pools", override]))
    assert "Fix:" in str(err.value)


def test_deploy_config_names_the_stage_deployment_of_the_pipeline_config():
    cfg = load_deploy_config()
    assert cfg["dispatch"]["deployment"] == validate(load_config(["dispatch=pools"])).dispatch.deployment
    assert cfg["concurrency"] == {"tag": "gpu", "limit": 1}
    assert cfg["pipeline"]["base_overrides"] == ["dispatch=pools"]
    assert cfg["pipeline"]["schedule"]["cron"] == "0 2 * * *"


def test_kubernetes_gpu_template_declares_every_placeholder_it_uses():
    path = PROJECT / "deploy" / "kubernetes-gpu-job-template.json"
    template = base_job_template({"type": "kubernetes", "base_job_template": str(path)}, "gpu")
    used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used - declared == set()
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"


def test_a_cluster_pool_without_a_template_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"pools.gpu.base_job_template.*get-default-base-job-template"):
        base_job_template({"type": "kubernetes", "base_job_template": None}, "gpu")
    with pytest.raises(ConfigError, match="does not exist"):
        base_job_template({"type": "kubernetes", "base_job_template": "/nope.json"}, "gpu")
    assert "job_configuration" in base_job_template({"type": "process", "base_job_template": None}, "cpu")


def test_dispatch_without_a_server_or_a_deployment_fails_before_training(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.dispatch import check_stage_deployment

    dispatch = validate(load_config(["dispatch=pools"])).dispatch
    with pytest.raises(ConfigError, match="no-such/deployment.*does not exist.*make deploy"):
        check_stage_deployment(
            validate(load_config(["dispatch=pools", "dispatch.deployment=no-such/deployment"])).dispatch
        )
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ConfigError, match="PREFECT_API_URL is not set.*dispatch=local"):
            check_stage_deployment(dispatch)

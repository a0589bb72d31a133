"""The policy a team serves: the registry alias ``champion`` of the registered policy, moved only by the gate of
a campaign round (:mod:`rlhf.gate`) or by a person's ``rollback``.

Every move leaves its evidence in the version's tags: a promoted version carries the gate's numbers and the
round that promoted it; a rejected one ``rejected`` with the reason; a rollback says from which version, by whom
and why. MLflow 3 replaced registry stages with aliases, so ``models:/<name>@champion`` is what serving loads.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .gate import Decision
from .settings import ConfigError

ALIAS = "champion"


def champion_version(client: MlflowClient, name: str):
    """The version the alias names, or None (no campaign has promoted one yet); a tracking server's error raises
    (it must not read as "no champion")."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def campaign_champion(client: MlflowClient, name: str, campaign: str):
    """The champion a round of ``campaign`` starts from: the alias's version, which this campaign promoted (or a
    person rolled back to); None before any. Another campaign's champion is refused: each campaign needs a
    registered policy of its own."""
    version = champion_version(client, name)
    if version is None or version.tags.get("campaign") == campaign or "rollback.by" in version.tags:
        return version
    raise ConfigError(
        f"{name}@{ALIAS} is version {version.version}, promoted by campaign {version.tags.get('campaign')!r} or by "
        f"hand, not by campaign {campaign!r}. Fix: give each campaign its own registered policy "
        f"(tracking.policy_model_name=rlhf-policy-{campaign}), or roll back to a version this campaign made."
    )


def _tags(values: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in values.items()}


def record_decision(
    client: MlflowClient, name: str, version: str, decision: Decision, context: dict, faced: str | None
) -> Decision:
    """Tag ``version`` with the gate's evidence; move the alias to it when the decision promotes it and the alias
    still names ``faced``, the champion the challenger was compared with (a rollback during the round stands).
    Returns the decision as recorded."""
    current = champion_version(client, name)
    now = str(current.version) if current else None
    if decision.promote and now != faced:
        why = f"the alias moved to {now or 'none'} during the round (it faced {faced or 'SFT'}): a rollback stands"
        decision = Decision(False, why, decision.evidence)
    tags = {**decision.evidence, **context, "gate.reason": decision.reason}
    tags["gate.decision"] = "promoted" if decision.promote else "rejected"
    if decision.promote:
        tags["gate.previous_champion"] = now or "none"
    else:
        tags["rejected"] = decision.reason
    for key, value in _tags(tags).items():
        client.set_model_version_tag(name, version, key, value)
    if decision.promote:
        client.set_registered_model_alias(name, ALIAS, version)
    return decision


def rollback(client: MlflowClient, name: str, to_version: str, reason: str, by: str | None = None) -> dict:
    """Move the alias back to ``to_version`` and record who and why on both versions."""
    try:
        target = client.get_model_version(name, str(to_version))
    except MlflowException:
        raise ConfigError(
            f"{name} has no version {to_version}. Fix: pick one from `mlflow` UI's Models page or "
            f"MlflowClient().search_model_versions(\"name='{name}'\")."
        ) from None
    current = champion_version(client, name)
    record = {
        "rollback.from": str(current.version) if current else "none",
        "rollback.by": by or getpass.getuser(),
        "rollback.reason": reason,
        "rollback.at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for key, value in record.items():
        client.set_model_version_tag(name, target.version, key, value)
    if current and current.version != target.version:
        client.set_model_version_tag(name, current.version, "rolled_back", f"to {target.version}: {reason}")
    client.set_registered_model_alias(name, ALIAS, target.version)
    return {"name": name, "version": str(target.version), **record}

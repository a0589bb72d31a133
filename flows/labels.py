"""Hand labelled comparisons to a campaign: check them, put them in its inbox, tell Prefect they arrived.

    python -m flows.labels FILE.jsonl [hydra overrides]      e.g. campaign.name=nightly

Every line is checked first (a malformed one fails naming the line and the fix, and nothing is copied). The file
lands in the campaign's inbox (``campaign.inbox``), where the next round takes it; with a Prefect server
(``PREFECT_API_URL``) the event ``rlhf.labels.arrived`` is emitted for the resource ``rlhf.campaign.<name>``,
which starts a round of the deployment ``rlhf-campaign/labels`` (``make deploy``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

EVENT = "rlhf.labels.arrived"


def resource_id(campaign: str) -> str:
    return f"rlhf.campaign.{campaign}"


def import_labels(path: Path, cfg) -> tuple[Path, int]:
    """Copy the checked file into the inbox as ``<name>.jsonl`` (never over another file); where it landed and how
    many comparisons it holds."""
    from rlhf.labellers import read_labelled
    from rlhf.settings import ConfigError
    from tasks.campaign import inbox_dir

    if not path.is_file():
        raise ConfigError(f"{path} is not a file. Fix: pass the JSONL file of labelled comparisons.")
    rows = read_labelled(path, conversational=cfg.data.format == "conversational")
    if not rows:
        raise ConfigError(f"{path} holds no labelled comparison. Fix: one JSON object per line.")
    inbox = inbox_dir(cfg.campaign, cfg.paths.root)
    inbox.mkdir(parents=True, exist_ok=True)
    target, n = inbox / f"{path.stem}.jsonl", 1
    while target.exists():
        target, n = inbox / f"{path.stem}-{n}.jsonl", n + 1
    shutil.copyfile(path, target.with_suffix(".partial"))
    target.with_suffix(".partial").rename(target)  # whole, or not there: a round never reads half a file
    return target, len(rows)


def emit_arrived(campaign: str, target: Path, n_rows: int) -> bool:
    """The labels-arrived event, when a Prefect server is configured (else nothing: the next round finds them);
    an event that could not be sent fails (the labels stay in the inbox for the next round)."""
    import tasks  # noqa: F401  (Prefect's defaults, before Prefect is imported)

    # isort: split
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    event = emit_event(
        EVENT, resource={"prefect.resource.id": resource_id(campaign)}, payload={"file": target.name, "rows": n_rows}
    )
    _, unsent = EventsWorker.drain_all(timeout=30)  # sent before this process exits
    if event is None or unsent:
        raise ConnectionError(
            f"the labels are in {target.parent}, but the event {EVENT} did not reach {PREFECT_API_URL.value()}. "
            f"Fix: check the Prefect server; the campaign's next round takes the file either way."
        )
    return True


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    from flows.compose import load_config
    from rlhf.validate import validate

    cfg = validate(load_config(argv[1:]))
    target, n_rows = import_labels(Path(argv[0]), cfg)
    told = emit_arrived(cfg.campaign.name, target, n_rows)
    print(f"{n_rows} labelled comparisons in {target}" + (f"; event {EVENT} sent" if told else ""))


if __name__ == "__main__":
    from rlhf.data import DatasetError
    from rlhf.settings import ConfigError

    try:
        main(sys.argv[1:])
    except (DatasetError, ConfigError) as err:  # a bad file or setting: its message names the line and the fix
        sys.exit(f"flows.labels: {err}")

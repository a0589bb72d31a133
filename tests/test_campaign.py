"""Continuous alignment: a 3-round micro campaign (labels, reward model, challenger, paired comparison and the
gate's decision per round), its re-run Cached, a worse challenger rejected with the reason, a rollback, and
labels dropped in the inbox picked up by the next round."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from .conftest import micro_overrides
from .test_docs import CAMPAIGN_GROUP, ROUND_GROUP, check_reference, reference, unmatched

pytestmark = pytest.mark.slow
CAMPAIGN = ["experiment=micro_campaign", "campaign.gate_z=0"]


def run_campaign(root, *extra):
    from flows.campaign import rlhf_campaign
    from flows.compose import load_config

    return rlhf_campaign(load_config(micro_overrides(root, *CAMPAIGN, *extra)))


def round_runs(client: MlflowClient, campaign_run_id: str) -> list:
    runs = client.search_runs(
        [client.get_run(campaign_run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{campaign_run_id}'"
    )
    return sorted(runs, key=lambda r: int(r.data.tags["campaign.round"]))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("campaign")
    return root, run_campaign(root)


def test_three_rounds_each_label_retrain_compare_and_decide(campaign):
    root, result = campaign
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    reward_keys, store_digests = set(), set()
    for r in rounds:
        assert r["n_labels"] > 0  # the champion's answers, labelled by the simulated annotators
        m = r["metrics"]
        for name in ("eval/gold_gain", "eval/gold_gain_se", "eval/win_rate_gold", "eval/kl"):
            assert name in m
        assert m["eval/gold_gain_se"] > 0
        version = client.get_model_version("rlhf-policy", r["challenger_version"])
        assert version.tags["gate.decision"] == ("promoted" if r["promoted"] else "rejected")
        assert version.tags["campaign.round"] == str(r["round"])
        clears = m["eval/gold_gain"] > 0 and m["eval/kl"] <= 5.0  # gate_z=0, the default KL budget
        assert r["promoted"] == clears
        if not r["promoted"]:
            assert version.tags["rejected"] == r["reason"]
        reward_keys.add(r["reward"]["cache_key"])
        store_digests.add(r["store"]["datasets"]["pref"]["digest"])
    assert len(reward_keys) == 3 and len(store_digests) == 3  # a new preference version and reward model per round
    promoted = [r["challenger_version"] for r in rounds if r["promoted"]]
    alias = client.get_registered_model("rlhf-policy").aliases.get("champion")
    alias = None if alias is None else str(alias)
    assert alias == (promoted[-1] if promoted else None)
    # round 2 starts from round 1's outcome
    assert rounds[1]["champion_before"] == rounds[0]["champion_after"]
    # one campaign row, its three rounds as children, the figure on it
    children = round_runs(client, result["campaign_run_id"])
    assert [c.data.tags["campaign.round"] for c in children] == ["1", "2", "3"]
    history = client.get_metric_history(result["campaign_run_id"], "campaign/promoted")
    assert sorted(p.step for p in history) == [1, 2, 3]
    artifacts = [a.path for a in client.list_artifacts(result["campaign_run_id"])]
    assert "campaign.png" in artifacts


def test_every_metric_of_the_campaign_is_in_the_metric_reference(campaign):
    root, result = campaign
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_run(result["campaign_run_id"]).info.experiment_id
    names = {m for r in client.search_runs([exp], max_results=1000) for m in r.data.metrics}
    assert not unmatched({m for m in names if not m.startswith("system/")}, list(reference()))[0]
    check_reference(set(client.get_run(result["campaign_run_id"]).data.metrics), [CAMPAIGN_GROUP])


def test_the_same_command_again_is_cached(campaign):
    """The rounds done are history: the same command again trains nothing, registers nothing, moves nothing."""
    root, first = campaign
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_run(first["campaign_run_id"]).info.experiment_id
    runs_before = len(client.search_runs([exp], max_results=1000))
    again = run_campaign(root)
    assert again["rounds"] == first["rounds"] and again["champion"] == first["champion"]
    assert again["campaign_run_id"] == first["campaign_run_id"]
    assert len(client.search_runs([exp], max_results=1000)) == runs_before  # no stage ran: no new run
    assert len(client.search_model_versions("name = 'rlhf-policy'")) == 3
    for child in round_runs(client, again["campaign_run_id"]):  # each round's first run: every stage trained once
        ran = {k: v for k, v in child.data.tags.items() if k.startswith("stage.") and k.endswith(".cached")}
        assert len(ran) >= 9, ran


def people_label(inbox) -> int:
    """A person orders each pair the rounds asked about (here: by the gold reward) and drops the file."""
    from rlhf.synthetic import gold_reward

    lines = []
    for path in sorted((inbox / "requests").glob("round-*.jsonl")):
        for q in map(json.loads, path.read_text().splitlines()):
            a, b = q["answer_a"], q["answer_b"]
            good, bad = (a, b) if gold_reward(q["prompt"], a) >= gold_reward(q["prompt"], b) else (b, a)
            lines.append(json.dumps({"prompt": q["prompt"], "chosen": good, "rejected": bad}))
    (inbox / "batch-1.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def test_labels_from_the_inbox_then_a_worse_challenger_rejected_and_a_rollback(campaign):
    """Round 4 asks people (labeller=folder) and finds nothing: the store and the reward model stay round 3's. A file
    dropped in the inbox is taken by round 5: a new store version in MLflow, a new reward model. Round 5's challenger
    is wrecked (a learning rate a hundred times too high, from SFT): rejected, the reason in its tags. A rollback."""
    root, first = campaign
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    folder = ["campaign.labeller=folder", "campaign.rounds=4"]
    waiting = run_campaign(root, *folder)["rounds"]
    third, fourth = waiting[2], waiting[3]
    assert third == first["rounds"][2]  # history, under whatever config
    inbox = root / "campaigns" / "default" / "inbox"
    assert fourth["n_labels"] == 0 and (inbox / "requests" / "round-4.jsonl").is_file()
    assert fourth["challenger_version"] is None and not fourth["promoted"]  # nothing new: no challenger
    assert fourth["reward"] == third["reward"] and fourth["store"] == third["store"]
    n = people_label(inbox)
    wreck = ["campaign.challenger_init=sft", "algo.lr=0.3"]
    fifth = run_campaign(root, *folder[:1], "campaign.rounds=5", *wreck)["rounds"][4]
    assert fifth["n_labels"] == n and list(fifth["label_files"]) == ["batch-1.jsonl"]
    assert not list(inbox.glob("*.jsonl")) and (inbox / "taken" / "round-5" / "batch-1.jsonl").is_file()
    assert fifth["reward"]["cache_key"] != fourth["reward"]["cache_key"]
    digest = fifth["store"]["datasets"]["pref"]["digest"]
    assert digest != fourth["store"]["datasets"]["pref"]["digest"]
    store_run = client.get_run(fifth["store"]["run_id"])  # the preferences stage: the store's new version
    assert digest in [d.dataset.digest for d in store_run.inputs.dataset_inputs]

    assert not fifth["promoted"]
    m = fifth["metrics"]
    tags = client.get_model_version("rlhf-policy", fifth["challenger_version"]).tags
    assert tags["gate.decision"] == "rejected" and tags["rejected"] == fifth["reason"]
    if m["eval/gold_gain"] <= 0:  # the gate names the first rule the challenger failed
        assert "does not clear" in tags["rejected"]
    else:
        assert m["eval/kl"] > 5.0 and "exceeds the budget" in tags["rejected"]
    assert float(tags["gate.kl_to_sft"]) == pytest.approx(m["eval/kl"], rel=1e-4)

    from flows.rollback import main as rollback

    before = client.get_registered_model("rlhf-policy").aliases.get("champion")
    before = None if before is None else str(before)
    target = first["rounds"][0]["challenger_version"]
    rollback([target, "--reason", "regression seen in production", "--by", "on-call", *micro_overrides(root)])
    assert str(client.get_registered_model("rlhf-policy").aliases["champion"]) == target
    tags = client.get_model_version("rlhf-policy", target).tags
    assert tags["rollback.by"] == "on-call" and tags["rollback.reason"] == "regression seen in production"
    assert tags["rollback.from"] == (before or "none")
    if before and before != target:
        assert "regression" in client.get_model_version("rlhf-policy", before).tags["rolled_back"]


def test_a_judge_labels_every_round_and_is_trained_once_on_pairs_no_round_learns_from(campaign):
    """labeller=judge, a campaign of its own in the same root (data and SFT Cached): a reward model trained on the
    held-out pairs and evaluated on the training pairs labels each round's pairs, the answer it scores higher
    chosen; round 2 finds it Cached; it is not a registered reward model."""
    import torch

    from rlhf.chat import render_row
    from rlhf.data import load_split
    from rlhf.lineage import CONTEXT_TAG
    from rlhf.modeling import load_scalar_model, load_tokenizer
    from rlhf.stages.reward import pair_accuracy
    from tasks.records import read_record, stage_dir

    root, _ = campaign
    own = ["campaign.name=judged", "tracking.policy_model_name=policy-judged", "campaign.labeller=judge"]
    rounds = run_campaign(root, *own, "campaign.rounds=2")["rounds"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert [r["keys"]["reward.judge"] for r in rounds][0] == rounds[1]["keys"]["reward.judge"]
    runs = [client.get_run(r["store"]["run_id"]).data.tags["mlflow.parentRunId"] for r in rounds]
    assert [client.get_run(p).data.tags["stage.reward.judge.cached"] for p in runs] == ["false", "true"]
    judge_run = client.get_run(client.get_run(runs[0]).data.tags["stage.reward.judge.run_id"])
    contexts = {
        d.dataset.digest: {t.key: t.value for t in d.tags}[CONTEXT_TAG] for d in judge_run.inputs.dataset_inputs
    }
    data = read_record(root, "data", rounds[0]["keys"]["data"])["datasets"]
    assert contexts == {data["eval_pref"]["digest"]: "training", data["pref"]["digest"]: "evaluation"}
    assert "rm/eval_accuracy" in judge_run.data.metrics  # on the training pairs: the judge never saw them
    assert not client.search_model_versions(f"tags.stage_run_id = '{judge_run.info.run_id}'")  # logged, not registered
    judge_path = read_record(root, "reward.judge", rounds[0]["keys"]["reward.judge"])["model_path"]
    tokenizer = load_tokenizer(judge_path)
    judge = load_scalar_model(judge_path, tokenizer, zero_head=False)
    for r in rounds:
        assert r["n_labels"] > 0
        m = client.get_run(r["store"]["run_id"]).data.metrics
        labels = load_split(stage_dir(root, "labels", r["keys"]["labels"]), "labels")
        requests = load_split(stage_dir(root, "pairs", r["keys"]["pairs"]) / "pairs", "requests")
        # where both answers ended or neither did, the missing-EOS penalty cancels: the judge's own order is the labels'
        alike = {frozenset((q["answer_a"], q["answer_b"])) for q in requests if q["ended_a"] == q["ended_b"]}
        rows = [render_row(tokenizer, x) for x in labels if frozenset((x["chosen"], x["rejected"])) in alike]
        assert rows
        assert pair_accuracy(judge, rows, tokenizer, 64, torch.device("cpu"))["eval_accuracy"] == 1.0
        assert 0.0 <= m["preferences/gold_agreement"] <= 1.0
    # every metric any round logged has its entry, and every entry of the round's reference is logged by some round
    # (the folder labeller's by rounds 4 and 5 of the inbox test, the judge's here)
    names = {m for r in client.search_runs([judge_run.info.experiment_id], max_results=1000) for m in r.data.metrics}
    assert not unmatched({m for m in names if not m.startswith("system/")}, list(reference()))[0]
    assert not unmatched(names, [ROUND_GROUP])[1]


def test_a_malformed_labels_file_names_its_line_and_a_file_is_taken_once(tmp_path):
    from rlhf.data import DatasetError
    from rlhf.gate import decide
    from rlhf.labellers import FolderLabeller, read_labelled

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 3}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl line 2 lacks chosen or rejected"):
        read_labelled(bad, conversational=False)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "one.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    request = {"id": "r1-0", "prompt": "p", "answer_a": "a", "answer_b": "b", "ended_a": True, "ended_b": True}
    rows, first = FolderLabeller(inbox, 1, False).label([request])
    assert len(rows) == 1 and first["labels/n_files"] == 1
    (inbox / "taken" / "round-1" / "one.jsonl").write_text("appended later\n")  # a taken file is not read again
    assert FolderLabeller(inbox, 2, False).label([request])[0] == []
    # the gate never promotes what is not a number, nor a comparison on one prompt
    good = {"eval/gold_gain": 0.5, "eval/gold_gain_se": 0.1, "eval/kl": 1.0, "eval/n_prompts": 16}
    assert decide(good, "gold", 2.0, 5.0).promote
    for broken in ({"eval/gold_gain_se": float("nan")}, {"eval/kl": float("nan")}, {"eval/n_prompts": 1}):
        assert not decide({**good, **broken}, "gold", 2.0, 5.0).promote

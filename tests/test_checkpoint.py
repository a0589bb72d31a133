"""Atomic checkpoints: a crash mid-write leaves nothing that looks finished."""

import pytest
import torch

from rlhf import checkpoint


def test_atomic_dir_leaves_no_folder_on_error(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("killed")
    assert not final.exists() and not list(tmp_path.iterdir())


def test_atomic_dir_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "model"
    for text in ("old", "new"):
        with checkpoint.atomic_dir(final) as tmp:
            (tmp / "w").write_text(text)
    assert (final / "w").read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_latest_ignores_half_written_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 2)

    class Tok:
        def save_pretrained(self, path):
            pass

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def save_pretrained(self, path):
            path.mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), path / "w.pt")

    checkpoint.save(tmp_path, 2, {"policy": Wrapped()}, Tok(), {"x": 1})
    (tmp_path / "step-000004").mkdir()  # a crash after mkdir, before COMPLETE
    (tmp_path / ".step-000006.tmp-123").mkdir()
    assert checkpoint.latest(tmp_path).name == "step-000002"
    assert checkpoint.load_trainer_state(checkpoint.latest(tmp_path))["step"] == 2


class Payload:
    """What a malicious or foreign file could hold: unpickling it would construct this object (run its code)."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_checkpoint_holding_a_pickled_object_is_refused_with_the_file_and_the_fix(tmp_path, capsys):
    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    torch.save({"step": 2, "optimizer": {}, "extra": {"hook": Payload()}}, ckpt / "trainer_state.pt")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_trainer_state(ckpt)
    assert (
        str(ckpt / "trainer_state.pt") in str(e.value) and "Fix: delete" in str(e.value) and "refresh=" in str(e.value)
    )
    assert "this ran" not in capsys.readouterr().out  # nothing in the file was executed


def test_a_trainer_state_round_trips_with_weights_only(tmp_path):
    """What the trainer saves (optimizer, schedule, the on-policy state with its tuples and Nones, every process's
    random state) is plain data: it loads with weights_only."""
    from rlhf.config_training import OptimConfig
    from rlhf.trainer import Trainer

    class Sink:
        def log_metrics(self, metrics, step):
            pass

        def flush(self):
            pass

    class Tok:
        def save_pretrained(self, path):
            pass

    class Model(torch.nn.Linear):
        def save_pretrained(self, path):
            path.mkdir(parents=True, exist_ok=True)

    from rlhf.runtime import accelerator

    model = Model(3, 1)
    trainer = Trainer(
        {"policy": model}, Tok(), OptimConfig(), 10, "t", Sink(), tmp_path, accelerator=accelerator(torch.device("cpu"))
    )
    trainer.optimizer_step([(model(torch.ones(2, 3)).pow(2).mean(), {})], n_micro=1)
    extra = {
        "history": {"t/kl": [(1, 0.5)]},
        "guard": {"best": None, "stopped": None},
        "member_stats": torch.zeros(1, 2),
    }
    trainer.save(extra)
    expected = torch.rand(3)  # what the generator gives next, after the checkpoint
    torch.rand(5)
    loaded = trainer.load(checkpoint.latest(tmp_path))
    assert (
        loaded["history"] == extra["history"]
        and loaded["guard"] == extra["guard"]
        and torch.equal(loaded["member_stats"], extra["member_stats"])
    )
    assert torch.equal(torch.rand(3), expected)  # the random state came back with the step


def test_preempted_survives_pickling_and_names_where_to_resume():
    import pickle

    from rlhf.preemption import Preempted

    stop = pickle.loads(pickle.dumps(Preempted("ppo", 15, "iteration 37")))
    assert (stop.stage, stop.signum, stop.at, stop.exit_code) == ("ppo", 15, "iteration 37", 143)
    assert "stopped by SIGTERM after iteration 37" in str(stop) and "resume at iteration 37" in str(stop)
    assert "after the stage finished" in str(Preempted("sft", 2, None))


def test_a_stop_file_or_any_number_of_signals_ask_a_launched_process_once(tmp_path):
    import os
    import signal

    from rlhf import preemption

    stop_file = tmp_path / "STOP"
    with preemption.StopSignals(once=True, stop_file=stop_file) as signals:
        assert preemption.requested() is None
        stop_file.write_text(str(int(signal.SIGINT)))
        assert preemption.requested() == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat does not end the process
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM
    assert preemption.requested() is None

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

"""Checkpoints: exact round trip, atomic replacement, pruning, clear errors for incomplete ones, and resume past a
damaged newest checkpoint (issue 15: a truncated file or a cut state.json names the file and falls back)."""

import json

import pytest
import torch
from safetensors.torch import save

from rlhf_diffusion.checkpoint import (
    CheckpointError,
    CheckpointState,
    latest_checkpoint,
    load_checkpoint,
    load_resumable,
    save_checkpoint,
)


def make_state(iteration: int) -> CheckpointState:
    g = torch.Generator().manual_seed(iteration)
    lora = {"a.lora_A.weight": torch.randn(4, 8, generator=g), "a.lora_B.weight": torch.randn(8, 4, generator=g)}
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    return CheckpointState(
        iteration=iteration,
        learner={
            "version": iteration,
            "dropped": 1,
            "lora": lora,
            "optimizer": optimizer.state_dict(),
            "algorithm": {"correction_table": torch.linspace(0, 1, 1000)},
        },
        weights_history={iteration - 1: {k: v - 1 for k, v in lora.items()}, iteration: lora},
        meta={"seed": 7, "mlflow_run_id": "abc", "eval_before": {"mean": 0.5, "per_reward": {"x": 0.5}}},
        export={"lora/pytorch_lora_weights.safetensors": save(lora)},  # as Learner.export_files: safetensors bytes
    )


def test_round_trip_is_exact(tmp_path):
    state = make_state(4)
    path = save_checkpoint(tmp_path, state)
    assert path.name == "iter_000004" and latest_checkpoint(tmp_path) == path
    loaded = load_checkpoint(path)
    assert loaded.iteration == 4 and loaded.learner["version"] == 4 and loaded.learner["dropped"] == 1
    for key, value in state.learner["lora"].items():
        assert torch.equal(loaded.learner["lora"][key], value)
    assert torch.equal(loaded.learner["algorithm"]["correction_table"], torch.linspace(0, 1, 1000))
    assert torch.equal(
        loaded.learner["optimizer"]["state"][0]["exp_avg"], state.learner["optimizer"]["state"][0]["exp_avg"]
    )
    assert sorted(loaded.weights_history) == [3, 4]
    assert torch.equal(loaded.weights_history[3]["a.lora_A.weight"], state.learner["lora"]["a.lora_A.weight"] - 1)
    assert loaded.meta["mlflow_run_id"] == "abc" and loaded.meta["eval_before"]["mean"] == 0.5
    assert (path / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == state.export[
        "lora/pytorch_lora_weights.safetensors"
    ]


def test_keep_last_prunes_and_latest_moves(tmp_path):
    for iteration in (2, 4, 6):
        save_checkpoint(tmp_path, make_state(iteration), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_000004", "iter_000006"]
    assert (tmp_path / "latest").read_text().strip() == "iter_000006"


def test_a_crashed_write_leaves_the_previous_checkpoint_latest(tmp_path):
    save_checkpoint(tmp_path, make_state(2))
    bad = make_state(4)
    bad.learner["lora"] = {"x": "not a tensor"}  # the writer fails midway through the staging directory
    with pytest.raises(AttributeError):  # safetensors meets a str where it needs a tensor
        save_checkpoint(tmp_path, bad)
    assert latest_checkpoint(tmp_path).name == "iter_000002"
    assert not list(tmp_path.glob(".iter_*"))  # the staging directory was removed
    assert not (tmp_path / "iter_000004").exists()


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    save_checkpoint(tmp_path, make_state(2))
    save_checkpoint(tmp_path, make_state(4), keep_last=5)
    (tmp_path / "iter_000004" / "state.json").unlink()  # damaged by hand
    assert latest_checkpoint(tmp_path).name == "iter_000002"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_incomplete_checkpoint_names_the_missing_file(tmp_path):
    path = save_checkpoint(tmp_path, make_state(2))
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(path)


def test_state_json_is_readable_json(tmp_path):
    path = save_checkpoint(tmp_path, make_state(2))
    meta = json.loads((path / "state.json").read_text())
    assert meta["iteration"] == 2 and meta["learner_version"] == 2 and meta["history_versions"] == [1, 2]


def test_a_full_unet_checkpoint_round_trips_under_its_own_key(tmp_path):
    state = make_state(3)
    state.learner["unet"] = {"conv_in.weight": torch.randn(4, 4, 3, 3), "conv_in.bias": torch.randn(4)}
    del state.learner["lora"]
    state.export = {"unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": save(state.learner["unet"])}
    path = save_checkpoint(tmp_path, state)
    assert (path / "learner_unet.safetensors").is_file() and not (path / "learner_lora.safetensors").exists()
    assert (path / "unet" / "config.json").read_bytes() == b"{}"
    loaded = load_checkpoint(path)
    assert "lora" not in loaded.learner and latest_checkpoint(tmp_path) == path
    for key, value in state.learner["unet"].items():
        assert torch.equal(loaded.learner["unet"][key], value)


def test_export_paths_may_not_leave_the_checkpoint(tmp_path):
    state = make_state(2)
    state.export = {"../escaped.bin": b"x"}
    with pytest.raises(CheckpointError, match="leaves the checkpoint"):
        save_checkpoint(tmp_path / "ckpt", state)
    assert not (tmp_path / "escaped.bin").exists()


# ---------------------------------------------------------------------------------------------------------------
# Resume past damaged checkpoints (load_resumable): real checkpoints, damaged by truncating or cutting their files
# ---------------------------------------------------------------------------------------------------------------


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def cut_mid_string(path) -> None:
    """state.json ends inside a string value, as after a crash mid-write."""
    text = path.read_text()
    path.write_text(text[: text.index('"mlflow_run_id": "abc"') + len('"mlflow_run_id": "a')])


DAMAGES = {  # file → (how it is damaged, what the message says of it)
    "learner_lora.safetensors": (truncate, "truncated or not a safetensors file"),
    "optimizer.pt": (truncate, "does not load with torch.load(weights_only=True)"),
    "state.json": (cut_mid_string, "not a complete state.json (Unterminated string"),
    "weights_history.safetensors": (lambda p: truncate(p, 0.0), "truncated or not a safetensors file"),
    "lora/pytorch_lora_weights.safetensors": (lambda p: truncate(p, 0.9), "truncated or not a safetensors file"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_resume_skips_a_damaged_newest_checkpoint_naming_the_file(tmp_path, name):
    save_checkpoint(tmp_path, make_state(2), keep_last=5)
    newest = save_checkpoint(tmp_path, make_state(4), keep_last=5)
    damage, why = DAMAGES[name]
    damage(newest / name)
    with pytest.raises(CheckpointError, match="corrupt checkpoint file"):
        load_checkpoint(newest)
    lines = []
    path, state = load_resumable(tmp_path, log=lines.append)
    assert path.name == "iter_000002" and state.iteration == 2 and state.learner["version"] == 2
    assert len(lines) == 1 and str(newest / name) in lines[0] and why in lines[0], lines
    assert "Traceback" not in lines[0] and "iter_000002" in lines[0]


def test_resume_with_every_checkpoint_damaged_names_each_bad_file(tmp_path):
    older = save_checkpoint(tmp_path, make_state(2), keep_last=5)
    newest = save_checkpoint(tmp_path, make_state(4), keep_last=5)
    truncate(older / "optimizer.pt")
    cut_mid_string(newest / "state.json")
    lines = []
    with pytest.raises(CheckpointError) as info:
        load_resumable(tmp_path, log=lines.append)
    message = str(info.value)
    assert message.startswith(f"no complete checkpoint under {tmp_path} to resume from")
    assert str(newest / "state.json") in message and str(older / "optimizer.pt") in message
    assert len(lines) == 1  # the skip of the newest; the last one's problem is in the error
    assert load_resumable(tmp_path / "nothing") is None  # no checkpoint at all: the caller says so


def test_resume_starts_from_the_checkpoint_latest_names(tmp_path):
    save_checkpoint(tmp_path, make_state(2), keep_last=5)
    save_checkpoint(tmp_path, make_state(4), keep_last=5)
    (tmp_path / "latest").write_text("iter_000002\n")  # rolled back by hand: the newer one is not used
    path, state = load_resumable(tmp_path, log=pytest.fail)
    assert path.name == "iter_000002" and state.iteration == 2

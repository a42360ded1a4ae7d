"""Faults: a dead actor that is not restarted ending the run with one message that names it and the checkpoint to
resume from, and iterations numbered from 1 in every message. (A killed actor that Ray restarts, counted once as
one restart, with no iteration lost or trained twice: tests/test_trainer.py.)

The Ray tests kill actors of a real local cluster (the `ray_cluster` head on 127.0.0.1) at a fixed point of the
loop (`Trainer(on_event=...)`); the rest show the same logic in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from rlhf_diffusion.actors import ActorCrashed, LearnerCrashed, resume_hint
from rlhf_diffusion.config import parse_config
from rlhf_diffusion.testing import tiny_loop_run_config
from rlhf_diffusion.trainer import LocalTrainer, Trainer


def faults_config(
    model_dir: Path, output_dir: Path, run_name: str, *, restarts: int, iterations: int = 3, staleness: int = 1
):
    """1 sampler, 1 reward server, pipelined by default (max_staleness 1: the next iteration's rollout is queued on
    the sampler while this one runs), a checkpoint after every iteration, no tracking."""
    return parse_config(
        tiny_loop_run_config(
            model_dir,
            output_dir,
            run_name,
            "diffusion_dpo",
            seed=11,
            num_steps=2,
            model={"lora": {"rank": 2}},
            resources={
                "num_samplers": 1,
                "num_reward_servers": 1,
                "cpus_per_actor": 0.5,
                "max_actor_restarts": restarts,
                "actor_start_timeout_s": 120,
            },
            train={"iterations": iterations, "train_batch_size": 2, "max_staleness": staleness},
            tracking={"image_grid_every": 0},
            checkpoint={"every": 1, "keep_last": 2},
        )
    )


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def crashing_trainer(message: str) -> type:
    """A stand-in for `trainer.Trainer` whose `fit` raises `ActorCrashed(message)`, as the trainer does when an actor
    died and was not restarted."""

    class CrashingTrainer:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise ActorCrashed(message)

        def shutdown(self):
            pass

    return CrashingTrainer


# -- in this process ----------------------------------------------------------------------------------------------


def test_resume_hint_names_the_newest_complete_checkpoint_or_none(tmp_path):
    root = tmp_path / "checkpoints"
    assert "no checkpoint was written yet" in resume_hint(root) and "start over" in resume_hint(root)
    for k in (1, 2):
        (root / f"iter_{k:06d}").mkdir(parents=True)
        (root / f"iter_{k:06d}" / "state.json").write_text(json.dumps({"iteration": k}))
        (root / f"iter_{k:06d}" / "learner_lora.safetensors").write_bytes(b"")
    (root / "iter_000003").mkdir()  # a crashed write: no state.json, not complete
    (root / "latest").write_text("iter_000002\n")
    hint = resume_hint(root)
    assert f"{root / 'iter_000002'} (after iteration 2)" in hint and "--resume" in hint


def test_the_launcher_ends_a_crashed_run_with_one_line_and_exit_code_1(monkeypatch, capsys, tiny_sd15_dir, tmp_path):
    """An actor that died and was not restarted (here: as raised by the trainer) is one line on stderr, exit code 1,
    no traceback — for a sampler or reward server as for the learner."""
    from rlhf_diffusion import launch, trainer

    message = "sampler 0 died during iteration 3 and restarts are disabled (resources.max_actor_restarts=0); ..."
    monkeypatch.setattr(trainer, "Trainer", crashing_trainer(message))
    args = argparse.Namespace(no_ray=True, resume=False, overwrite=False, no_progress=True)
    config = faults_config(tiny_sd15_dir, tmp_path, "launch", restarts=0)
    assert launch.run(config, args) == 1
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"


def test_the_error_line_ends_the_output_after_ray_shuts_down(monkeypatch, capsys, tiny_sd15_dir, tmp_path):
    """Under Ray the crash message came before actor output that Ray forwarded late (a learner's progress bar, flushed
    by ray.shutdown), so it was not the last line (benchmarks/reliability_probe.py,
    ray/sampler_killed_without_restarts_one_line); it is printed once Ray has shut down."""
    import ray

    from rlhf_diffusion import launch, trainer

    message = "sampler 0 died during iteration 2 and restarts are disabled (resources.max_actor_restarts=0); ..."

    def late_actor_output():  # what Ray's log forwarding prints as the driver shuts down
        print("(Learner pid=1) Loading weights: 100%|##########| 36/36", file=sys.stderr)

    monkeypatch.setattr(trainer, "Trainer", crashing_trainer(message))
    monkeypatch.setattr(launch, "connect_ray", lambda config: "joined a fake cluster")
    monkeypatch.setattr(ray, "shutdown", late_actor_output)
    args = argparse.Namespace(no_ray=False, resume=False, overwrite=False, no_progress=True)
    config = faults_config(tiny_sd15_dir, tmp_path, "launch_ray", restarts=0)
    assert launch.run(config, args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"


@pytest.fixture(scope="module")
def in_process(tiny_sd15_dir, one_torch_thread):
    return tiny_sd15_dir


def test_the_learner_crash_message_counts_iterations_from_1(in_process, tmp_path, monkeypatch):
    """The learner dies training the 3rd iteration (metrics.jsonl's iteration 3, the progress bar's 3): the message
    says iteration 3 and names the checkpoint after iteration 2."""
    from ray.exceptions import ActorDiedError

    config = faults_config(in_process, tmp_path, "learner", restarts=0, iterations=4)
    trainer = LocalTrainer(config, log=lambda *_: None)
    train = trainer.learner_obj.train

    def dies_at_the_third(batch, iteration):
        if iteration == 2:  # 0-based, as RolloutRequest.iteration
            raise ActorDiedError()
        return train(batch, iteration)

    monkeypatch.setattr(trainer.learner_obj, "train", dies_at_the_third)
    with pytest.raises(LearnerCrashed) as info:
        trainer.fit()
    message = str(info.value)
    assert "the learner actor died during iteration 3 " in message, message
    assert f"{tmp_path / 'learner' / 'checkpoints' / 'iter_000002'} (after iteration 2)" in message
    assert "--resume" in message
    assert [r["iteration"] for r in metrics_lines(tmp_path / "learner")] == [1, 2]


# -- on a real local Ray cluster ----------------------------------------------------------------------------------


def _kill(role: str, at: tuple[str, int], killed: list):
    import ray

    event_at, iteration_at = at

    def on_event(event, trainer, it):
        if event == event_at and it == iteration_at and not killed:
            actor = trainer.samplers[0] if role == "sampler" else trainer.reward_servers[0]
            ray.kill(actor, no_restart=False)  # Ray restarts it if resources.max_actor_restarts allows
            killed.append(it)

    return on_event


@pytest.mark.ray
@pytest.mark.parametrize("role", ["sampler", "reward_server"])
def test_an_actor_killed_with_restarts_disabled_ends_the_run_naming_it_and_the_checkpoint(
    role, ray_connected, tiny_sd15_dir, tmp_path
):
    """resources.max_actor_restarts 0: the sampler (or the reward server it calls) killed as the rollout of iteration
    3 was submitted (on-policy, so the driver waits on that rollout; checkpoint iter_000002 written) is not
    restarted; the run ends with one message naming that actor (a dead reward server is not blamed on the sampler
    whose call to it failed), the field and the checkpoint to resume from."""
    config = faults_config(tiny_sd15_dir, tmp_path, "no_restarts", restarts=0, staleness=0)
    killed: list = []
    logged: list[str] = []
    trainer = Trainer(config, log=logged.append, on_event=_kill(role, ("rollouts_submitted", 2), killed))
    with pytest.raises(ActorCrashed) as info:
        try:
            trainer.fit()
        finally:
            trainer.shutdown()
    assert killed == [2]
    assert not isinstance(info.value, LearnerCrashed)
    message = str(info.value)
    assert message.startswith(f"{role.replace('_', ' ')} 0 died during iteration 3 "), message
    assert "restarts are disabled (resources.max_actor_restarts=0" in message
    assert f"{tmp_path / 'no_restarts' / 'checkpoints' / 'iter_000002'} (after iteration 2)" in message
    assert "--resume" in message and "\n" not in message
    assert not any("redone" in line for line in logged + [message]), logged  # nothing is redone: the run ends

"""One run per run directory, and resumes that fail cleanly (issue 15, defects 1-3).

- A launch into a run directory another launch is writing exits with 2 naming the directory and the other's PID,
  before Ray starts; the lock of a killed process does not block.
- A fresh launch into a directory that holds a finished run exits with 2 (pass --resume or --overwrite) and leaves
  it untouched; --overwrite replaces it (launch and the Trainer API alike).
- --resume with train.iterations below the iterations done exits with 2 naming train.iterations.
- --resume past a damaged newest checkpoint falls back to the older complete one with one line naming the bad file;
  with no complete checkpoint it exits with 2 naming the bad files.

The launches are real (`python -m rlhf_diffusion.launch` on the embedded default, shortened); one finished run is
made once and restored before each test that changes it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_diffusion.config import parse_config
from rlhf_diffusion.prompts import load_builtin
from rlhf_diffusion.run_dir import LOCK_FILE, RunDirBusy, RunDirError, lock_run_dir
from rlhf_diffusion.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]

# configs/tiny.yaml shortened: 2 iterations, a checkpoint after each, one process-sized sampler, no MLflow.
SHORT = [
    "--no-progress",
    "--set",
    "train.iterations=2",
    "--set",
    "prompts.eval_seeds=1",
    "--set",
    "sampling.batch_size=2",
    "--set",
    "sampling.num_steps=4",
    "--set",
    "tracking.enabled=false",
    "--set",
    "checkpoint.every=1",
    "--set",
    "checkpoint.keep_last=3",
    "--set",
    "train.signal_every=0",
    "--set",
    "resources.num_samplers=1",
    "--set",
    "train.max_staleness=0",
]


# 8 of the 82 held-out captions (CI time); a JSON list is a YAML flow sequence.
FEW_EVAL = ["--set", "prompts.eval={inline: " + json.dumps(load_builtin("testbed_heldout")[:8]) + "}"]


def launch_command(output_dir: Path, *extra: str, few_eval: bool = True) -> list[str]:
    """The shortened launch; `few_eval=False` keeps all 82 held-out captions (a launch that runs longer)."""
    return [
        sys.executable,
        "-m",
        "rlhf_diffusion.launch",
        "configs/tiny.yaml",
        "--set",
        f"output_dir={output_dir}",
        *SHORT,
        *(FEW_EVAL if few_eval else []),
        *extra,
    ]


def launch(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        launch_command(output_dir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run directory's lock and keeps it; returns once it holds it."""
    code = (
        "import sys, time; from rlhf_diffusion.run_dir import lock_run_dir; lock_run_dir(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def lock_elsewhere(run_dir: Path) -> int:
    """Tries the run directory's lock from another process, which then exits: 0 it got it, 2 it was refused."""
    code = (
        "import sys\nfrom rlhf_diffusion.run_dir import RunDirBusy, lock_run_dir\n"
        "try:\n    lock_run_dir(sys.argv[1])\nexcept RunDirBusy:\n    sys.exit(2)"
    )
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, timeout=120).returncode


def locked_by(run_dir: Path) -> str | None:
    """The PID the run directory's lock file names, if any."""
    lock_file = run_dir / LOCK_FILE
    words = lock_file.read_text().split() if lock_file.is_file() else []
    return words[0] if words else None


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def iterations_logged(run_dir: Path) -> list[float]:
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# The lock itself
# ---------------------------------------------------------------------------------------------------------------


def test_a_locked_run_dir_refuses_a_second_process_until_the_first_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunDirBusy) as info:
            lock_run_dir(run_dir)
        message = str(info.value)
        assert f"run directory {run_dir} is in use by another run (PID {holder.pid} on " in message
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean exit: the kernel drops the flock with the process
        holder.wait()
    lock = lock_run_dir(run_dir)  # the dead owner does not block
    assert (run_dir / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    again = lock_run_dir(run_dir)  # re-entrant in the process that holds it (launch, then Trainer.fit)
    again.release()
    assert lock_elsewhere(run_dir) == 2  # still held by `lock`: another process is refused ...
    lock.release()
    assert lock_elsewhere(run_dir) == 0  # ... and gets it once the last holder released it


# ---------------------------------------------------------------------------------------------------------------
# Launches (real processes) into one run directory
# ---------------------------------------------------------------------------------------------------------------


def test_a_second_launch_while_one_runs_exits_2_naming_the_directory_and_pid(tmp_path):
    run_dir = tmp_path / "tiny"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        launch_command(tmp_path, "--no-ray", few_eval=False),  # all 82 captions: still running when the second comes
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while locked_by(run_dir) != str(first.pid):
            assert first.poll() is None and time.monotonic() < deadline, "the first launch never locked its run dir"
            time.sleep(0.1)
        second = launch(tmp_path)  # the same command, under Ray, while the first one runs
        first_still_running = first.poll() is None
    finally:
        output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-3000:]
    assert first_still_running, "the first launch ended before the second was refused: the test proved nothing"
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert second.stderr.strip() == (
        f"error: run directory {run_dir} is in use by another run (PID {first.pid} on "
        f"{socket.gethostname()}, lock file {run_dir / LOCK_FILE}); wait for it to end, "
        "or choose another run_name or output_dir"
    )
    assert "Ray" not in second.stdout  # refused before Ray started
    assert iterations_logged(run_dir) == [1, 2]  # the first run's metrics alone, nothing interleaved


def test_ctrl_c_ends_a_run_with_one_line_naming_the_checkpoint_to_resume_from(tmp_path):
    """SIGINT (Ctrl-C in the launch's terminal) mid-run: exit code 130, no traceback, and the last line says where
    `--resume` continues from."""
    from rlhf_diffusion.checkpoint import latest_checkpoint

    run_dir = tmp_path / "tiny"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    launcher = subprocess.Popen(
        launch_command(tmp_path, "--no-ray", "--set", "train.iterations=200"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # as in a terminal, whatever started pytest: a background shell job inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(run_dir / "checkpoints") is None:
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(
        f"error: interrupted (Ctrl-C); the newest complete checkpoint is {run_dir / 'checkpoints'}/iter_"
    ), last
    assert "--resume" in last


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run (2 iterations, checkpoints iter_000001 and iter_000002): (run directory, restore()), where
    restore() puts it back as it was (resume refuses another output_dir, so it is restored in place)."""
    out = tmp_path_factory.mktemp("runs")
    run_dir = out / "tiny"
    proc = launch(out, "--no-ray")
    assert proc.returncode == 0, proc.stderr[-3000:]
    backup = tmp_path_factory.mktemp("backup") / "tiny"
    shutil.copytree(run_dir, backup)

    def restore():
        shutil.rmtree(run_dir)
        shutil.copytree(backup, run_dir)

    return run_dir, restore


def test_a_fresh_launch_into_a_finished_run_is_refused_and_changes_nothing(finished):
    run_dir, restore = finished
    restore()
    before = files_of(run_dir)
    proc = launch(run_dir.parent)  # under Ray: refused before it starts
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"error: run directory {run_dir} already holds a run (metrics.jsonl, eval.json, "
        "checkpoints, lora); pass --resume to continue it or --overwrite to replace it "
        "(or choose another run_name or output_dir)"
    )
    assert "Ray" not in proc.stdout
    assert files_of(run_dir) == before


def test_overwrite_replaces_the_finished_run(finished):
    run_dir, restore = finished
    restore()
    proc = launch(run_dir.parent, "--no-ray", "--overwrite", "--set", "train.iterations=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "[overwrite] removed the earlier run's metrics.jsonl, eval.json, checkpoints, lora, grid_before.png, "
        "grid_after.png" in proc.stdout
    )
    assert iterations_logged(run_dir) == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_000001"]
    assert json.loads((run_dir / "eval.json").read_text())["iterations"] == 1
    assert launch(run_dir.parent, "--resume", "--overwrite").returncode == 2  # the two flags exclude each other


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_resume_into_outputs_planted_as_links_is_refused_and_their_targets_left_alone(finished, tmp_path, link):
    """metrics.jsonl (appended to by a resume) or a file under checkpoints/ planted as a link to another file would
    have the run write into that file (benchmarks/reliability_probe.py found it for metrics.jsonl and eval.json)."""
    run_dir, restore = finished
    restore()
    victim = tmp_path / "victim.txt"
    victim.write_text((run_dir / "metrics.jsonl").read_text())
    planted = run_dir / "metrics.jsonl" if link == "symbolic" else run_dir / "checkpoints" / "iter_000001" / "x.bin"
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim) if link == "symbolic" else os.link(victim, planted)
    before = victim.read_text()
    proc = launch(run_dir.parent, "--resume", "--set", "train.iterations=3")  # under Ray: refused before it starts
    assert proc.returncode == 2, proc.stderr[-3000:]
    what = "is a symbolic link" if link == "symbolic" else "has 2 hard links"
    assert proc.stderr.strip() == (
        f"error: {planted} {what}: a run writes its outputs itself and would write through the link into a file it "
        "did not make; remove it, or pass --overwrite to replace the run"
    )
    assert "Ray" not in proc.stdout
    assert victim.read_text() == before
    assert check_run_dir_passes_after_overwrite_clears(run_dir)
    assert victim.read_text() == before


def check_run_dir_passes_after_overwrite_clears(run_dir: Path) -> bool:
    """--overwrite removes the planted link itself (never its target), after which no link is left."""
    from rlhf_diffusion.run_dir import check_run_dir, clear_run_dir, planted_links

    check_run_dir(run_dir, resume=False, overwrite=True)
    clear_run_dir(run_dir)
    return planted_links(run_dir) == []


def test_resume_below_the_iterations_done_is_refused(finished):
    run_dir, restore = finished
    restore()
    before = files_of(run_dir)
    proc = launch(run_dir.parent, "--no-ray", "--resume", "--set", "train.iterations=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"error: cannot resume {run_dir}: train.iterations=1 is below the 2 iterations "
        f"already done (checkpoint {run_dir / 'checkpoints' / 'iter_000002'}); set "
        "train.iterations to 2 or more"
    )
    assert files_of(run_dir) == before


def test_resume_falls_back_past_a_truncated_newest_checkpoint(finished):
    run_dir, restore = finished
    restore()
    bad = run_dir / "checkpoints" / "iter_000002" / "learner_lora.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    proc = launch(run_dir.parent, "--no-ray", "--resume", "--set", "train.iterations=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("[resume] skipping")]
    assert skipped == [
        f"[resume] skipping iter_000002: corrupt checkpoint file {bad}: truncated or not a safetensors "
        "file (Error while deserializing header: invalid header length); trying iter_000001"
    ]
    resumed = f"[resume] from {run_dir / 'checkpoints' / 'iter_000001'}: after iteration 1, continuing with iteration 2"
    assert resumed in proc.stdout
    assert iterations_logged(run_dir) == [1, 2, 3]  # iteration 2 redone, none doubled
    assert json.loads((run_dir / "eval.json").read_text())["iterations"] == 3


def test_resume_with_no_complete_checkpoint_exits_2_naming_the_bad_files(finished):
    run_dir, restore = finished
    restore()
    state = run_dir / "checkpoints" / "iter_000002" / "state.json"
    text = state.read_text()
    state.write_text(text[: text.index('"seed": ') + 2])  # cut mid-string
    optimizer = run_dir / "checkpoints" / "iter_000001" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-200])
    proc = launch(run_dir.parent, "--no-ray", "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert message.startswith(f"error: no complete checkpoint under {run_dir / 'checkpoints'} to resume from: ")
    assert f"corrupt checkpoint file {state}: not a complete state.json (Unterminated string" in message
    assert f"corrupt checkpoint file {optimizer}: does not load with torch.load(weights_only=True)" in message


# ---------------------------------------------------------------------------------------------------------------
# The Trainer API refuses and replaces the same way
# ---------------------------------------------------------------------------------------------------------------


def test_trainer_fit_refuses_a_fresh_run_into_a_finished_one_and_overwrite_replaces_it(
    tiny_sd15_dir, tmp_path, one_torch_thread
):
    config = parse_config(
        {
            "run_name": "api",
            "seed": 1,
            "output_dir": str(tmp_path),
            "device": "cpu",
            "model": {"pretrained": str(tiny_sd15_dir)},
            "sampling": {"num_steps": 2, "guidance_scale": 2.0, "batch_size": 2},
            "algorithm": {"name": "d3po"},
            "rewards": [{"name": "brightness"}],
            "train": {"iterations": 1},
            "prompts": {"train": {"inline": ["a cat"]}, "eval_seeds": 1},
            "tracking": {"enabled": False},
            "checkpoint": {"every": 1},
        }
    )
    run_dir = LocalTrainer(config, log=lambda *_: None).fit().run_dir
    before = files_of(run_dir)
    with pytest.raises(RunDirError, match="already holds a run .*pass --resume to continue it or --overwrite"):
        LocalTrainer(config, log=lambda *_: None).fit()
    assert files_of(run_dir) == before
    (run_dir / "checkpoints" / "iter_000000_stale").mkdir()  # something only the old run had
    result = LocalTrainer(config, overwrite=True, log=lambda *_: None).fit()
    assert iterations_logged(result.run_dir) == [1]
    assert not (run_dir / "checkpoints" / "iter_000000_stale").exists()
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        LocalTrainer(config, resume=True, overwrite=True)


@pytest.mark.parametrize("where", ["a_file", "a_file/below", "missing_mount"])
def test_an_output_dir_that_cannot_be_written_fails_before_any_work_naming_it(tmp_path, where):
    """The probe's `output_dir` that is a file, or under a file, ended in a NotADirectoryError traceback (exit 1)."""
    (tmp_path / "a_file").write_text("not a directory")
    output_dir = Path("/proc/no_such_dir") if where == "missing_mount" else tmp_path / where
    proc = launch(output_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot write the run directory" in proc.stderr and str(output_dir) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_with_nothing_to_resume_exits_2_and_leaves_nothing_behind(tmp_path):
    """The probe's --resume where no run was ever made exited 2 but left the run directory it had created, holding
    run.lock (benchmarks/reliability_probe.py, run_dir/resume_with_nothing_to_resume)."""
    output_dir = tmp_path / "runs"
    proc = launch(output_dir, "--no-ray", "--resume")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"error: --resume: no checkpoint under {output_dir / 'tiny' / 'checkpoints'}"
    assert not output_dir.exists()


def test_resume_past_a_metrics_line_torn_by_a_crash(finished):
    """A launcher killed mid-write of iteration 3's metrics.jsonl line (after checkpoint iter_000002) left a torn
    last line, and --resume died on it with a JSONDecodeError traceback (benchmarks/reliability_probe.py,
    checkpoint/metrics_line_torn); the torn line is dropped with the iterations the resumed run redoes."""
    run_dir, restore = finished
    restore()
    metrics = run_dir / "metrics.jsonl"
    third = json.dumps({**json.loads(metrics.read_text().splitlines()[-1]), "iteration": 3})
    metrics.write_text(metrics.read_text() + third[: len(third) // 2])
    proc = launch(run_dir.parent, "--no-ray", "--resume", "--set", "train.iterations=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert iterations_logged(run_dir) == [1, 2, 3]


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_run_lock_planted_as_a_link_is_refused_and_its_target_left_alone(tmp_path, link):
    """A run.lock planted as a link to another file had that file truncated and overwritten with the launcher's PID
    and host (benchmarks/reliability_probe.py, run_dir/run_lock_planted_as_symlink)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = (tmp_path / "run").resolve()
    run_dir.mkdir()
    if link == "symbolic":
        (run_dir / LOCK_FILE).symlink_to(victim)
    else:
        os.link(victim, run_dir / LOCK_FILE)
    with pytest.raises(RunDirError) as info:
        lock_run_dir(run_dir)
    kind = "a symbolic link" if link == "symbolic" else "a file with 2 hard links"
    assert f"the lock file {run_dir / LOCK_FILE} is {kind}, not a plain file of its own" in str(info.value)
    assert victim.read_text() == "precious\n"

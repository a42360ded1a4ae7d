"""The adversarial probe of issue 15, repeatable: launches tried as a hostile or careless user would, each checked
against what docs/reliability.md promises.

    python benchmarks/reliability_probe.py --out /tmp/reliability_probe --jobs 1
    python benchmarks/reliability_probe.py --out /tmp/probe --only bad_config yaml   # some categories
    python benchmarks/reliability_probe.py --list                                   # the probes, nothing run

Every probe is one or more real `python -m rlhf_diffusion.launch` processes, each with a timeout, in its own
directory `<out>/<category>/<probe>/` (its stdout, stderr, config and run directories stay there). What is checked,
by category:

- run_dir: a second launch (also with --overwrite or --resume) into a run directory another launch writes exits 2
  naming that launch's PID, before Ray starts, and the first run's metrics stay whole; a fresh launch into a finished
  run exits 2 changing nothing; --overwrite replaces it; the lock of a launcher killed with -9 does not block;
  --resume with nothing to resume exits 2 leaving nothing behind; a run.lock planted as a symbolic link to another
  file is refused, that file left alone; so is --resume into a run whose metrics.jsonl is a symbolic link or whose
  eval.json is a hard link to another file.
- checkpoint: --resume past a damaged newest checkpoint (truncated learner_lora.safetensors or optimizer.pt,
  state.json cut mid-string, `latest` naming a missing or outside directory) uses the newest complete one, with one
  line naming the bad file; with every checkpoint damaged it exits 2 naming the bad files, changing nothing; a
  metrics.jsonl line torn by a crash mid-write does not stop the resume.
- resume: train.iterations below the iterations done, or a changed config field, exits 2 naming it; equal re-finishes.
- inputs: output_dir a file, under a file, unwritable, on a missing path; a custom reward returning NaN or the wrong
  shape, a held-out one returning NaN, one whose constructor fails; a Parquet source scrambled, empty, undecodable
  or missing: each one line `error: ...` naming the field and the file or target, exit 2, before Ray starts
  (no `[launch]` line), nothing written.
- reward_target: custom reward targets that are not reward code (os:system, subprocess:run, builtins:exec, a
  constant, a builtin under another name) are refused naming the target, and never called (no marker file).
- run_name: `..`, `.`, `a/b` and an empty run_name are refused naming run_name, nothing written anywhere.
- yaml: a YAML alias bomb, a 10 MB YAML with 110,000 unknown keys, a 200 kB key, a 5000-deep nesting (in the file
  and in a --set value), a non-UTF-8 file: exit 2 with one bounded message, in bounded time and memory.
- code: YAML object tags (in the file and in --set) and shell strings (in run_name, output_dir, a prompt) never run
  (no marker file).
- bad_config: 39 bad fields and overrides across the schema's sections (and a missing, unparsable or non-mapping
  file): exit 2, a message naming the field (one problem), no traceback, nothing written.
- ray: a local Ray instance listens on loopback only (psutil, while its actors run) and leaves no process behind after
  a normal end, after the launcher is killed with -9 and after a Ctrl-C (SIGINT to its process group); a sampler or a
  reward server killed with -9 is restarted and the run finishes, counting the restart; with
  resources.max_actor_restarts 0 a killed sampler ends the run with exit 1 and one line naming it and --resume.

Every launch is also checked for surviving processes (every process seen below it must be gone within 10 s of its
end, 30 s for Ray). Models are the tiny random-weight ones (`tiny:sd15`, built under each output_dir) or the shipped
testbed pipeline, runs are 1-3 iterations of 2-step rollouts, so the whole probe takes about 15 minutes on one core.
The report: a markdown table (category, probes, passed, defects: the probes that failed) and one line per failed
probe, printed and written to `<out>/report.md`; every probe's checks, times and peak memory in `<out>/results.json`.
Only processes this script started are ever signalled, by PID (or by the process group of a launch it started).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
CATEGORIES = (
    "run_dir",
    "checkpoint",
    "resume",
    "inputs",
    "reward_target",
    "run_name",
    "yaml",
    "code",
    "bad_config",
    "ray",
)

# The base run: the tiny random-weight SD1.5 pipeline, 2-step rollouts of 2 prompts, 2 iterations with a checkpoint
# after each, one held-out caption on one seed, no MLflow; one sampler and one reward server under Ray.
BASE_CONFIG = """\
run_name: probe
seed: 0
output_dir: runs
device: cpu
model: {pretrained: "tiny:sd15"}
sampling: {num_steps: 2, guidance_scale: 2.0, batch_size: 2}
algorithm: {name: diffusion_dpo}
rewards: [{name: jpeg_compressibility}]
train: {iterations: 2, learning_rate: 1.0e-3, train_batch_size: 2, signal_every: 0}
prompts: {train: {inline: [a cat, a dog]}, eval: {inline: [a cow]}, eval_seeds: 1}
tracking: {enabled: false}
checkpoint: {every: 1, keep_last: 3}
resources: {num_samplers: 1, num_reward_servers: 1, cpus_per_actor: 0.5, actor_start_timeout_s: 180}
"""

# The user's reward module for the custom-reward probes (put on PYTHONPATH).
USER_REWARDS = """\
import torch


class NaNScore:
    def score(self, images, prompts):
        return torch.full((images.shape[0],), float("nan"))


class WrongShape:
    def score(self, images, prompts):
        return torch.zeros(images.shape[0], 3)


class NeedsArg:
    def __init__(self, required):
        self.required = required

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


NOT_CALLABLE = 42
BUILTIN_ALIAS = exec
"""


# ---------------------------------------------------------------------------------------------------------------
# Running a process: output to files, its peak memory (wait4), every process seen below it, sockets it listens on
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One finished process: exit code (None when it had to be killed at its timeout), output, wall time, peak
    resident memory (MB, the process and the children it waited for), the processes seen below it and the
    (process name, address) pairs they listened on."""

    args: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    max_rss_mb: float
    tree: list[psutil.Process] = field(default_factory=list)
    listening: set[tuple[str, str]] = field(default_factory=set)
    survivors: list[str] = field(default_factory=list)
    ended_at: float = 0.0  # time.monotonic() when it ended

    def lines(self) -> list[str]:
        return [line for line in self.stderr.strip().splitlines() if line.strip()]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_all(processes: Iterable[psutil.Process]) -> None:
    for process in processes:
        if _alive(process):  # is_running() checks the creation time: a reused PID is never signalled
            try:
                process.kill()
            except psutil.Error:
                pass


def run_process(
    args: list[str],
    workdir: Path,
    *,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    watch: Callable[[subprocess.Popen, float, str, list[psutil.Process]], None] | None = None,
    sockets: bool = False,
    grace: float = 10.0,
    name: str = "launch",
) -> Run:
    """Runs `args` in its own session (cwd: the repository), output into `workdir/<name>.stdout|.stderr`; `watch`
    is called every poll with (process, seconds so far, stdout so far, processes below it). At `timeout` the
    process and everything seen below it are killed. After it ends, every process seen below it must be gone within
    `grace` seconds (those still running are the run's `survivors`, then killed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    full_env.update(env or {})
    start = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(
            args, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True
        )
        me = psutil.Process(process.pid)
        seen: dict[int, psutil.Process] = {}
        listening: set[tuple[str, str]] = set()
        killed = False
        last_sockets = 0.0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = None if killed else os.waitstatus_to_exitcode(status)
                break
            elapsed = time.monotonic() - start
            try:
                for child in me.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
            if sockets and elapsed - last_sockets > 1.0:
                last_sockets = elapsed
                for child in list(seen.values()):
                    try:
                        for s in child.net_connections(kind="inet"):
                            if s.status == psutil.CONN_LISTEN:
                                listening.add((child.name(), s.laddr.ip))
                    except psutil.Error:
                        pass
            if watch is not None:
                watch(process, elapsed, out_path.read_text(errors="replace"), list(seen.values()))
            if elapsed > timeout and not killed:
                killed = True
                _kill_all(seen.values())
                process.kill()
            time.sleep(0.2)
    ended_at = time.monotonic()
    seconds = ended_at - start
    deadline = ended_at + grace
    while any(_alive(p) for p in seen.values()) and time.monotonic() < deadline:
        time.sleep(0.25)
    survivors = [f"{p.name()} (PID {p.pid})" for p in seen.values() if _alive(p)]
    _kill_all(seen.values())
    return Run(
        args=args,
        rc=process.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        seconds=seconds,
        max_rss_mb=usage.ru_maxrss / 1024,
        tree=list(seen.values()),
        listening=listening,
        survivors=survivors,
        ended_at=ended_at,
    )


# ---------------------------------------------------------------------------------------------------------------
# Checks: each returns the problems it found ([] = the promise held)
# ---------------------------------------------------------------------------------------------------------------


def error_problems(run: Run, *needles: str, rc: int = 2, before_ray: bool = True) -> list[str]:
    """The promise of a refused launch: exit code `rc`, no traceback, exactly one stderr line starting `error: `
    and it is the last (warnings may precede it), naming every needle; with `before_ray`, no `[launch]` line (Ray
    never started)."""
    problems = []
    if run.rc != rc:
        problems.append(f"exit code {run.rc}, expected {rc}")
    if "Traceback" in run.stderr:
        problems.append("a traceback on stderr")
    lines = run.lines()
    errors = [line for line in lines if line.startswith("error: ")]
    if len(errors) != 1 or not lines or lines[-1] != errors[0]:
        problems.append(f"{len(errors)} 'error: ' lines (last stderr line: {(lines or [''])[-1][:200]!r})")
    message = errors[-1] if errors else run.stderr
    problems += [f"message does not name {needle!r}" for needle in needles if needle not in message]
    if before_ray and "[launch]" in run.stdout:
        problems.append("Ray started before the refusal")
    return problems


def config_error_problems(run: Run, source: str, *needles: str, max_lines: int = 2) -> list[str]:
    """The promise of a bad config: exit code 2, no traceback, a message starting with the config file's name, at
    most `max_lines` lines (the header and the one problem), naming every needle, nothing on stdout."""
    problems = []
    if run.rc != 2:
        problems.append(f"exit code {run.rc}, expected 2")
    if "Traceback" in run.stderr:
        problems.append("a traceback on stderr")
    lines = run.lines()
    if not lines or not lines[0].startswith(f"{source}: "):
        problems.append(f"message does not start with the config file (first line {(lines or [''])[0][:200]!r})")
    if len(lines) > max_lines:
        problems.append(f"{len(lines)} stderr lines, expected at most {max_lines}")
    problems += [f"message does not name {needle!r}" for needle in needles if needle not in run.stderr]
    if run.stdout.strip():
        problems.append(f"stdout not empty: {run.stdout.strip()[:200]!r}")
    return problems


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under `directory` ({} if it does not exist)."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def unchanged_problems(directory: Path, before: dict[str, tuple[int, int]], ignore: Iterable[str] = ()) -> list[str]:
    after = snapshot(directory)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and k not in set(ignore))
    return [f"{directory} changed: {', '.join(changed[:6])}"] if changed else []


def absent_problems(*paths: Path) -> list[str]:
    return [f"{path} was written" for path in paths if path.exists() or path.is_symlink()]


def bound_problems(run: Run, seconds: float, rss_mb: float) -> list[str]:
    problems = []
    if run.seconds > seconds:
        problems.append(f"took {run.seconds:.1f} s (bound {seconds:.0f} s)")
    if run.max_rss_mb > rss_mb:
        problems.append(f"peak memory {run.max_rss_mb:.0f} MB (bound {rss_mb:.0f} MB)")
    return problems


def survivor_problems(run: Run) -> list[str]:
    return [f"still running after the launcher ended: {', '.join(run.survivors)}"] if run.survivors else []


def metrics_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    category: str
    name: str
    run: Callable[[Context, Path], list[str]]
    ray: bool = False


@dataclass
class Result:
    category: str
    name: str
    passed: bool
    problems: list[str]
    seconds: float
    runs: list[dict]


class Context:
    """The probe's out folder, the base config, the launches made so far (for the results) and shared fixtures."""

    def __init__(self, out: Path):
        self.out = out
        self.base = out / "base.yaml"
        self.base.write_text(BASE_CONFIG)
        self.user_dir = out / "user_modules"
        self.user_dir.mkdir(exist_ok=True)
        (self.user_dir / "probe_rewards.py").write_text(USER_REWARDS)
        self._lock = threading.Lock()
        self.runs: dict[str, list[Run]] = {}

    def launch(self, where: Path, *args: str, config: Path | None = None, out: Path | None = None, **kw) -> Run:
        """`python -m rlhf_diffusion.launch CONFIG --no-progress --set output_dir=OUT ARGS`, run in `where`."""
        output = out if out is not None else where / "runs"
        argv = [sys.executable, "-m", "rlhf_diffusion.launch", str(config or self.base), "--no-progress"]
        argv += ["--set", f"output_dir={output}", *args]
        run = run_process(argv, where, **kw)
        self.runs.setdefault(str(where), []).append(run)
        return run

    @contextmanager
    def finished_run(self) -> Iterator[Path]:
        """A finished run (2 iterations, checkpoints iter_000001 and iter_000002) for one probe at a time, restored
        as it was made before each: the run directory. It is made once; --resume refuses another output_dir, so
        the probes that damage or resume it use it in place."""
        with self._lock:
            fixture = self.out / "_fixture"
            run_dir, backup = fixture / "runs" / "probe", fixture / "backup"
            if not backup.exists():
                run = self.launch(fixture, "--no-ray", timeout=300)
                if run.rc != 0:
                    raise RuntimeError(f"the fixture run failed ({run.rc}): {run.stderr[-2000:]}")
                shutil.copytree(run_dir, backup)
            shutil.rmtree(run_dir)
            shutil.copytree(backup, run_dir)
            yield run_dir


def on_finished_run(body: Callable[[Context, Path, Path], list[str]]) -> Callable[[Context, Path], list[str]]:
    """A probe of `body(ctx, where, run_dir)` on the finished run (`Context.finished_run`), launched in place."""

    def probe(ctx: Context, where: Path) -> list[str]:
        with ctx.finished_run() as run_dir:
            return body(ctx, where, run_dir)

    return probe


def lock_holder_pid(run_dir: Path) -> str | None:
    lock = run_dir / "run.lock"
    words = lock.read_text().split() if lock.is_file() else []
    return words[0] if words else None


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


# -- run_dir -------------------------------------------------------------------------------------------------------


def running(process: subprocess.Popen) -> bool:
    """Whether a process `run_process` waits for is still running (without reaping it: `run_process` does)."""
    try:
        return psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def probe_concurrent(ctx: Context, where: Path) -> dict[str, list[str]]:
    """One long launch (--no-ray, 12 iterations); while it writes, three more into its run directory: plain (under
    Ray), --overwrite and --resume. Returns the problems of four probes: the three refusals and the first run."""
    run_dir = where / "runs" / "probe"
    attempts: dict[str, Run] = {}
    still_running: dict[str, bool] = {}
    first_pid: list[int] = []

    def watch(process, elapsed, stdout, tree):
        if attempts or lock_holder_pid(run_dir) != str(process.pid) or "[iter    1]" not in stdout:
            return
        first_pid.append(process.pid)
        for label, extra in (("second", ()), ("overwrite", ("--overwrite",)), ("resume", ("--resume", "--no-ray"))):
            attempts[label] = ctx.launch(where / label, *extra, out=where / "runs", timeout=120)
            still_running[label] = running(process)

    first = ctx.launch(
        where, "--no-ray", "--set", "train.iterations=12", "--set", "sampling.num_steps=4", timeout=400, watch=watch
    )
    results: dict[str, list[str]] = {}
    for label in ("second", "overwrite", "resume"):
        if label not in attempts:
            results[label] = ["the first launch never reached iteration 1 holding the lock: nothing was tried"]
            continue
        needles = ("is in use by another run", str(run_dir), f"(PID {first_pid[0]} ")
        results[label] = error_problems(attempts[label], *needles) + survivor_problems(attempts[label])
        if not still_running[label]:
            results[label].append("the first launch had ended before this one was refused: inconclusive")
    first_problems = [] if first.rc == 0 else [f"the first launch exited {first.rc}: {first.stderr[-300:]!r}"]
    if metrics_iterations(run_dir) != list(range(1, 13)):
        first_problems.append(f"the first run's metrics.jsonl holds iterations {metrics_iterations(run_dir)}")
    results["first"] = first_problems + survivor_problems(first)
    return results


@on_finished_run
def p_fresh_into_finished(ctx: Context, where: Path, run_dir: Path) -> list[str]:
    before = snapshot(run_dir)
    run = ctx.launch(where, out=run_dir.parent, timeout=120)  # under Ray: refused before it starts
    problems = error_problems(run, str(run_dir), "already holds a run", "--resume", "--overwrite")
    return problems + unchanged_problems(run_dir, before, ignore={"run.lock"})


@on_finished_run
def p_overwrite_replaces(ctx: Context, where: Path, run_dir: Path) -> list[str]:
    run = ctx.launch(where, "--no-ray", "--overwrite", "--set", "train.iterations=1", timeout=240, out=run_dir.parent)
    problems = [] if run.rc == 0 else [f"exit code {run.rc}: {run.stderr[-300:]!r}"]
    if metrics_iterations(run_dir) != [1]:
        problems.append(f"metrics.jsonl holds iterations {metrics_iterations(run_dir)}, expected [1]")
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    if kept != ["iter_000001"]:
        problems.append(f"checkpoints after --overwrite: {kept}")
    return problems + survivor_problems(run)


def p_killed_lock_does_not_block(ctx: Context, where: Path) -> list[str]:
    """A launch killed with -9 while it writes; the next launch (--overwrite) into its run directory runs."""
    run_dir = where / "runs" / "probe"

    def watch(process, elapsed, stdout, tree):
        if "[iter    1]" in stdout and running(process):
            os.kill(process.pid, signal.SIGKILL)

    first = ctx.launch(where, "--no-ray", "--set", "train.iterations=20", timeout=300, watch=watch, name="killed")
    problems = [] if first.rc == -signal.SIGKILL else [f"the first launch was not killed (exit {first.rc})"]
    again = ctx.launch(where, "--no-ray", "--overwrite", "--set", "train.iterations=1", timeout=240, name="again")
    if again.rc != 0:
        problems.append(f"the launch after the kill exited {again.rc}: {again.stderr.strip()[-300:]!r}")
    if metrics_iterations(run_dir) != [1]:
        problems.append(f"metrics.jsonl holds iterations {metrics_iterations(run_dir)}, expected [1]")
    return problems + survivor_problems(first) + survivor_problems(again)


def p_resume_nothing(ctx: Context, where: Path) -> list[str]:
    """--resume where no run was ever made (the testbed model: resolving it writes nothing): exit 2, one line,
    nothing left behind."""
    out = where / "runs"
    run = ctx.launch(where, "--no-ray", "--resume", "--set", "model.pretrained=testbed:pipeline", timeout=180)
    return error_problems(run, "--resume", str(out / "probe"), before_ray=False) + absent_problems(out)


def p_run_lock_planted_as_symlink(ctx: Context, where: Path) -> list[str]:
    """A run.lock planted in the run directory as a symbolic link to another file (someone who can write the
    directory): the launch is refused naming it, and the file it points to is left alone."""
    run_dir = where / "runs" / "probe"
    run_dir.mkdir(parents=True)
    victim = where / "victim.txt"
    victim.write_text("precious\n")
    (run_dir / "run.lock").symlink_to(victim)
    run = ctx.launch(where, timeout=120)
    problems = error_problems(run, str(run_dir / "run.lock"), "symbolic link")
    if victim.read_text() != "precious\n":
        problems.append(f"the link's target was overwritten: {victim.read_text()[:80]!r}")
    return problems + survivor_problems(run)


def p_output_planted_as_link(name: str, link: str):
    """A probe: an output of the finished run (`name`, relative to the run directory) replaced by a `link`
    ("symbolic" or "hard") to another file, then --resume: refused naming it, the linked file left alone."""

    @on_finished_run
    def probe(ctx: Context, where: Path, run_dir: Path) -> list[str]:
        where.mkdir(parents=True, exist_ok=True)
        victim = where / "victim.txt"
        victim.write_text("precious\n")
        planted = run_dir / name
        planted.unlink()
        planted.symlink_to(victim) if link == "symbolic" else os.link(victim, planted)
        run = ctx.launch(where, "--resume", "--set", "train.iterations=3", timeout=120, out=run_dir.parent)
        problems = error_problems(run, str(planted), "symbolic link" if link == "symbolic" else "2 hard links")
        if victim.read_text() != "precious\n":
            problems.append(f"the link's target was written: {victim.read_text()[:80]!r}")
        return problems + survivor_problems(run)

    return probe


# -- checkpoint ----------------------------------------------------------------------------------------------------


def truncate(path: Path, keep: int | None = None, cut: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep is not None else data[:-cut])


def cut_state_json(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: text.index('"seed": ') + 2])  # mid-string


def resume_fallback_probe(damage: Callable[[Path], Path | None], expect_from: str, skipped: bool = True):
    """A probe: damage the finished run (`damage(run_dir)` returns the bad file, or None when no checkpoint is to
    be skipped: `latest` or metrics.jsonl damaged), then --resume to 3 iterations: exit 0, a `[resume] skipping`
    line naming the bad file (when `skipped`), resumed from `expect_from`, metrics 1..3 once each."""

    @on_finished_run
    def probe(ctx: Context, where: Path, run_dir: Path) -> list[str]:
        bad = damage(run_dir)
        run = ctx.launch(where, "--no-ray", "--resume", "--set", "train.iterations=3", timeout=240, out=run_dir.parent)
        problems = [] if run.rc == 0 else [f"exit code {run.rc}: {run.stderr.strip()[-300:]!r}"]
        skips = [line for line in run.stdout.splitlines() if line.startswith("[resume] skipping")]
        if skipped and not (len(skips) == 1 and bad is not None and f"corrupt checkpoint file {bad}" in skips[0]):
            problems.append(f"expected one '[resume] skipping' line naming {bad}, got {skips}")
        if not skipped and skips:
            problems.append(f"unexpected skips: {skips}")
        start = f"[resume] from {run_dir / 'checkpoints' / expect_from}:"
        if start not in run.stdout:
            problems.append(f"did not resume from {expect_from}")
        if metrics_iterations(run_dir) != [1, 2, 3]:
            problems.append(f"metrics.jsonl holds iterations {metrics_iterations(run_dir)}, expected [1, 2, 3]")
        return problems + survivor_problems(run)

    return probe


def _damage_lora(run_dir: Path) -> Path:
    bad = run_dir / "checkpoints" / "iter_000002" / "learner_lora.safetensors"
    truncate(bad, keep=100)
    return bad


def _damage_optimizer(run_dir: Path) -> Path:
    bad = run_dir / "checkpoints" / "iter_000002" / "optimizer.pt"
    truncate(bad, cut=200)
    return bad


def _damage_state(run_dir: Path) -> Path:
    bad = run_dir / "checkpoints" / "iter_000002" / "state.json"
    cut_state_json(bad)
    return bad


def _torn_metrics_line(run_dir: Path) -> None:
    """What a launcher killed mid-write of iteration 3's metrics line leaves: half a line, after checkpoint 2."""
    metrics = run_dir / "metrics.jsonl"
    third = json.dumps({**json.loads(metrics.read_text().splitlines()[-1]), "iteration": 3})
    metrics.write_text(metrics.read_text() + third[: len(third) // 2])


def _latest_missing(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "latest").write_text("iter_000009\n")


def _latest_outside(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "latest").write_text("../../../../../../etc\n")


def refused_resume_problems(ctx: Context, where: Path, run_dir: Path, sets: list[str], *needles: str) -> list[str]:
    """The problems of `--resume` of the finished run (with `--set` of each of `sets`), which must be refused before
    Ray starts with one `error:` line naming the needles (`error_problems`), the run directory unchanged but for its
    lock."""
    before = snapshot(run_dir)
    overrides = [a for setting in sets for a in ("--set", setting)]
    run = ctx.launch(where, "--no-ray", "--resume", *overrides, timeout=180, out=run_dir.parent)
    problems = error_problems(run, *needles, before_ray=False)
    return problems + unchanged_problems(run_dir, before, ignore={"run.lock"})


@on_finished_run
def p_all_checkpoints_damaged(ctx: Context, where: Path, run_dir: Path) -> list[str]:
    state = _damage_state(run_dir)
    optimizer = run_dir / "checkpoints" / "iter_000001" / "optimizer.pt"
    truncate(optimizer, cut=200)
    return refused_resume_problems(ctx, where, run_dir, [], "no complete checkpoint", str(state), str(optimizer))


# -- resume --------------------------------------------------------------------------------------------------------


@on_finished_run
def p_resume_below(ctx: Context, where: Path, run_dir: Path) -> list[str]:
    needle = "train.iterations=1 is below the 2 iterations"
    return refused_resume_problems(ctx, where, run_dir, ["train.iterations=1"], needle, str(run_dir))


@on_finished_run
def p_resume_equal(ctx: Context, where: Path, run_dir: Path) -> list[str]:
    run = ctx.launch(where, "--no-ray", "--resume", timeout=180, out=run_dir.parent)
    problems = [] if run.rc == 0 else [f"exit code {run.rc}: {run.stderr.strip()[-300:]!r}"]
    if metrics_iterations(run_dir) != [1, 2]:
        problems.append(f"metrics.jsonl holds iterations {metrics_iterations(run_dir)}, expected [1, 2]")
    return problems


@on_finished_run
def p_resume_changed_config(ctx: Context, where: Path, run_dir: Path) -> list[str]:
    return refused_resume_problems(ctx, where, run_dir, ["algorithm.beta=0.5"], "algorithm.beta", str(run_dir))


# -- inputs --------------------------------------------------------------------------------------------------------


def refused_input(make: Callable[[Path], tuple[list[str], list[str], dict]], seconds: float = 90):
    """A probe: `make(where)` returns (extra launch args, needles, extra env); the launch (under Ray, unless
    refused first) must be refused with one `error:` line naming the needles, before Ray starts, within `seconds`,
    writing nothing under `where/runs`."""

    def probe(ctx: Context, where: Path) -> list[str]:
        args, needles, env = make(where)
        run = ctx.launch(where, *args, timeout=seconds + 60, env=env)
        problems = error_problems(run, *needles) + bound_problems(run, seconds, 3000)
        return problems + absent_problems(where / "runs") + survivor_problems(run)

    return probe


def _output_dir(kind: str):
    def make(where: Path):
        where.mkdir(parents=True, exist_ok=True)
        (where / "a_file").write_text("not a directory")
        if kind == "file":
            target = where / "a_file"
        elif kind == "under_file":
            target = where / "a_file" / "below"
        elif kind == "missing_path":
            target = Path("/proc/no_such_dir/runs")
        elif os.geteuid() == 0:  # root writes through file modes: a file system that refuses mkdir instead
            target = Path("/sys/rlhf_probe_runs")
        else:
            (where / "read_only").mkdir()
            (where / "read_only").chmod(stat.S_IRUSR | stat.S_IXUSR)
            target = where / "read_only" / "runs"
        return ["--set", f"output_dir={target}"], ["cannot write the run directory", str(target)], {}

    return make


def _custom_reward(section: str, target: str, fragment: str):
    def make(where: Path):
        entry = f"[{{name: custom, target: '{target}'}}]"
        key = "rewards" if section == "rewards" else "guards.heldout_rewards"
        env = {"PYTHONPATH": os.pathsep.join([str(where.parent.parent / "user_modules"), str(ROOT)])}
        return ["--set", f"{key}={entry}"], [f"{key}.0.target", repr(target), fragment], env

    return make


def _parquet_source(kind: str):
    def make(where: Path):
        where.mkdir(parents=True, exist_ok=True)
        path = write_bad_source_elsewhere(kind, where)
        return ["--set", f"data={{format: pickapic_parquet, path: {path}}}"], ["data.path: ", str(path)], {}

    return make


def write_bad_source_elsewhere(kind: str, directory: Path) -> Path:
    """`write_bad_source` in another process: this one stays small (pyarrow, torch never imported here), so the
    peak memory of what it starts (ru_maxrss, which counts the memory the child had when it was forked) is theirs."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[3]); from reliability_probe import write_bad_source; "
        "print(write_bad_source(sys.argv[1], __import__('pathlib').Path(sys.argv[2])))"
    )
    args = [sys.executable, "-c", code, kind, str(directory), str(Path(__file__).resolve().parent)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def write_bad_source(kind: str, directory: Path) -> Path:
    """A Pick-a-Pic v2 Parquet file that yields no pair: empty, every image undecodable, pages scrambled (footer
    readable), or a path that does not exist."""
    import numpy as np
    from PIL import Image

    from rlhf_diffusion.data.preference import PickapicRow, write_pickapic_parquet

    prompts = ["a cat", "a dog", "a fox"]
    if kind == "missing":
        return directory / "no_such.parquet"
    if kind == "empty":
        return write_pickapic_parquet(directory / "empty.parquet", [], row_group_size=6)
    if kind == "undecodable":
        rows = [PickapicRow(prompts[i % 3], b"not a jpeg", b"nor this", float(i % 2)) for i in range(12)]
        return write_pickapic_parquet(directory / "undecodable.parquet", rows, row_group_size=6)
    rng = np.random.default_rng(0)

    def image(seed: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))

    rows = [PickapicRow(prompts[i % 3], image(2 * i), image(2 * i + 1), float(i % 2)) for i in range(12)]
    path = write_pickapic_parquet(directory / "scrambled.parquet", rows, row_group_size=6)
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for start in range(4, len(data) - footer - 64, 997):
        data[start : start + 48] = rng.integers(0, 256, 48, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


# -- reward_target -------------------------------------------------------------------------------------------------


def refused_target(target: str, kwargs: str, fragment: str):
    """A custom reward `target` (with `kwargs`, in which MARKER is the marker file's path) that must be refused
    naming it, without being called: exit 2, no marker file, nothing written."""

    def probe(ctx: Context, where: Path) -> list[str]:
        where.mkdir(parents=True, exist_ok=True)
        marker = where / "MARKER"
        entry = f"[{{name: custom, target: '{target}', kwargs: {kwargs.replace('MARKER', str(marker))}}}]"
        env = {"PYTHONPATH": os.pathsep.join([str(ctx.user_dir), str(ROOT)])}
        run = ctx.launch(where, "--set", f"rewards={entry}", timeout=120, env=env)
        problems = error_problems(run, repr(target), fragment) + absent_problems(marker, where / "runs")
        return problems + survivor_problems(run)

    return probe


# -- run_name, bad_config, yaml, code: refused by the config ------------------------------------------------------


def refused_config(
    args: list[str],
    needles: list[str],
    *,
    config: Callable[[Path], Path] | None = None,
    seconds: float = 30,
    rss_mb: float = 1000,
    max_lines: int = 2,
    max_chars: int | None = None,
):
    """A probe: the launch with the overrides `args` (each a `--set`; MARKER in one stands for the marker file's
    path), on `config(where)` or the base config, exits 2 with a message starting with the config file's name, at
    most `max_lines` lines, naming the needles, within `seconds` and `rss_mb`; it writes nothing (no output_dir, no
    run.lock in `where`, no marker file)."""

    def probe(ctx: Context, where: Path) -> list[str]:
        where.mkdir(parents=True, exist_ok=True)
        source = config(where) if config is not None else ctx.base
        marker_path = where / "MARKER"
        filled = [word for a in args for word in ("--set", a.replace("MARKER", str(marker_path)))]
        run = ctx.launch(where, *filled, config=source, timeout=seconds + 60)
        problems = config_error_problems(run, str(source), *needles, max_lines=max_lines)
        problems += bound_problems(run, seconds, rss_mb)
        if max_chars is not None and len(run.stderr) > max_chars:
            problems.append(f"a {len(run.stderr)}-character message (bound {max_chars})")
        problems += absent_problems(where / "runs", where / "run.lock", marker_path)
        return problems + survivor_problems(run)

    return probe


def yaml_file(name: str, text: str | bytes) -> Callable[[Path], Path]:
    def make(where: Path) -> Path:
        path = where / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text.replace("MARKER", str(where / "MARKER")))
        return path

    return make


BASE_KEYS = "model: {pretrained: tiny:sd15}\nalgorithm: {name: d3po}\nrewards: [{name: brightness}]\n"


def alias_bomb() -> str:
    lines, prev = ['a: &a ["x","x","x","x","x","x","x","x","x"]'], "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "bombs:\n" + "\n".join("  " + line for line in lines) + f"\nrun_name: *{prev}\n" + BASE_KEYS


def many_keys() -> str:
    """10 MB: 110,000 unknown keys of 80 characters."""
    return BASE_KEYS + "".join(f"unknown_key_{i:06d}_{'x' * 60}: value_{i}\n" for i in range(110_000))


def p_shell_strings_run(ctx: Context, where: Path) -> list[str]:
    """Shell syntax in output_dir and in a prompt reaches no shell: the run finishes, no marker file, the directory
    is made with the literal name."""
    where.mkdir(parents=True, exist_ok=True)
    marker = where / "MARKER"
    out = where / f"runs_$(touch {marker})_`touch {marker}`"
    prompt = f"a cat; touch {marker}; $(touch {marker})"
    run = ctx.launch(where, "--no-ray", "--set", f"prompts.train={{inline: [{json.dumps(prompt)}]}}", out=out)
    problems = [] if run.rc == 0 else [f"exit code {run.rc}: {run.stderr.strip()[-300:]!r}"]
    if not (out / "probe" / "metrics.jsonl").is_file():
        problems.append(f"no run under the literal directory {out}")
    return problems + absent_problems(marker) + survivor_problems(run)


# -- ray -----------------------------------------------------------------------------------------------------------

RAY_CORE = {"gcs_server", "raylet"}


def _names(tree: list[psutil.Process]) -> set[str]:
    names = set()
    for process in tree:
        try:
            names.add(process.name().split(".")[0])
        except psutil.Error:
            pass
    return names


def probe_ray_normal(ctx: Context, where: Path) -> dict[str, list[str]]:
    """A short run under a local Ray instance: every listening socket of the launcher's tree on loopback (sampled
    while it runs), and no process of the tree left 30 s after the launcher ended."""
    run = ctx.launch(where, timeout=300, sockets=True, grace=30)
    base = [] if run.rc == 0 else [f"exit code {run.rc}: {run.stderr.strip()[-300:]!r}"]
    names = {name for name, _ in run.listening}
    loopback = list(base)
    if not RAY_CORE <= names:
        loopback.append(f"no listening socket seen of {sorted(RAY_CORE - names)} (saw {sorted(names)})")
    outside = sorted({f"{name} on {ip}" for name, ip in run.listening if ip not in LOOPBACK})
    if outside:
        loopback.append(f"listening outside loopback: {', '.join(outside)}")
    return {"loopback": loopback, "normal_end": base + survivor_problems(run)}


def _when_actors_up(action: Callable[[subprocess.Popen, list[psutil.Process]], None], after: str = "[iter    1]"):
    """A `watch` that calls `action(process, tree)` once, when `after` is on stdout and the learner, sampler and
    reward server processes are up."""
    done: list[bool] = []

    def watch(process, elapsed, stdout, tree):
        if done or after not in stdout:
            return
        if {"ray::Learner", "ray::Sampler", "ray::RewardServer"} <= _names(tree):
            done.append(True)
            action(process, tree)

    watch.done = done  # type: ignore[attr-defined]
    return watch


def p_ray_kill9_launcher(ctx: Context, where: Path) -> list[str]:
    watch = _when_actors_up(lambda process, tree: os.kill(process.pid, signal.SIGKILL))
    run = ctx.launch(where, "--set", "train.iterations=20", timeout=300, watch=watch, grace=30)
    problems = [] if watch.done else ["the actors never came up: nothing was killed"]  # type: ignore[attr-defined]
    if run.rc != -signal.SIGKILL:
        problems.append(f"the launcher exited {run.rc}, not killed")
    return problems + survivor_problems(run)


def p_ray_ctrl_c(ctx: Context, where: Path) -> list[str]:
    """SIGINT to the launch's process group (what Ctrl-C in its terminal does): it ends within 60 s with exit code
    130 and, as its last line, one `error: interrupted (Ctrl-C); ...` line naming where `--resume` continues from
    (no traceback), leaving no process behind."""
    killed_at: list[float] = []

    def interrupt(process, tree):
        killed_at.append(time.monotonic())
        os.killpg(process.pid, signal.SIGINT)  # the group run_process made for this launch, and only it

    watch = _when_actors_up(interrupt)
    run = ctx.launch(where, "--set", "train.iterations=20", timeout=300, watch=watch, grace=30)
    if not killed_at:
        return ["the actors never came up: nothing was interrupted"]
    problems = [] if run.rc == 130 else [f"exit code {run.rc} after Ctrl-C (expected 130)"]
    if "Traceback" in run.stderr:
        problems.append("a traceback after Ctrl-C")
    if not (run.lines() and run.lines()[-1].startswith("error: interrupted (Ctrl-C); ")):
        problems.append(f"the last line is not the interruption's: {(run.lines() or [''])[-1][:200]!r}")
    if run.ended_at - killed_at[0] > 60:
        problems.append(f"ended {run.ended_at - killed_at[0]:.0f} s after Ctrl-C (bound 60 s)")
    return problems + survivor_problems(run)


def _kill_actor(role: str):
    def action(process, tree):
        for child in tree:
            try:
                if child.name().split(".")[0] == role:
                    child.kill()
                    return
            except psutil.Error:
                continue

    return action


def p_ray_actor_killed(role: str, counter: str):
    """A probe: `role`'s process killed with -9 after iteration 1 (Ray restarts it, max_actor_restarts 3): the run
    finishes (exit 0, iterations 1..4) and the last metrics line counts the restart."""

    def probe(ctx: Context, where: Path) -> list[str]:
        watch = _when_actors_up(_kill_actor(role))
        run = ctx.launch(where, "--set", "train.iterations=4", timeout=400, watch=watch, grace=30)
        problems = [] if watch.done else ["the actors never came up: nothing was killed"]  # type: ignore[attr-defined]
        if run.rc != 0:
            problems.append(f"exit code {run.rc}: {run.stderr.strip()[-300:]!r}")
        run_dir = where / "runs" / "probe"
        if metrics_iterations(run_dir) != [1, 2, 3, 4]:
            problems.append(f"metrics.jsonl holds iterations {metrics_iterations(run_dir)}")
        else:
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            if last.get(counter, 0) < 1:
                problems.append(f"{counter} = {last.get(counter)} after the kill")
        return problems + survivor_problems(run)

    return probe


def p_ray_no_restarts(ctx: Context, where: Path) -> list[str]:
    """resources.max_actor_restarts 0, the sampler killed with -9 after iteration 1: exit 1, one `error:` line
    naming the sampler, the field and --resume."""
    watch = _when_actors_up(_kill_actor("ray::Sampler"))
    run = ctx.launch(
        where,
        "--set",
        "train.iterations=6",
        "--set",
        "resources.max_actor_restarts=0",
        timeout=400,
        watch=watch,
        grace=30,
    )
    if not watch.done:  # type: ignore[attr-defined]
        return ["the actors never came up: nothing was killed"]
    problems = error_problems(run, "sampler 0 died", "max_actor_restarts", "--resume", rc=1, before_ray=False)
    return problems + survivor_problems(run)


# -- the list ------------------------------------------------------------------------------------------------------

# 39 bad fields and overrides across the schema's sections: (name, overrides, the needle naming the field).
BAD_CONFIGS: list[tuple[str, list[str], str]] = [
    ("run_name_slash", ["run_name=a/b"], "  run_name: "),
    ("seed_negative", ["seed=-1"], "  seed: "),
    ("device_unknown", ["device=tpu"], "  device: "),
    ("output_dir_empty", ["output_dir=''"], "  output_dir: "),
    ("unknown_top_key", ["learning_rate=1e-4"], "  learning_rate: unknown key"),
    ("tiny_model_unknown", ["model.pretrained=tiny:sd9"], "  model.pretrained: "),
    ("model_dir_missing", ["model.pretrained=/nonexistent/model"], "  model.pretrained: no such directory"),
    ("resolution_not_multiple_of_8", ["model.resolution=500"], "  model.resolution: "),
    ("lora_rank_zero", ["model.lora.rank=0"], "  model.lora.rank: "),
    ("eta_zero", ["sampling.eta=0"], "  sampling.eta: "),
    ("num_steps_zero", ["sampling.num_steps=0"], "  sampling.num_steps: "),
    ("guidance_below_one", ["sampling.guidance_scale=0.5"], "  sampling.guidance_scale: "),
    ("algorithm_unknown", ["algorithm.name=ppo"], "  algorithm.name: unknown algorithm 'ppo'"),
    ("beta_negative", ["algorithm.beta=-1"], "  algorithm.beta: "),
    ("timestep_range_reversed", ["algorithm.timestep_range=[700, 200]"], "  algorithm.timestep_range: "),
    ("key_of_another_algorithm", ["algorithm.num_candidates=4"], "  algorithm.num_candidates: unknown key"),
    ("rewards_empty", ["rewards=[]"], "  rewards: "),
    ("reward_weight_zero", ["rewards.0.weight=0"], "  rewards.0.weight: "),
    ("reward_unknown", ["rewards.0.name=beauty"], "  rewards.0.name: "),
    ("reward_duplicate", ["rewards=[{name: brightness}, {name: brightness}]"], "  rewards.1.name: duplicate"),
    ("reward_not_differentiable", ["algorithm={name: tailorpo_g}"], "  rewards.0.name: is not differentiable"),
    ("num_samplers_zero", ["resources.num_samplers=0"], "  resources.num_samplers: "),
    ("cpus_per_actor_zero", ["resources.cpus_per_actor=0"], "  resources.cpus_per_actor: "),
    ("iterations_zero", ["train.iterations=0"], "  train.iterations: "),
    ("learning_rate_negative", ["train.learning_rate=-1"], "  train.learning_rate: "),
    ("fp16_on_cpu", ["train.mixed_precision=fp16"], "  train.mixed_precision: 'fp16' needs CUDA"),
    ("prompts_two_sources", ["prompts.train={builtin: simple_animals, inline: [a cat]}"], "  prompts.train: "),
    ("prompt_file_missing", ["prompts.train={file: /nonexistent/prompts.txt}"], "  prompts.train.file: "),
    ("eval_seeds_zero", ["prompts.eval_seeds=0"], "  prompts.eval_seeds: "),
    ("log_every_zero", ["tracking.log_every=0"], "  tracking.log_every: "),
    ("keep_last_zero", ["checkpoint.keep_last=0"], "  checkpoint.keep_last: "),
    (
        "early_stop_unknown_reward",
        ["guards.early_stop={reward: nope, drop_fraction: 0.5}"],
        "  guards.early_stop.reward: ",
    ),
    ("data_format_unknown", ["data={format: csv, path: x.parquet}"], "  data.format: "),
    ("override_without_value", ["train.learning_rate"], "bad override 'train.learning_rate': expected key.path=value"),
    ("override_index_out_of_range", ["rewards.3.weight=1"], "bad override 'rewards.3.weight=1': list index 3"),
    ("override_not_yaml", ["prompts.train.inline=[a, b"], "value is not valid YAML"),
]
BAD_CONFIG_FILES: list[tuple[str, str | None, str]] = [  # (name, file text (None: no file), needle)
    ("config_file_missing", None, "no such config file"),
    ("config_not_yaml", BASE_KEYS + "train: {iterations: 2\n", "YAML syntax error at line"),
]


def all_probes() -> list[Probe]:
    probes: list[Probe] = []

    def add(category: str, name: str, run, ray: bool = False) -> None:
        probes.append(Probe(category, name, run, ray))

    # run_dir: the concurrent launches are one experiment with four verdicts (see `grouped`)
    for label in ("second", "overwrite", "resume", "first"):
        add("run_dir", f"concurrent_{label}", grouped("concurrent", probe_concurrent, label))
    add("run_dir", "fresh_into_finished_run", p_fresh_into_finished)
    add("run_dir", "overwrite_replaces", p_overwrite_replaces)
    add("run_dir", "lock_of_killed_launch_does_not_block", p_killed_lock_does_not_block)
    add("run_dir", "resume_with_nothing_to_resume", p_resume_nothing)
    add("run_dir", "run_lock_planted_as_symlink", p_run_lock_planted_as_symlink)
    add("run_dir", "metrics_planted_as_symlink", p_output_planted_as_link("metrics.jsonl", "symbolic"))
    add("run_dir", "eval_json_planted_as_hard_link", p_output_planted_as_link("eval.json", "hard"))

    add("checkpoint", "truncated_learner_lora", resume_fallback_probe(_damage_lora, "iter_000001"))
    add("checkpoint", "truncated_optimizer", resume_fallback_probe(_damage_optimizer, "iter_000001"))
    add("checkpoint", "state_json_cut_mid_string", resume_fallback_probe(_damage_state, "iter_000001"))
    add("checkpoint", "latest_names_missing_dir", resume_fallback_probe(_latest_missing, "iter_000002", False))
    add("checkpoint", "latest_points_outside", resume_fallback_probe(_latest_outside, "iter_000002", False))
    add("checkpoint", "every_checkpoint_damaged", p_all_checkpoints_damaged)
    add("checkpoint", "metrics_line_torn", resume_fallback_probe(_torn_metrics_line, "iter_000002", False))

    add("resume", "iterations_below_done", p_resume_below)
    add("resume", "iterations_equal_refinishes", p_resume_equal)
    add("resume", "changed_config_field", p_resume_changed_config)

    for kind in ("file", "under_file", "unwritable", "missing_path"):
        add("inputs", f"output_dir_{kind}", refused_input(_output_dir(kind)))
    for section, target, fragment in (
        ("rewards", "probe_rewards:NaNScore", "returned non-finite scores"),
        ("rewards", "probe_rewards:WrongShape", "expected (2,)"),
        ("heldout", "probe_rewards:NaNScore", "returned non-finite scores"),
        ("rewards", "probe_rewards:NeedsArg", "missing a required argument"),
    ):
        label = {"NaNScore": "nan", "WrongShape": "wrong_shape", "NeedsArg": "constructor_fails"}[target.split(":")[1]]
        add("inputs", f"custom_reward_{label}" + ("_heldout" if section == "heldout" else ""),
            refused_input(_custom_reward(section, target, fragment)))  # fmt: skip
    for kind in ("scrambled", "empty", "undecodable", "missing"):
        add("inputs", f"parquet_{kind}", refused_input(_parquet_source(kind)))

    for name, target, kwargs, fragment in (
        ("os_system", "os:system", "{command: 'touch MARKER'}", "standard library"),
        ("subprocess_run", "subprocess:run", "{args: [touch, MARKER]}", "standard library"),
        ("builtins_exec", "builtins:exec", "{source: \"open('MARKER', 'w')\"}", "standard library"),
        ("module_constant", "probe_rewards:NOT_CALLABLE", "{}", "not a class or a"),
        ("builtin_alias", "probe_rewards:BUILTIN_ALIAS", "{source: \"open('MARKER', 'w')\"}", "not a class or a"),
    ):
        add("reward_target", name, refused_target(target, kwargs, fragment))

    for name, value in (("dotdot", ".."), ("dot", "."), ("slash_escape", "../escape"), ("empty", "")):
        add("run_name", name, refused_config([f"run_name={value}"], ["  run_name: "]))

    add("yaml", "alias_bomb", refused_config([], ["  run_name: ", "bombs: unknown key"],
        config=yaml_file("bomb.yaml", alias_bomb()), seconds=10, rss_mb=500, max_lines=3, max_chars=2000))  # fmt: skip
    add("yaml", "ten_mb_110k_unknown_keys", refused_config([], ["invalid config (110000 problems)", "and 109980 more"],
        config=lambda w: yaml_file("many.yaml", many_keys())(w), seconds=60, rss_mb=1500, max_lines=22,
        max_chars=30_000))  # fmt: skip
    add("yaml", "key_of_200kb", refused_config([], ["characters)"], config=yaml_file("huge.yaml",
        BASE_KEYS + "? " + "k" * 200_000 + "\n: 1\n"), max_lines=2, max_chars=3000))  # fmt: skip
    add("yaml", "nesting_5000_deep_in_file", refused_config([], [], config=yaml_file("deep.yaml",
        BASE_KEYS + "x: " + "[" * 5000 + "]" * 5000 + "\n"), max_lines=2, max_chars=3000))  # fmt: skip
    add("yaml", "nesting_5000_deep_in_set", refused_config(["x=" + "[" * 5000 + "]" * 5000], ["bad override"],
        max_lines=2, max_chars=3000))  # fmt: skip
    add("yaml", "not_utf8", refused_config([], ["cannot read config file"],
        config=yaml_file("binary.yaml", b"\xff\xfe\x00garbage\x80\x81"), max_lines=1))  # fmt: skip

    tag = '!!python/object/apply:os.system ["touch MARKER"]'
    add("code", "yaml_tag_apply_in_file", refused_config([], ["could not determine a constructor"],
        config=yaml_file("tag.yaml", BASE_KEYS + f"run_name: {tag}\n"), max_lines=1))  # fmt: skip
    add("code", "yaml_tag_name_in_file", refused_config([], ["could not determine a constructor"],
        config=yaml_file("name.yaml", BASE_KEYS + "run_name: !!python/name:os.system ''\n"), max_lines=1))  # fmt: skip
    add("code", "yaml_tag_in_set", refused_config([f"seed={tag}"], ["bad override", "could not determine"],
        max_lines=1))  # fmt: skip
    add("code", "shell_in_run_name", refused_config(["run_name=$(touch MARKER)`touch MARKER`"], ["  run_name: "]))
    add("code", "shell_in_output_dir_and_prompt", p_shell_strings_run)

    for name, overrides, needle in BAD_CONFIGS:
        add("bad_config", name, refused_config(overrides, [needle], max_lines=1 if "bad override" in needle else 2))
    for name, text, needle in BAD_CONFIG_FILES:
        config = yaml_file(f"{name}.yaml", text) if text is not None else (lambda w: w / "no_such.yaml")
        add("bad_config", name, refused_config([], [needle], config=config, max_lines=1))
    add("bad_config", "config_not_a_mapping", refused_config([], ["the top level must be a mapping"],
        config=yaml_file("list.yaml", "- a\n- b\n"), max_lines=1))  # fmt: skip

    for label in ("loopback", "normal_end"):
        add("ray", f"listens_on_{label}" if label == "loopback" else "no_survivors_after_normal_end",
            grouped("ray_normal", probe_ray_normal, label), ray=True)  # fmt: skip
    add("ray", "no_survivors_after_kill_9", p_ray_kill9_launcher, ray=True)
    add("ray", "no_survivors_after_ctrl_c", p_ray_ctrl_c, ray=True)
    add("ray", "sampler_killed_survives", p_ray_actor_killed("ray::Sampler", "faults/sampler_restarts"), ray=True)
    add("ray", "reward_server_killed_survives",
        p_ray_actor_killed("ray::RewardServer", "faults/reward_server_restarts"), ray=True)  # fmt: skip
    add("ray", "sampler_killed_without_restarts_one_line", p_ray_no_restarts, ray=True)
    return probes


_GROUPS: dict[str, dict[str, list[str]]] = {}
_GROUP_LOCK = threading.Lock()


def grouped(group: str, experiment: Callable[[Context, Path], dict[str, list[str]]], label: str):
    """A probe whose verdict is `label`'s entry of one shared experiment (run once, by the first of its probes)."""

    def probe(ctx: Context, where: Path) -> list[str]:
        directory = where.parent / group
        with _GROUP_LOCK:
            if group not in _GROUPS:
                _GROUPS[group] = experiment(ctx, directory)
        ctx.runs[str(where)] = [r for key, runs in ctx.runs.items() if key.startswith(str(directory)) for r in runs]
        return _GROUPS[group][label]

    return probe


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------------


def run_probe(ctx: Context, probe: Probe) -> Result:
    where = ctx.out / probe.category / probe.name
    start = time.monotonic()
    try:
        problems = probe.run(ctx, where)
    except Exception as error:  # noqa: BLE001 - a probe that cannot run is a failed probe, reported
        problems = [f"the probe itself failed: {type(error).__name__}: {error}"]
    runs = [
        {
            "args": r.args[3:],
            "rc": r.rc,
            "seconds": round(r.seconds, 2),
            "max_rss_mb": round(r.max_rss_mb),
            "processes_below": len(r.tree),
            "listening": sorted(f"{name} {ip}" for name, ip in r.listening),
            "survivors": r.survivors,
        }
        for r in ctx.runs.get(str(where), [])
    ]
    return Result(probe.category, probe.name, not problems, problems, time.monotonic() - start, runs)


def markdown_report(results: list[Result], seconds: float, command: str) -> str:
    """The table (category, probes, passed, defects = probes failed), a total row, one line per failed probe."""
    lines = ["| category | probes | passed | defects |", "|---|---|---|---|"]
    order = [c for c in CATEGORIES if any(r.category == c for r in results)]
    for category in order:
        mine = [r for r in results if r.category == category]
        passed = sum(r.passed for r in mine)
        lines.append(f"| {category} | {len(mine)} | {passed} | {len(mine) - passed} |")
    passed = sum(r.passed for r in results)
    lines.append(f"| **all** | **{len(results)}** | **{passed}** | **{len(results) - passed}** |")
    lines.append("")
    lines.append(f"`{command}`: {seconds / 60:.1f} min.")
    failed = [r for r in results if not r.passed]
    if failed:
        lines.append("")
        lines.append("Failed probes:")
        lines += [f"- {r.category}/{r.name}: {'; '.join(r.problems)}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "reliability_probe", help="working folder (emptied)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="probes run at once (the Ray probes always alone)")
    parser.add_argument("--only", nargs="+", choices=CATEGORIES, help="run these categories only")
    parser.add_argument("--list", action="store_true", help="list the probes and exit")
    args = parser.parse_args(argv)
    # A command started in the background by a non-interactive shell (`... &`, nohup) inherits SIGINT ignored, and
    # an ignored signal stays ignored across exec: the launches would ignore the Ctrl-C probe's SIGINT. Handled
    # here, it is reset to the default in every child, as in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    probes = [p for p in all_probes() if not args.only or p.category in args.only]
    if args.list:
        for probe in probes:
            print(f"{probe.category}/{probe.name}")
        print(f"{len(probes)} probes")
        return 0
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ctx = Context(out)
    command = "python benchmarks/reliability_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.monotonic()
    results: list[Result] = []

    def done(result: Result) -> Result:
        mark = "ok  " if result.passed else "FAIL"
        print(f"{mark} {result.category}/{result.name} ({result.seconds:.1f} s)", flush=True)
        for problem in result.problems:
            print(f"       {problem}", flush=True)
        return result

    plain = [p for p in probes if not p.ray]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results += list(pool.map(lambda p: done(run_probe(ctx, p)), plain))
    results += [done(run_probe(ctx, p)) for p in probes if p.ray]
    results.sort(key=lambda r: (CATEGORIES.index(r.category), [p.name for p in probes].index(r.name)))
    seconds = time.monotonic() - start
    report = markdown_report(results, seconds, command.strip())
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    print()
    print(report)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The README's user command end to end (shortened), and a bad config failing fast with the field named (also under
`ray job submit`, where a second fresh job into a finished run's directory is refused too)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rlhf_diffusion.prompts import load_builtin
from rlhf_diffusion.testbed.assets import resolve_testbed

ROOT = Path(__file__).resolve().parents[1]

# The embedded default as it is, with 4 DDIM steps instead of 10 so a test run stays short.
FAST = ("--set", "sampling.num_steps=4")
# 8 of the 82 held-out captions (CI time: the launch tests check that the evaluation runs and is reported, not what
# it finds); a JSON list is a YAML flow sequence.
FEW_EVAL = ("--set", "prompts.eval={inline: " + json.dumps(load_builtin("testbed_heldout")[:8]) + "}")


def run_launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf_diffusion.launch", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
RAY_PROCESSES = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def test_tiny_config_runs_end_to_end_and_its_lora_loads_into_a_stock_pipeline(tmp_path):
    """Also: the local Ray instance listens on loopback only, and none of its processes outlive the launcher."""
    import psutil

    launcher = subprocess.Popen(
        [sys.executable, "-m", "rlhf_diffusion.launch", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}"]
        + ["--set", "train.iterations=2", "--set", "prompts.eval_seeds=1", "--set", "sampling.batch_size=4"]
        + [*FAST, *FEW_EVAL],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    tree, listening = [], set()
    deadline = time.monotonic() + 300
    while launcher.poll() is None and time.monotonic() < deadline:  # until every actor is up
        try:
            tree = psutil.Process(launcher.pid).children(recursive=True)
            names = {process.name() for process in tree}
        except psutil.Error:
            break
        if RAY_PROCESSES | {"ray::Learner", "ray::RewardServer"} <= {name.split(".")[0] for name in names}:
            for process in tree:
                try:
                    sockets = process.net_connections(kind="inet")
                except psutil.Error:
                    continue
                listening |= {(process.name(), s.laddr.ip) for s in sockets if s.status == psutil.CONN_LISTEN}
            break
        time.sleep(0.5)
    stdout, stderr = launcher.communicate(timeout=600)
    proc = subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= {name for name, _ in listening}, (tree, listening)
    assert {ip for _, ip in listening} <= LOOPBACK, listening  # was 0.0.0.0, :: and the machine's address
    deadline = time.monotonic() + 30
    while (alive := [p.name() for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert not alive, f"still running 30 s after the launcher ended: {alive}"  # after kill -9: tests/test_reaper.py
    run_dir = tmp_path / "tiny"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["iteration"] == 2
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["algorithm"] == "dde_single" and "eval_before" in summary and "eval_after" in summary
    from PIL import Image

    # the held-out checker (a custom reward on the reward server, never trained on) is reported beside the reward
    assert 0.0 <= summary["heldout_before"]["checker"] <= 1.0 and 0.0 <= summary["heldout_after"]["checker"] <= 1.0
    assert "held-out checker (not trained on)" in proc.stdout
    # pass/fail checker: images fixed / broken with a sign test, in eval.json and in the printed summary
    paired = summary["paired"]["checker_all"]
    assert paired["fixed"] + paired["broken"] <= paired["images"] and 0 < paired["sign_test_p"] <= 1
    assert "held-out checker_all (not trained on)" in proc.stdout and "sign test p = " in proc.stdout
    grid = Image.open(run_dir / "grid_after.png")  # FEW_EVAL's 8 prompts x 1 seed, 8 a row, 64 px + 2 px padding
    assert grid.size == (8 * 66 + 2, 1 * 66 + 2)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_testbed("testbed:pipeline"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run_dir / "lora")
    image = pipe(
        "a red circle on the left on a white background",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)


def test_bad_config_fails_fast_naming_the_field(tmp_path):
    proc = run_launch("configs/tiny.yaml", "--set", "sampling.eta=0", "--set", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "sampling.eta" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_launch(str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# `ray job submit` against a real local cluster
# ---------------------------------------------------------------------------------------------------------------

TINY_D3PO = """
run_name: tiny_d3po
seed: 0
device: cpu
model: {pretrained: "tiny:sd15"}
sampling: {num_steps: 2, guidance_scale: 2.0, batch_size: 2}
algorithm: {name: d3po}
rewards: [{name: jpeg_compressibility}]
train: {iterations: 2, learning_rate: 1.0e-3}
prompts: {train: {inline: [a cat, a dog]}, eval_seeds: 1}
"""


# Ray's job server answers "No available agent to submit job, please try again later" until the node's dashboard
# agent has registered, which on a loaded 2-core CI machine can be well after the head's HTTP API is up. The job is
# not created in that case, so submitting again is safe; any other failure is returned as it is.
NO_AGENT = "No available agent to submit job"


def submit_job(cluster, *entrypoint: str, timeout: int = 600, agent_wait: float = 180.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    deadline = time.monotonic() + agent_wait
    while True:
        proc = subprocess.run(
            [cluster.ray_bin, "job", "submit", "--address", cluster.dashboard_url, "--", *entrypoint],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode == 0 or NO_AGENT not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(3)


@pytest.mark.ray
def test_ray_job_submit_runs_the_tiny_config_on_the_cluster(own_ray_cluster, tmp_path):
    entrypoint = (
        sys.executable,
        "-m",
        "rlhf_diffusion.launch",
        str(ROOT / "configs" / "tiny.yaml"),
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        "train.iterations=2",
        "--set",
        "resources.num_samplers=2",
        "--set",
        "resources.num_reward_servers=1",
        "--set",
        "train.max_staleness=1",
        "--set",
        "prompts.eval_seeds=1",
        "--set",
        "sampling.batch_size=4",
        "--no-progress",
        *FAST,
        *FEW_EVAL,
    )
    proc = submit_job(own_ray_cluster, *entrypoint)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "joined the Ray cluster" in out and "succeeded" in out.lower()
    run_dir = tmp_path / "tiny"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2] and lines[1]["train/staleness"] == 1.0
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # the custom held-out reward (the testbed checker) ran on the cluster's reward server
    assert "checker" in json.loads((run_dir / "eval.json").read_text())["heldout_after"]

    # the same job again, fresh (no --resume): refused in the driver before it joins the cluster, the run kept
    again = submit_job(own_ray_cluster, *entrypoint)
    out = again.stdout + again.stderr
    assert again.returncode != 0 and "failed" in out.lower() and "Traceback" not in out
    assert f"run directory {run_dir} already holds a run" in out and "--resume" in out and "--overwrite" in out
    assert "joined the Ray cluster" not in out
    assert [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # a second run with another method, in one process, lands in the same MLflow store: side by side
    config = tmp_path / "tiny_d3po.yaml"
    config.write_text(TINY_D3PO)
    local = run_launch(str(config), "--set", f"output_dir={tmp_path}", "--no-ray", "--no-progress")
    assert local.returncode == 0, local.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["rlhf_diffusion"])
    assert sorted(runs["params.algorithm.name"]) == ["d3po", "dde_single"]
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["metrics.eval/reward_mean"].notna().all() and runs["metrics.reward_mean"].notna().all()


@pytest.mark.ray
def test_ray_job_with_a_bad_config_fails_fast_naming_the_field(own_ray_cluster, tmp_path):
    start = time.monotonic()
    proc = submit_job(
        own_ray_cluster,
        sys.executable,
        "-m",
        "rlhf_diffusion.launch",
        str(ROOT / "configs" / "tiny.yaml"),
        "--set",
        "algorithm.beta=-1",
        "--set",
        f"output_dir={tmp_path}",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "algorithm.beta" in out and "failed" in out.lower() and "Traceback" not in out
    assert time.monotonic() - start < 120
    assert not (tmp_path / "tiny").exists()  # nothing started


@pytest.mark.ray
def test_ray_job_submit_runs_the_flow_grpo_config_on_a_tiny_sd35_pipeline(own_ray_cluster, tmp_path):
    """`ray job submit -- python -m rlhf_diffusion.launch configs/sd35_flow_grpo.yaml` on the cluster, with only the
    model (a tiny SD3.5-shaped pipeline), the sizes, the reward weights (a tiny PickScore), the resources and the
    CPU-only options overridden: Flow-GRPO's SDE rollouts, the learner and the evaluation passes run as Ray actors on
    a flow model for 2 iterations, and the exported LoRA loads into a stock `StableDiffusion3Pipeline`."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from rlhf_diffusion.models import LORA_WEIGHT_NAME, build_tiny_pipeline
    from rlhf_diffusion.testing import build_tiny_pickscore

    model_dir = build_tiny_pipeline(tmp_path / "tiny_sd35", "sd3", sd35=True)
    overrides = [
        f"model.pretrained={model_dir}",
        "model.resolution=null",  # the tiny pipeline's 64 px
        f"output_dir={tmp_path}",
        "device=cpu",
        "sampling.num_steps=3",
        "sampling.eval_num_steps=2",
        "sampling.batch_size=2",
        "algorithm.group_size=3",
        f"rewards.0.path={build_tiny_pickscore(tmp_path / 'pickscore')}",
        "resources={num_samplers: 1, num_learners: 1, cpus_per_actor: 1, sampler_gpus: 0, reward_server_gpus: 0, "
        "learner_gpus: 0}",
        "train.iterations=2",
        "train.mixed_precision=no",  # fp16 autocast is CUDA only
        "train.signal_every=0",
        "train.ema_every=1",  # the config's average (every 8 optimizer steps) would not move in 2 iterations
        "prompts.train={inline: [a cat, a dog]}",
        "prompts.eval={inline: [a cow]}",
        "tracking.enabled=false",
    ]
    entrypoint = [sys.executable, "-m", "rlhf_diffusion.launch", str(ROOT / "configs" / "sd35_flow_grpo.yaml")]
    proc = submit_job(own_ray_cluster, *entrypoint, *[a for o in overrides for a in ("--set", o)], "--no-progress")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "joined the Ray cluster" in out and "succeeded" in out.lower()
    run_dir = tmp_path / "sd35_flow_grpo"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["train/optimizer_steps"] >= 1 and r["train/num_examples"] == 2 * 3 * 2 for r in records)  # 2 steps
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["algorithm"] == "grpo" and "eval_before" in summary and "eval_after" in summary
    weights = run_dir / "lora" / LORA_WEIGHT_NAME
    saved = load_file(weights)
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 0  # B starts at 0: it trained

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)

    def stock_latents() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe("a cow", num_inference_steps=2, output_type="latent", generator=generator).images

    base = stock_latents()
    pipe.load_lora_weights(weights.parent)
    assert (stock_latents() - base).abs().max() > 0  # the trained LoRA loaded and changes the stock pipeline's sample


@pytest.mark.ray
def test_ray_job_submit_runs_the_flux_config_on_a_tiny_flux_pipeline(own_ray_cluster, tmp_path):
    """`ray job submit -- python -m rlhf_diffusion.launch configs/flux_dde.yaml` on the cluster, on the tiny
    FLUX.1-dev-shaped pipeline (`tiny:flux`, built by the job itself), with only the sizes, the reward (a tiny
    PickScore), the resources and the guidance embedding overridden: DDE's pairs from the SDE sampler, the learner
    and the ODE evaluation run as Ray actors on FLUX, and the exported LoRA loads into a stock `FluxPipeline`."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from rlhf_diffusion.models import LORA_WEIGHT_NAME
    from rlhf_diffusion.testing import build_tiny_pickscore

    overrides = [
        "model.pretrained=tiny:flux",
        "model.resolution=null",  # the tiny pipeline's 64 px
        "model.flux_guidance=2.0",
        f"output_dir={tmp_path}",
        "device=cpu",
        "sampling.num_steps=3",
        "sampling.eval_num_steps=2",
        "sampling.batch_size=2",
        f"rewards.0.path={build_tiny_pickscore(tmp_path / 'pickscore')}",
        "resources={num_samplers: 1, num_learners: 1, cpus_per_actor: 1, sampler_gpus: 0, reward_server_gpus: 0, "
        "learner_gpus: 0}",
        "train.iterations=2",
        "train.signal_every=0",
        "prompts.train={inline: [a cat, a dog]}",
        "prompts.eval={inline: [a cow]}",
        "prompts.eval_seeds=1",
        "tracking.enabled=false",
    ]
    entrypoint = [sys.executable, "-m", "rlhf_diffusion.launch", str(ROOT / "configs" / "flux_dde.yaml")]
    proc = submit_job(own_ray_cluster, *entrypoint, *[a for o in overrides for a in ("--set", o)], "--no-progress")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "joined the Ray cluster" in out and "succeeded" in out.lower()
    run_dir = tmp_path / "flux_dde"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and all(r["train/optimizer_steps"] >= 1 for r in records)
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["algorithm"] == "dde" and "eval_before" in summary and "eval_after" in summary
    weights = run_dir / "lora" / LORA_WEIGHT_NAME
    assert max(v.abs().max().item() for k, v in load_file(weights).items() if "lora_B" in k) > 0  # it trained

    pipe = FluxPipeline.from_pretrained(tmp_path / "_tiny_models" / "flux")
    pipe.set_progress_bar_config(disable=True)

    def stock_latents() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe("a cow", num_inference_steps=2, output_type="latent", generator=generator).images

    base = stock_latents()
    pipe.load_lora_weights(weights.parent)
    assert (stock_latents() - base).abs().max() > 0  # the trained LoRA loaded and changes the stock pipeline's sample

"""The Slurm launchers against a real Slurm: scripts/slurm/local_cluster.sh brings up slurmctld and
two slurmd on this machine (Debian's slurm-wlm + munge, as root), jobs are submitted with sbatch.

* RL (``ray_job.sbatch megatron-rlhf train-rl`` with examples/tiny-cpu/grpo.yaml, 2 nodes: Ray head
  + one worker through srun): a run is ``scancel``-ed after its first checkpoint; nothing of it keeps running; the same sbatch
  submitted again resumes from that checkpoint, completes, writes metrics for every step, its Ray
  cluster had both nodes, and again nothing (Ray, vLLM, job steps) is left running.
* torchrun (``torchrun_job.sbatch train-rm`` with examples/tiny-cpu/orm.yaml, TP2 over 2 nodes x 1
  rank through srun): completes, writes its checkpoint and metrics for every step, leaves nothing
  running.

One cluster for the module. Its nodes declare 4 CPUs each (``local_cluster.sh --cpus``), so the
torchrun job (2 per node) is submitted first and runs beside the RL jobs (2 per node) instead of
after them: the jobs share the machine's cores, as jobs of different users share a real cluster's
nodes, and no check depends on a job having the machine to itself.

Skipped where Slurm/munge are missing or not root, except under CI (``CI`` set), where that fails.
The recipes are examples/tiny-cpu's, inherited (``base:``) with their paths moved to a temporary
folder and fewer steps; the policy and data come from its prepare.py.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.vllm, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = ROOT / "scripts" / "slurm"
TINY_CPU = ROOT / "examples" / "tiny-cpu"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")
RL_STEPS = 3
RM_STEPS = 2
NODE_CPUS = 4
"""CPUs each node declares: room for one RL job and the torchrun job (2 CPUs per node each)."""
POLL_SECONDS = 1.0


def _require_slurm() -> None:
    missing = [name for name in ("slurmctld", "slurmd", "sbatch", "munged")
               if not (shutil.which(name) or os.path.exists(f"/usr/sbin/{name}"))]
    problem = (f"missing {', '.join(missing)} (Debian slurm-wlm/munge; scripts/bootstrap_env.sh installs them)"
               if missing else "the local Slurm cluster runs slurmd as root" if os.geteuid() != 0 else "")
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


def _free_port_block(size: int, start: int = 12000, stop: int = 19990) -> int:
    """First port of ``size`` consecutive ports free now, below the Ray worker ports (20000-22999)."""
    for base in range(start, stop, size):
        try:
            for port in range(base, base + size):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


class Cluster:
    def __init__(self, directory: Path):
        self.directory = directory
        self.env = dict(os.environ, SLURM_CONF=str(directory / "slurm.conf"), PYTHONPATH=str(ROOT),
                        MRLHF_VENV=str(Path(sys.executable).parent.parent),
                        MRLHF_LOG_DIR=str(directory / "logs"), MRLHF_RAY_TMP=str(directory),
                        MRLHF_RAY_OBJECT_STORE_BYTES=str(300 * 1024**2))
        # pinned ports of these jobs: GCS, client server, per-node ports; workers take 20000-22999
        self.env["MRLHF_RAY_NODE_PORT_BASE"] = str(_free_port_block(20))
        self.env["MRLHF_RAY_PORT"] = str(_free_port_block(2, start=int(self.env["MRLHF_RAY_NODE_PORT_BASE"]) + 20))
        self.env["MRLHF_RAY_CLIENT_PORT"] = str(int(self.env["MRLHF_RAY_PORT"]) + 1)
        self.env["MASTER_PORT"] = str(_free_port_block(1, start=int(self.env["MRLHF_RAY_PORT"]) + 2))

    def run(self, *command: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(command, env=env or self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{command} failed: {result.stdout}\n{result.stderr}")
        return result.stdout

    def submit(self, script: str, *args: str, workdir: Path, **job_env: str) -> str:
        """sbatch on both nodes, 2 CPUs per node; ``job_env`` adds environment for this job only."""
        workdir.mkdir(parents=True, exist_ok=True)
        return self.run("sbatch", "--parsable", "--nodes=2", "--cpus-per-task=2", f"--chdir={workdir}",
                        str(SLURM_SCRIPTS / script), *args, env={**self.env, **job_env}).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(token.split("=", 1) for token in text.split() if "=" in token)

    def wait(self, job_id: str, timeout: float = 1500.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in TERMINAL:
                self.wait_steps_gone(job_id)
                return info
            time.sleep(POLL_SECONDS)
        raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s")

    def wait_steps_gone(self, job_id: str) -> None:
        for _ in range(60):  # slurmstepd of the job ends shortly after the job's state is final
            if not _job_processes(self, job_id):
                return
            time.sleep(1)

    def output(self, job_id: str) -> str:
        """The end of the job's sbatch output and of its logs, for failure messages."""
        info = self.job(job_id)
        texts = [Path(info["StdOut"]).read_text()[-3000:] if Path(info.get("StdOut", "")).is_file() else ""]
        log_root = self.directory / "logs"
        for path in sorted(log_root.glob(f"*-{job_id}/restart-*/*.log")):
            texts.append(f"== {path.name}\n" + path.read_text(errors="replace")[-1500:])
        return "\n".join(texts)

    def log_dir(self, job_id: str, name: str, restart: int = 0) -> Path:
        return self.directory / "logs" / f"{name}-{job_id}" / f"restart-{restart}"


def _job_processes(cluster: Cluster, job_id: str) -> list[str]:
    """Processes of a job still running: its step daemons, anything carrying its SLURM_JOB_ID in
    this cluster, or its Ray cluster's tag (Ray, vLLM engines)."""
    ray_tag = f"MRLHF_RAY_CLUSTER={cluster.directory}/mrlhf-ray-{job_id}-".encode()
    conf = f"SLURM_CONF={cluster.env['SLURM_CONF']}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        in_job = f"SLURM_JOB_ID={job_id}".encode() in environ and conf in environ
        if argv.startswith(f"slurmstepd: [{job_id}.") or in_job or any(item.startswith(ray_tag) for item in environ):
            found.append(f"{entry}: {argv[:160]}")
    return found


@pytest.fixture(scope="session")
def slurm_cluster():
    _require_slurm()
    directory = Path(tempfile.mkdtemp(prefix="mrlhf-", dir="/tmp"))  # short: socket paths live under it
    cluster = Cluster(directory)
    up = subprocess.run(["bash", str(SLURM_SCRIPTS / "local_cluster.sh"), "up", "--dir", str(directory), "--nodes", "2",
                         "--cpus", str(NODE_CPUS)], env=cluster.env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        nodes = cluster.run("sinfo", "-h", "-N", "-o", "%N").split()
        assert sorted(set(nodes)) == ["node1", "node2"], nodes
        yield cluster
    finally:
        down = subprocess.run(["bash", str(SLURM_SCRIPTS / "local_cluster.sh"), "down", "--dir", str(directory)],
                              env=cluster.env, capture_output=True, text=True, timeout=300)
        left = _processes_under(directory)
        shutil.rmtree(directory, ignore_errors=True)
    assert down.returncode == 0 and not left, (down.stderr, left)  # `down` leaves nothing running


def _processes_under(directory: Path) -> list[str]:
    """Processes whose command line names a path under ``directory`` (munged, slurmctld, slurmd)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, NotADirectoryError):
            continue
        if str(directory) in argv and entry.isdigit() and int(entry) != os.getpid():
            found.append(f"{entry}: {argv[:160]}")
    return found


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """examples/tiny-cpu's policy and data (its prepare.py), written under a temporary folder."""
    prepare = runpy.run_path(str(TINY_CPU / "prepare.py"))["prepare"]
    root = tmp_path_factory.mktemp("slurm_inputs")
    prepare(root / "tiny")
    return root, root / "tiny"


def _tiny_recipe(path: Path, base: str, **overrides) -> Path:
    """examples/tiny-cpu/<base> with its output/input paths moved to the test's folder."""
    path.write_text(json.dumps({"base": [str(TINY_CPU / base)], **overrides}))
    return path


def _metric_steps(out_dir: Path) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return sorted(json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def torchrun_job(slurm_cluster, tiny_inputs):
    """The torchrun job, submitted first and watched from a thread while the RL jobs run: its final
    state and what it left running are read as soon as it ends (Slurm forgets a job MinJobAge
    seconds after it ends)."""
    root, tiny = tiny_inputs
    out_dir = root / "orm"
    config = _tiny_recipe(root / "orm.yaml", "orm.yaml", model=str(tiny / "policy"), output=str(out_dir),
                          train_files=[str(tiny / "rm_pairs.jsonl"), str(tiny / "rm_labelled.jsonl")], steps=RM_STEPS)
    job_id = slurm_cluster.submit("torchrun_job.sbatch", "train-rm", "--config", str(config), workdir=root / "work",
                                  NPROC_PER_NODE="1")

    def finish() -> dict:
        info = slurm_cluster.wait(job_id)
        return dict(info=info, left=_job_processes(slurm_cluster, job_id),
                    output=slurm_cluster.output(job_id) if info["JobState"] != "COMPLETED" else "")

    with ThreadPoolExecutor(max_workers=1) as watcher:
        yield job_id, out_dir, watcher.submit(finish)


@pytest.fixture(scope="module")
def rl_runs(slurm_cluster, tiny_inputs, torchrun_job):
    """A 2-node RL job cancelled after its first checkpoint, then the same sbatch again (both while
    the torchrun job, submitted first, may still run)."""
    root, tiny = tiny_inputs
    out_dir = root / "rl"
    recipe = _tiny_recipe(root / "grpo.yaml", "grpo.yaml", policy_dir=str(tiny / "policy"),
                          prompt_files=[str(tiny / "prompts.jsonl")], out_dir=str(out_dir), steps=RL_STEPS,
                          checkpoint_every=1, fit_check={"hf_config": str(TINY_CPU / "config.json")})
    command = ("megatron-rlhf", "train-rl", "--config", str(recipe))
    first = slurm_cluster.submit("ray_job.sbatch", *command, workdir=root / "work")
    deadline = time.monotonic() + 1200
    while not (out_dir / "state" / "actor" / "checkpoints" / "latest").exists():  # cancel after a checkpoint
        state = slurm_cluster.job(first)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {first} ended ({state}) before a checkpoint:\n{slurm_cluster.output(first)}")
        assert time.monotonic() < deadline, "no checkpoint after 1200 s"
        time.sleep(POLL_SECONDS)
    slurm_cluster.run("scancel", first)
    cancelled = slurm_cluster.wait(first)
    left_after_cancel = _job_processes(slurm_cluster, first)
    steps_before = _metric_steps(out_dir)
    second = slurm_cluster.submit("ray_job.sbatch", *command, workdir=root / "work")
    finished = slurm_cluster.wait(second)
    left_after_finish = _job_processes(slurm_cluster, second)
    return dict(first=first, second=second, cancelled=cancelled, finished=finished, out_dir=out_dir,
                left_after_cancel=left_after_cancel, left_after_finish=left_after_finish,
                steps_before=steps_before, head_port=slurm_cluster.env["MRLHF_RAY_PORT"])


def test_cancelled_rl_job_leaves_nothing_running(rl_runs):
    assert rl_runs["cancelled"]["JobState"] == "CANCELLED", rl_runs["cancelled"]
    assert rl_runs["left_after_cancel"] == []


def test_resubmitted_rl_job_resumes_from_its_checkpoint(slurm_cluster, rl_runs):
    driver_log = (slurm_cluster.log_dir(rl_runs["second"], "mrlhf-ray") / "driver.log").read_text()
    summary = [line for line in driver_log.splitlines() if line.startswith("policy=")]
    assert summary and "resumed at step" in summary[-1], driver_log[-3000:]
    resumed_at = int(summary[-1].rsplit("resumed at step", 1)[1].strip())
    assert resumed_at >= 1 and rl_runs["steps_before"], (resumed_at, rl_runs["steps_before"])


def test_rl_job_completes_with_metrics_for_every_step(slurm_cluster, rl_runs):
    finished = rl_runs["finished"]
    assert (finished["JobState"], finished["ExitCode"]) == ("COMPLETED", "0:0"), slurm_cluster.output(rl_runs["second"])
    assert _metric_steps(rl_runs["out_dir"]) == list(range(RL_STEPS))


def test_rl_job_ray_cluster_had_both_nodes(slurm_cluster, rl_runs):
    log_dir = slurm_cluster.log_dir(rl_runs["second"], "mrlhf-ray")
    nodes = [line for line in (log_dir / "ray_nodes.txt").read_text().splitlines() if line.startswith("node ")]
    assert len(nodes) == 2, nodes
    assert (log_dir / "ray-head-node1.log").exists() and (log_dir / "ray-worker-node2.log").exists()


def test_finished_rl_job_leaves_nothing_running(rl_runs):
    assert rl_runs["left_after_finish"] == []
    marker = Path("/tmp/ray/ray_current_cluster")  # the machine's default Ray address file
    if marker.exists():
        assert not marker.read_text().strip().endswith(f":{rl_runs['head_port']}")


def test_torchrun_training_over_srun(slurm_cluster, torchrun_job):
    job_id, out_dir, finished = torchrun_job
    ended = finished.result()
    info = ended["info"]
    logs = slurm_cluster.log_dir(job_id, "mrlhf-torchrun")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), ended["output"]
    assert sorted(path.name for path in logs.glob("torchrun-*.log")) == ["torchrun-0.log", "torchrun-1.log"]
    assert ended["left"] == []
    assert (out_dir / "checkpoint").is_dir(), sorted(os.listdir(out_dir))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == RM_STEPS, rows

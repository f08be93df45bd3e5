"""Checkpoint and resume of a training run: bitwise continuation, SIGKILL safety, bad markers.

(a) Bitwise resume. A tiny llama (dropout 0.1 on hidden states and attention, so both torch's
    generator and Megatron's RNG tracker are in play) trains with Megatron's distributed Adam
    (sharded over DP2), a warmup + cosine LR schedule and one NaN step that is skipped. The run
    saves at step K and continues to K + M (on the distributed tier's rank pool). Fresh
    processes, seeded differently, build the same model, load the step-K checkpoint and continue
    to K + M. Required, bit for bit: the Adam moments and step right after loading, the losses
    and learning rates of steps K+1..K+M, every parameter on every rank after K + M, the
    skipped-step counter, the loop state (``extra_state``) and Python / NumPy / torch /
    Megatron-tracker draws taken after the resume.
(b) SIGKILL. Single-rank saves are killed with SIGKILL at three points: while writing (the
    parent sends ``kill -9`` once the model and optimizer files are written), after the
    ``COMPLETE`` marker is written in the temporary directory but before the rename (the process
    kills itself there), and after the rename but before ``latest`` is updated. The first two
    leave the previous checkpoint as the newest complete one and the partial directory ignored;
    the third resumes from the new, complete checkpoint (a single-rank job on the rank pool: a
    process that never saw this run). Each following save deletes the stale ``*.tmp-*``
    directories, and the last one prunes to ``keep_last``.
(c) A checkpoint whose ``COMPLETE`` marker is missing, corrupt, names another step, or lists a
    file with another size is ignored with a log line naming the reason; ``extra_state`` that
    ``torch.load(weights_only=True)`` could not read back is refused at save time.

About 2 minutes on a 2-core CPU machine: two 2-rank jobs for (a) (the resumed one in fresh
processes), three killed 1-rank processes and one pooled 1-rank job for (b).
DP2 is the layout that shards Adam state over ranks, which is what resume must put back.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_rlhf.checkpoint import train_state
from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.parallel.launch import free_port, spawn

pytestmark = pytest.mark.distributed

VOCAB = 300
SAVE_STEP = 3  # K
MORE_STEPS = 2  # M
NAN_STEP = 2
REPO_ROOT = Path(__file__).resolve().parents[2]


def lm_loss(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
    from megatron_rlhf.training.lm_loss import next_token_loss

    loss, metrics = next_token_loss(logits, microbatch, VOCAB)
    if microbatch.get("poison") is not None:
        loss = loss * float("nan")
        metrics = {**metrics, "loss": loss.detach()}
    return loss, metrics


def _build_updater(parallel: ParallelConfig, hf_dir: str, seed: int):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import (
        ModelBuildConfig,
        build_stage_model,
        validate_layout,
    )
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.megatron_step import MegatronUpdater, OptimizerSettings

    state = initialize_parallel(parallel, seed=seed)
    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig(transformer_impl="local", hidden_dropout=0.1, attention_dropout=0.1)
    padded = validate_layout(arch, parallel, build)
    model = build_stage_model(arch, parallel, build)
    load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", padded)
    settings = OptimizerSettings(
        lr=1e-3,
        adam_eps=1e-3,
        lr_warmup_steps=2,
        lr_decay_steps=8,
        lr_decay_style="cosine",
    )
    return state, MegatronUpdater(model, settings)


def _train_step(updater, state, tokens: torch.Tensor, step: int) -> dict:
    local = tokens[step].chunk(state.data_parallel_size)[state.data_parallel_rank]
    microbatches = [{"input_ids": part} for part in local.split(2)]
    if step == NAN_STEP:
        microbatches = [{**mb, "poison": torch.ones(1)} for mb in microbatches]
    result = updater.step(microbatches, lm_loss)
    return {"loss": result.loss, "lr": result.learning_rate, "skipped": result.skipped}


def _rng_draws() -> dict:
    import random

    import numpy
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(4)
    return {
        "python": [random.random() for _ in range(4)],
        "numpy": numpy.random.rand(4).tolist(),
        "torch": torch.rand(4),
        "tracker": tracker,
    }


def _adam_state(updater) -> list:
    # Deep copies: the state dict holds the live tensors that later steps update in place.
    return copy.deepcopy(
        [inner.optimizer.state_dict()["state"] for inner in updater.optimizer.chained_optimizers]
    )


def _run_worker(phase: str, hf_dir: str, run_dir: str, tokens: torch.Tensor) -> dict:
    parallel = ParallelConfig()
    state, updater = _build_updater(parallel, hf_dir, seed=1 if phase == "uninterrupted" else 77)
    models = {"actor": updater}
    report: dict = {}
    if phase == "uninterrupted":
        history = [_train_step(updater, state, tokens, step) for step in range(1, SAVE_STEP + 1)]
        extra = {
            "data_position": {"epoch": 0, "offset": SAVE_STEP},
            "kl_coef": 0.05,
            "history": history,
        }
        train_state.save_train_state(run_dir, SAVE_STEP, models, extra_state=extra)
        report["extra_state"] = extra
    else:
        info = train_state.load_latest_train_state(run_dir, models)
        report["extra_state"] = info.extra_state
        report["rng_restored"] = info.rng_restored
        report["loaded_step"] = info.step
    report["adam_state"] = _adam_state(updater)
    report["skipped_steps"] = updater.skipped_steps
    report["draws"] = _rng_draws()
    report["steps"] = [
        _train_step(updater, state, tokens, step)
        for step in range(SAVE_STEP + 1, SAVE_STEP + MORE_STEPS + 1)
    ]
    report["weights"] = {n: p.detach().clone() for n, p in updater.model.module.named_parameters()}
    return report


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("resume_model")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    return str(
        make_tiny_hf_model("llama", root / "llama", seed=3, vocab_size=VOCAB, tokenizer=tokenizer)
    )


@pytest.fixture(scope="module")
def resume_runs(hf_dir, tmp_path_factory, rank_pool):
    run_dir = str(tmp_path_factory.mktemp("resume_run"))
    tokens = torch.randint(
        0,
        VOCAB,
        (SAVE_STEP + MORE_STEPS + 1, 4, 16),
        generator=torch.Generator().manual_seed(5),
    )
    uninterrupted = rank_pool.run(_run_worker, 2, "uninterrupted", hf_dir, run_dir, tokens)
    resumed = spawn(_run_worker, 2, "resumed", hf_dir, run_dir, tokens)
    return uninterrupted, resumed


def _assert_bitwise(expected, actual, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{where}: keys differ"
        for key in expected:
            _assert_bitwise(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{where}: lengths differ"
        for index, (left, right) in enumerate(zip(expected, actual)):
            _assert_bitwise(left, right, f"{where}[{index}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


def test_resume_restores_loop_state_and_counters(resume_runs):
    uninterrupted, resumed = resume_runs
    for rank in range(2):
        assert resumed[rank]["loaded_step"] == SAVE_STEP
        assert resumed[rank]["rng_restored"]
        # Rank 0's loop state is saved and given to every rank.
        assert resumed[rank]["extra_state"] == uninterrupted[0]["extra_state"]
        assert resumed[rank]["skipped_steps"] == uninterrupted[rank]["skipped_steps"] == 1


def test_resume_restores_sharded_adam_state_bitwise(resume_runs):
    uninterrupted, resumed = resume_runs
    for rank in range(2):
        assert uninterrupted[rank]["adam_state"], "the distributed optimizer holds Adam state"
        _assert_bitwise(
            uninterrupted[rank]["adam_state"],
            resumed[rank]["adam_state"],
            f"rank{rank}.adam",
        )
    # DP2 shards Adam state: the two ranks hold different parts.
    first = [value["exp_avg"].numel() for value in uninterrupted[0]["adam_state"][0].values()]
    assert sum(first) > 0


def test_rng_draws_after_resume_match(resume_runs):
    uninterrupted, resumed = resume_runs
    for rank in range(2):
        _assert_bitwise(uninterrupted[rank]["draws"], resumed[rank]["draws"], f"rank{rank}.draws")


def test_losses_and_weights_continue_bitwise(resume_runs):
    uninterrupted, resumed = resume_runs
    for rank in range(2):
        assert [s["skipped"] for s in uninterrupted[rank]["steps"]] == [False] * MORE_STEPS
        _assert_bitwise(uninterrupted[rank]["steps"], resumed[rank]["steps"], f"rank{rank}.steps")
        _assert_bitwise(
            uninterrupted[rank]["weights"],
            resumed[rank]["weights"],
            f"rank{rank}.weights",
        )


# ----------------------------------------------------------------------------------------------
# (b) SIGKILL during a save, (c) bad COMPLETE markers
# ----------------------------------------------------------------------------------------------

WRITING_FLAG = "save_is_writing"


def _kill_scenario(hf_dir: str, run_dir: str, scenario: str) -> None:
    """Entry point of one single-rank job (run with ``python -c``, or on the rank pool for
    ``resume_and_save``); may die by SIGKILL."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    state, updater = _build_updater(ParallelConfig(), hf_dir, seed=1)
    tokens = torch.randint(0, VOCAB, (2, 4, 16), generator=torch.Generator().manual_seed(5))
    _train_step(updater, state, tokens, 1)
    models = {"actor": updater}

    def record_helpers() -> None:
        # Megatron's checkpoint writer starts a multiprocessing Manager that outlives a process
        # killed with SIGKILL; the test ends it by this PID.
        pids = [child.pid for child in multiprocessing.active_children()]
        (Path(run_dir) / f"helpers-{scenario}.json").write_text(json.dumps(pids))

    def die(*args, **kwargs):
        record_helpers()
        os.kill(os.getpid(), signal.SIGKILL)

    def write_slowly(*args, **kwargs):
        record_helpers()
        (Path(run_dir) / WRITING_FLAG).touch()
        time.sleep(600)  # the test kills this process from outside meanwhile

    if scenario == "kill_while_writing":
        train_state.save_train_state(run_dir, 1, models, extra_state={"step": 1})
        train_state._write_rng_state = write_slowly
        train_state.save_train_state(run_dir, 2, models, extra_state={"step": 2})
    elif scenario == "kill_before_rename":
        train_state._publish_directory = die
        train_state.save_train_state(run_dir, 2, models, extra_state={"step": 2})
    elif scenario == "kill_before_latest":
        train_state._write_latest_marker = die
        train_state.save_train_state(run_dir, 3, models, extra_state={"step": 3})
    elif scenario == "resume_and_save":
        info = train_state.load_latest_train_state(run_dir, models)
        train_state.save_train_state(run_dir, 4, models, extra_state={"step": 4}, keep_last=2)
        report = {
            "step": info.step,
            "extra_state": info.extra_state,
            "rng_restored": info.rng_restored,
        }
        (Path(run_dir) / "resume_report.json").write_text(json.dumps(report))
    else:
        raise ValueError(f"unknown scenario {scenario!r}")


def _start_scenario(hf_dir: str, run_dir: Path, scenario: str) -> subprocess.Popen:
    code = (
        "from tests.distributed.test_train_state_resume import _kill_scenario; "
        f"_kill_scenario({hf_dir!r}, {str(run_dir)!r}, {scenario!r})"
    )
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    # Output goes to a file: a pipe would stay open in helpers that outlive a killed process.
    with open(run_dir.parent / f"{scenario}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _finish(
    process: subprocess.Popen, run_dir: Path, scenario: str, timeout: float = 300
) -> tuple[int, str]:
    """Wait for (or kill, at the timeout) the scenario job, end its recorded helpers by PID."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        helpers = run_dir / f"helpers-{scenario}.json"
        for pid in json.loads(helpers.read_text()) if helpers.exists() else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if helpers.exists():
            helpers.unlink()
    return process.returncode, (run_dir.parent / f"{scenario}.log").read_text()


def _tmp_dirs(run_dir: Path) -> list[str]:
    return sorted(
        p.name for p in (run_dir / train_state.CHECKPOINTS_DIR).glob(f"*{train_state.TMP_INFIX}*")
    )


def _latest_marker(run_dir: Path) -> str:
    return (run_dir / train_state.CHECKPOINTS_DIR / train_state.LATEST_FILE).read_text().strip()


def _complete_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in train_state.complete_checkpoints(run_dir)]


@pytest.fixture(scope="module")
def killed_saves(hf_dir, tmp_path_factory, rank_pool) -> dict:
    """Run the four single-rank jobs in order and record what each left behind."""
    run_dir = tmp_path_factory.mktemp("killed_run")
    observed: dict = {}

    scenario = "kill_while_writing"
    process = _start_scenario(hf_dir, run_dir, scenario)
    deadline = time.monotonic() + 300
    while (
        not (run_dir / WRITING_FLAG).exists()
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    if process.poll() is None and (run_dir / WRITING_FLAG).exists():
        os.kill(process.pid, signal.SIGKILL)  # kill -9 from outside, mid-save
    returncode, output = _finish(process, run_dir, scenario)
    assert returncode == -signal.SIGKILL, output[-3000:]
    observed[scenario] = (
        _complete_steps(run_dir),
        _tmp_dirs(run_dir),
        _latest_marker(run_dir),
    )

    for scenario in ("kill_before_rename", "kill_before_latest"):
        returncode, output = _finish(_start_scenario(hf_dir, run_dir, scenario), run_dir, scenario)
        assert returncode == -signal.SIGKILL, output[-3000:]
        observed[scenario] = (
            _complete_steps(run_dir),
            _tmp_dirs(run_dir),
            _latest_marker(run_dir),
        )
        if scenario == "kill_before_rename":
            unrenamed = run_dir / train_state.CHECKPOINTS_DIR / observed[scenario][1][0]
            observed["marker_in_unrenamed_dir"] = (unrenamed / train_state.COMPLETE_FILE).is_file()
    observed["newest_before_resume"] = train_state.find_latest_checkpoint(run_dir).name

    rank_pool.run(_kill_scenario, 1, hf_dir, str(run_dir), "resume_and_save")  # raises if it fails
    observed["resume"] = json.loads((run_dir / "resume_report.json").read_text())
    observed["after_resume"] = (
        _complete_steps(run_dir),
        _tmp_dirs(run_dir),
        _latest_marker(run_dir),
    )
    observed["run_dir"] = run_dir
    return observed


def test_kill_while_writing_keeps_previous_checkpoint(killed_saves):
    complete, temporaries, latest = killed_saves["kill_while_writing"]
    assert complete == [1] and latest == "step_000001"
    assert len(temporaries) == 1 and temporaries[0].startswith("step_000002.tmp-")


def test_kill_before_rename_leaves_partial_ignored(killed_saves):
    complete, temporaries, latest = killed_saves["kill_before_rename"]
    assert complete == [1] and latest == "step_000001"
    # This save first removed the previous killed save's directory; its own one already holds
    # a COMPLETE marker, and only its .tmp- name keeps it out.
    assert len(temporaries) == 1 and temporaries[0].startswith("step_000002.tmp-")
    assert temporaries != killed_saves["kill_while_writing"][1]
    assert killed_saves["marker_in_unrenamed_dir"]


def test_kill_after_rename_resumes_from_the_published_checkpoint(killed_saves):
    complete, _, latest = killed_saves["kill_before_latest"]
    assert complete == [1, 3] and latest == "step_000001"
    assert killed_saves["newest_before_resume"] == "step_000003"
    resume = killed_saves["resume"]
    assert resume == {"step": 3, "extra_state": {"step": 3}, "rng_restored": True}


def test_next_save_cleans_temporaries_and_prunes(killed_saves):
    complete, temporaries, latest = killed_saves["after_resume"]
    assert temporaries == []
    assert complete == [3, 4] and latest == "step_000004"


def _break_missing(directory: Path) -> None:
    (directory / train_state.COMPLETE_FILE).unlink()


def _break_corrupt(directory: Path) -> None:
    (directory / train_state.COMPLETE_FILE).write_bytes(b'{"step": 4, "files": {tru')


def _break_other_step(directory: Path) -> None:
    marker = directory / train_state.COMPLETE_FILE
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "step": 7}))


def _break_truncated_file(directory: Path) -> None:
    path = directory / train_state.EXTRA_STATE_FILE
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_break_missing, "no COMPLETE marker"),
        (_break_corrupt, "corrupt COMPLETE marker"),
        (_break_other_step, "names step 7"),
        (_break_truncated_file, "extra_state.pt has"),
    ],
)
def test_bad_complete_marker_is_ignored_with_a_log_line(
    killed_saves, tmp_path, caplog, damage, reason
):
    run_dir = tmp_path / "run"
    shutil.copytree(
        killed_saves["run_dir"] / train_state.CHECKPOINTS_DIR,
        run_dir / train_state.CHECKPOINTS_DIR,
    )
    damage(run_dir / train_state.CHECKPOINTS_DIR / "step_000004")
    with caplog.at_level(logging.WARNING, logger=train_state.__name__):
        newest = train_state.find_latest_checkpoint(run_dir)
    assert newest.name == "step_000003"
    ignored = [
        r.getMessage()
        for r in caplog.records
        if "step_000004" in r.getMessage() and "ignoring" in r.getMessage()
    ]
    assert len(ignored) == 1 and reason in ignored[0], caplog.text


def test_extra_state_that_cannot_be_reloaded_is_refused_at_save():
    class KLState:
        value = 0.1

    with pytest.raises(TypeError, match=r"extra_state\['kl'\] is a KLState"):
        train_state.save_train_state(
            "/nonexistent", 1, {"actor": torch.nn.Linear(1, 1)}, {"kl": KLState()}
        )

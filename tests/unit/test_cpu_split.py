"""The split of a CPU machine's cores between a run's processes (config/cpu_split.py), the settings
that override it (RLConfig, RolloutConfig) with errors naming the key, and the environment an
engine's processes start with (rollout/engine_environment.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading

import pytest

from megatron_rlhf.config.cpu_split import (
    check_engine_bind,
    engine_process_environment,
    format_cores,
    parse_cores,
    resolve_engine_bind,
    split_cpu_cores,
)
from megatron_rlhf.config.errors import ConfigError
from megatron_rlhf.config.resources import ResourcesConfig
from megatron_rlhf.config.rollout import RolloutConfig
from megatron_rlhf.config.typed_load import dataclass_from_mapping
from megatron_rlhf.rollout.engine_environment import engine_environment
from megatron_rlhf.trainer.rl_config import RLConfig, WorkerGroupConfig

RUN = dict(policy_dir="p", out_dir="o", prompt_files=("x.jsonl",))


def test_two_cores_give_the_engine_worker_one_core_and_each_rank_one_thread():
    split = split_cpu_cores((0, 1), megatron_ranks=2, engine_tensor_parallels=(1,))
    assert split.engine_binds == ("0",) and split.rank_threads == 1 and not split.oversubscribed


def test_the_engine_keeps_a_core_for_its_engine_core_and_one_for_the_controller():
    assert split_cpu_cores(range(4), 2, (1,)).engine_binds == ("0-1",)
    split = split_cpu_cores(range(16), 4, (1,))
    assert split.engine_binds == ("0-13",) and split.rank_threads == 4  # sync: ranks share every core


def test_several_engines_and_tp_workers_get_disjoint_blocks():
    split = split_cpu_cores(range(16), 2, (2, 2))  # 3 reserved (2 engine-cores, 1 controller): 13 // 4 = 3
    assert split.engine_binds == ("0-2|3-5", "6-8|9-11")


def test_overlapped_rollouts_share_the_free_cores_between_workers_and_ranks():
    split = split_cpu_cores(range(16), 2, (1,), overlapped=True)  # 14 free: 1 worker + 2 ranks
    assert split.engine_binds == ("0-3",) and split.rank_threads == 5
    assert split_cpu_cores((0, 1), 2, (1,), overlapped=True).rank_threads == 1  # never below one


def test_binds_name_only_the_given_cores_and_say_when_they_repeat():
    assert split_cpu_cores((4, 5, 6, 7), 1, (1,)).engine_binds == ("4-5",)
    split = split_cpu_cores((0, 1), 1, (2, 1))
    assert split.engine_binds == ("0|1", "0") and split.oversubscribed


def test_no_engine_gives_the_ranks_every_core():
    split = split_cpu_cores(range(8), 3, ())
    assert split.engine_binds == () and split.rank_threads == 2


def test_split_refuses_no_cores():
    with pytest.raises(ValueError, match="at least one core"):
        split_cpu_cores((), 1, (1,))


def test_core_lists_round_trip_in_vllms_syntax():
    assert format_cores([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert parse_cores("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    with pytest.raises(ValueError, match="not a core list"):
        parse_cores("3-1")


def test_explicit_config_wins_then_the_environment_then_the_split():
    assert resolve_engine_bind("2-3", "0", "1") == ("2-3", "config")
    assert resolve_engine_bind("auto", "0", "1") == ("1", "environment VLLM_CPU_OMP_THREADS_BIND")
    assert resolve_engine_bind("auto", "0", None) == ("0", "core split")


def test_engine_core_gets_one_thread_and_bound_workers_no_mkl_count_unless_nobind():
    assert engine_process_environment("0") == {"VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1",
                                               "MKL_NUM_THREADS": None}
    assert engine_process_environment("nobind") == {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@pytest.mark.parametrize("bind, message", [
    ("0-1", "has 1 core list\\(s\\) but the engine has tensor_parallel=2"),
    ("a|b", "not a core list"),
])
def test_bad_binds_name_the_key(bind, message):
    with pytest.raises(ValueError, match=f"cpu_threads_bind='{bind}'.*{message}"):
        RolloutConfig(model_dir="m", tensor_parallel=2, cpu_threads_bind=bind)
    check_engine_bind("0|1", 2, "k")
    check_engine_bind("auto", 3, "k")


def test_rl_yaml_errors_name_the_group_and_key():
    with pytest.raises(ConfigError, match="run.yaml: actor.threads_per_rank: expected an integer or one of \\['auto'\\]"):
        dataclass_from_mapping(RLConfig, dict(RUN, actor={"threads_per_rank": "many"}), "run.yaml")
    with pytest.raises(ConfigError, match="run.yaml: reference: threads_per_rank=0 must be an integer >= 1 or 'auto'"):
        dataclass_from_mapping(RLConfig, dict(RUN, reference={"threads_per_rank": 0}), "run.yaml")
    with pytest.raises(ConfigError, match="RLConfig.engine_cpu_bind='0\\|1' has 2 core list"):
        dataclass_from_mapping(RLConfig, dict(RUN, engine_cpu_bind="0|1"), "run.yaml")


def test_run_threads_auto_follows_the_split_and_explicit_values_win():
    config = RLConfig(**RUN, actor=WorkerGroupConfig(world_size=2), reference=WorkerGroupConfig(threads_per_rank=3))
    chosen = config.run_threads({"actor": 2, "reference": 1, "reward:rm": 1}, range(8), None)
    assert chosen.group_threads == {"actor": 2, "reference": 3, "reward:rm": 2}
    assert chosen.engine_binds == (("0-5", "core split"),)
    assert "actor 2, reference 3" in chosen.describe() and "cores 0-5" in chosen.describe()
    pinned = RLConfig(**RUN, engine_cpu_bind="1").run_threads({"actor": 1}, range(8), "0-3")
    assert pinned.engine_binds == (("1", "config"),)
    # a one-rank actor holds its engine in its own process: the log says so, not a binding
    assert pinned.in_process == (True,) and "engine 0 in its holder's process" in pinned.describe()
    assert "engine-core process" not in pinned.describe()
    assert chosen.in_process == (False,)  # a two-rank actor: vLLM's own processes
    separate = RLConfig(**RUN, engine_process="separate").run_threads({"actor": 1}, range(8), None)
    assert separate.in_process == (False,) and "engine-core process 1 torch thread" in separate.describe()


def test_gpu_runs_keep_one_thread_per_rank():
    config = RLConfig(**RUN, resources=ResourcesConfig(gpus_per_node=8))
    assert config.run_threads({"actor": 1, "reference": 1}, range(64), None).group_threads == {
        "actor": 1, "reference": 1}


def test_gpu_runs_ignore_a_cpu_bind_left_in_the_environment():
    config = RLConfig(**RUN, resources=ResourcesConfig(gpus_per_node=8), placement="disaggregated",
                      engine_tensor_parallel=2)
    assert config.run_threads({"actor": 1}, range(64), "0-3").engine_binds == (("auto", "GPU run"),)


def test_an_environment_bind_that_does_not_fit_an_engine_names_the_variable():
    config = RLConfig(**RUN, rollout_engines=(1, 2), placement="disaggregated")
    with pytest.raises(ValueError, match="environment VLLM_CPU_OMP_THREADS_BIND='0-3' has 1 core list"):
        config.run_threads({"actor": 1}, range(8), "0-3")


@pytest.mark.parametrize("resources, address", [(ResourcesConfig(nodes=2), None), (ResourcesConfig(), "10.0.0.1:6379")])
def test_runs_beyond_the_drivers_machine_leave_each_engine_its_own_split(resources, address):
    config = RLConfig(**RUN, resources=resources, ray_address=address)
    chosen = config.run_threads({"actor": 8, "reference": 8}, range(16), None)
    assert chosen.group_threads == {"actor": 1, "reference": 1}  # the driver's cores say nothing of theirs
    assert chosen.engine_binds == (("auto", "each engine's own machine"),)


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "400000 100000"}, 4), ({"cpu.max": "150000 100000"}, 2), ({"cpu.max": "max 100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None), ({}, None),
    ({"cpu.max": "garbage"}, None)])
def test_a_cgroup_cpu_quota_caps_the_cores_a_run_splits(tmp_path, files, cores):
    from megatron_rlhf.config.cpu_split import cpu_quota_cores, usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert cpu_quota_cores(str(tmp_path)) == cores
    affinity = tuple(sorted(os.sched_getaffinity(0)))
    assert usable_cores(str(tmp_path)) == (affinity[:cores] if cores else affinity)


def test_engine_environment_is_given_to_processes_started_inside_and_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    before = tempfile.gettempdir()
    with engine_environment({"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0", "MKL_NUM_THREADS": None,
                             "TMPDIR": "/nonexistent"}):
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'], "
                                "os.environ['VLLM_CPU_OMP_THREADS_BIND'], 'MKL_NUM_THREADS' in os.environ)"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.split() == ["1", "0", "False"]
        assert tempfile.gettempdir() == before  # another thread's temporary files stay in the user's folder
    assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["MKL_NUM_THREADS"] == "2"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_engines_starting_at_once_in_one_process_each_see_their_own_variables():
    seen: dict[str, str] = {}

    def start(name: str) -> None:
        with engine_environment({"VLLM_CPU_OMP_THREADS_BIND": name}):
            threading.Event().wait(0.05)
            seen[name] = os.environ["VLLM_CPU_OMP_THREADS_BIND"]

    threads = [threading.Thread(target=start, args=(name,)) for name in ("0", "1")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"0": "0", "1": "1"}


def test_variables_read_from_the_environment_never_see_another_engines(monkeypatch):
    """An engine resolves its bind from the user's environment; computed under the start lock, a
    second engine starting meanwhile reads the user's value, not the first engine's."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    read: dict[str, str | None] = {}
    first_inside = threading.Event()

    def start(name: str, bind: str) -> None:
        def variables() -> dict[str, str]:
            read[name] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")  # what the user set: nothing
            return {"VLLM_CPU_OMP_THREADS_BIND": bind}

        with engine_environment(variables):
            first_inside.set()
            threading.Event().wait(0.05)

    first = threading.Thread(target=start, args=("a", "0"))
    first.start()
    first_inside.wait(5)
    second = threading.Thread(target=start, args=("b", "1"))
    second.start()
    first.join()
    second.join()
    assert read == {"a": None, "b": None} and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ

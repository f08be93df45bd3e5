"""Configuration of an RL run (PPO or GRPO): typed, validated, one dataclass per component.

:class:`RLConfig` gathers the component configs the loop passes down explicitly: the algorithm
(:class:`~megatron_rlhf.algorithms.AlgorithmConfig`), sampling (:attr:`RLConfig.sampling`, a
:class:`~megatron_rlhf.config.sampling.SamplingSettings`), the PPO update plan, optimizers,
Megatron layouts and sizes of the worker groups, the engine, placement, the parsed reward
configuration (:class:`~megatron_rlhf.rewards.reward_config.RewardConfig`), the curriculum
(:class:`~megatron_rlhf.data.curriculum.CurriculumConfig`), data and logging. Presets:
:func:`grpo_algorithm` and :func:`ppo_algorithm` give the "Does RLHF Scale?" settings of each
method (group normalisation and asymmetric shrinking for GRPO; GAE with a critic for PPO).

Guarantees: :meth:`RLConfig.from_mapping` (what ``train-rl`` and ``plan`` call on the run YAML)
reads the reward YAML named by ``reward_config`` exactly once and types ``curriculum``, so every
error in either names the file and key path before any process starts; the pre-flight and the
loop then use the typed records and parse nothing again. An ``RLConfig`` built in code takes the
typed records themselves (``reward_config=load_reward_config(path)``), never a path or a mapping.
Not checked here: that files and directories exist (besides the reward YAML), that prompt domains
have reward routes, or that the curriculum's domains have prompts (``megatron_rlhf.preflight.rl``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_rlhf.algorithms import AlgorithmConfig
from megatron_rlhf.config.cpu_split import (
    AUTO,
    BIND_ENV,
    NOBIND,
    CpuSplit,
    check_engine_bind,
    resolve_engine_bind,
    split_cpu_cores,
)
from megatron_rlhf.config.errors import ConfigError
from megatron_rlhf.config.optimizer import OptimizerSettings
from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.config.ppo_update import PPOUpdateConfig
from megatron_rlhf.config.precision import PrecisionConfig
from megatron_rlhf.config.resources import ResourcesConfig
from megatron_rlhf.config.sampling import SamplingSettings
from megatron_rlhf.config.typed_load import at, dataclass_from_mapping
from megatron_rlhf.data.curriculum import CurriculumConfig
from megatron_rlhf.planning.fit_check import FitCheckConfig
from megatron_rlhf.rewards.reward_config import RewardConfig, default_reward_config, load_reward_config

ALGORITHMS = ("grpo", "ppo")
PLACEMENTS = ("colocated", "disaggregated")
ROLLOUT_MODES = ("sync", "one_step_off")
SYNC_ALARM_ACTIONS = ("warn", "stop")


def grpo_algorithm(**overrides) -> AlgorithmConfig:
    """GRPO: group-relative advantages, KL as a loss term (k3), asymmetric reward shrinking."""
    settings = dict(advantage_estimator="grpo", kl_mode="loss", kl_estimator="k3", kl_coef=0.01,
                    reward_shrink_alpha=1.0, value_clip=None)
    settings.update(overrides)
    return AlgorithmConfig(**settings)


def ppo_algorithm(**overrides) -> AlgorithmConfig:
    """PPO: GAE over a critic's values, KL as a per-token reward penalty (k1)."""
    settings = dict(advantage_estimator="gae", gamma=1.0, gae_lambda=0.95, kl_mode="penalty",
                    kl_estimator="k1", kl_coef=0.01, reward_normalization="batch")
    settings.update(overrides)
    return AlgorithmConfig(**settings)


@dataclass(frozen=True)
class WorkerGroupConfig:
    """Size and layout of one Megatron worker group."""

    world_size: int = 1
    """Ranks (Ray actors); data parallelism takes what the layout leaves."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    threads_per_rank: int | Literal["auto"] = "auto"
    """torch intra-op threads per rank: an integer >= 1, or auto: on a CPU run the run's split of
    the machine's cores (``megatron_rlhf.config.cpu_split``: the cores divided among all Megatron
    ranks of the run, less the engines' share when rollouts overlap training), on a GPU run 1."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be >= 1")
        if self.threads_per_rank != "auto" and (not isinstance(self.threads_per_rank, int)
                                                or isinstance(self.threads_per_rank, bool) or self.threads_per_rank < 1):
            raise ValueError(f"threads_per_rank={self.threads_per_rank!r} must be an integer >= 1 or 'auto'")
        self.parallel.data_parallel(self.world_size)  # raises when the layout does not fit


@dataclass(frozen=True)
class RunThreads:
    """The CPU threads of an RL run's processes, chosen at start-up (:meth:`RLConfig.run_threads`)."""

    group_threads: dict[str, int]
    """torch intra-op threads per rank of each Megatron group (actor, reference, critic, reward:<name>)."""
    engine_binds: tuple[tuple[str, str], ...]
    """``(VLLM_CPU_OMP_THREADS_BIND, where it came from)`` of each engine (CPU runs)."""
    split: CpuSplit
    """The core split behind the auto values."""
    on_gpu: bool = False
    in_process: tuple[bool, ...] = ()
    """Per engine: whether it runs in the process that holds it (``RLConfig.engine_process``)."""

    def describe(self) -> str:
        """One line for the start-up log and the benchmark report."""
        groups = ", ".join(f"{name} {threads}" for name, threads in self.group_threads.items())
        if self.on_gpu:
            return f"GPU run: torch threads per rank: {groups}"
        in_process = self.in_process or (False,) * len(self.engine_binds)
        engines = "; ".join(f"engine {i} in its holder's process, on its torch threads" if here
                            else f"engine {i} workers bound to cores {bind} ({source})"
                            for i, ((bind, source), here) in enumerate(zip(self.engine_binds, in_process)))
        separate = [bind for (bind, _), here in zip(self.engine_binds, in_process) if not here]
        core_threads = ("" if all(bind == NOBIND for bind in separate)
                        else "; each engine-core process 1 torch thread; workers' MKL threads follow OpenMP's")
        return (f"{len(self.split.cores)} cores: torch threads per rank: {groups}; {engines}{core_threads}"
                + (" (oversubscribed: more vLLM workers than cores)" if self.split.oversubscribed else ""))


@dataclass(frozen=True)
class RLConfig:
    policy_dir: str
    """HF directory of the starting policy (the SFT model); also the reference and the engine's."""
    out_dir: str
    """Run directory: metrics, checkpoints, final policy (``<out_dir>/policy``)."""
    prompt_files: tuple[str, ...]
    """Prompt JSONL files (``megatron_rlhf.data.prompts`` schema, one domain tag per prompt)."""
    algorithm: AlgorithmConfig = field(default_factory=grpo_algorithm)
    critic_dir: str | None = None
    """HF directory the critic's trunk starts from (PPO); None: the policy's. Value head fresh."""
    steps: int = 20
    """RL steps (one rollout batch and its PPO epochs each)."""
    prompts_per_step: int = 8
    """Prompts per rollout batch; each gets ``n`` responses."""
    n: int = 4
    """Responses per prompt."""
    temperature: float = 1.0
    """The run's one sampling temperature (> 0): the engine samples at it, and the actor's and the
    reference's log-probs (PPO ratio, KL, the weight-sync check) are computed at it."""
    max_new_tokens: int = 32
    max_prompt_tokens: int = 128
    update: PPOUpdateConfig = field(default_factory=PPOUpdateConfig)
    actor_optimizer: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=1e-5))
    critic_optimizer: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=1e-5))
    actor: WorkerGroupConfig = field(default_factory=WorkerGroupConfig)
    critic: WorkerGroupConfig = field(default_factory=WorkerGroupConfig)
    reference: WorkerGroupConfig = field(default_factory=WorkerGroupConfig)
    engine_tensor_parallel: int = 1
    """vLLM's own TP size."""
    engine_cpu_bind: str = "auto"
    """CPU runs: the cores of each engine's vLLM workers (``VLLM_CPU_OMP_THREADS_BIND``, given to
    vLLM's processes only). auto: the user's ``VLLM_CPU_OMP_THREADS_BIND`` if set, else the run's
    core split (``megatron_rlhf.config.cpu_split``: one core per engine-core process and one for the
    controller reserved, the rest in blocks, one per vLLM worker) | nobind | one core list per
    worker, ``|``-separated (``0-3|4-7``), for every engine."""
    engine_process: str = "auto"
    """Where each engine runs (``RolloutConfig.engine_process``): auto (in the process that holds
    it where it can: a CPU engine of TP 1 colocated with a one-rank actor, or a disaggregated one in
    its Ray actor; else vLLM's own processes) | in_process (refused here where it cannot run) |
    separate."""
    rollout_engines: tuple[int, ...] = ()
    """Disaggregated placement: the vLLM TP size of each rollout engine (rollout data
    parallelism: prompts are split over them and every engine receives every weight sync), e.g.
    [2, 2]. Empty: one engine of ``engine_tensor_parallel``."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """fp32 | bf16 | fp8 for the actor, reference and critic (megatron_rlhf.config.precision);
    the engine generates in fp32 for fp32 training and in bf16 otherwise."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Nodes, GPUs per node, CPUs per worker, the engine's GPU memory share
    (megatron_rlhf.config.resources); the default is a CPU run."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """colocated (engine inside the actor's rank 0; groups share bundles) | disaggregated."""
    rollout_mode: Literal["sync", "one_step_off"] = "sync"
    """sync (each step generates its batch with the weights of the previous update) |
    one_step_off (asynchronous: the batch of step k+1 is generated on the disaggregated engines
    while step k trains, so samples are at most one update stale; needs ``placement:
    disaggregated``; see megatron_rlhf.trainer.one_step_off, and ``algorithm.rollout_is`` for the
    truncated importance-sampling correction). A resumed one_step_off run regenerates the batch
    that was in flight at the checkpoint with the restored weights."""
    weight_sync_bucket_bytes: int = 64 * 1024**2
    sync_alarm_logprob_diff: float | None = 0.05
    """Alarm when the trainer's log-probs of the sampled tokens differ from the engine's by more
    than this (both hold the same weights after a sync; a larger gap means a broken sync or a
    dtype/kernel mismatch). None: no check."""
    sync_alarm_action: Literal["warn", "stop"] = "warn"
    """warn (log and count in ``ratio/sync_alarms``) | stop (raise, after the step's checkpoint)."""
    reward_config: RewardConfig = field(default_factory=default_reward_config)
    """The parsed reward configuration (``megatron_rlhf.rewards.reward_config``); in the YAML, the
    path of the reward YAML file (relative to the working directory) or null: one verifier per
    verifiable domain. Sources of ``kind: reward_model`` (a ``train-rm`` checkpoint) get their own
    worker group."""
    curriculum: CurriculumConfig | None = None
    """Curriculum phases (``megatron_rlhf.data.curriculum``; in the YAML any form
    ``CurriculumConfig.from_mapping`` takes); None: uniform over all prompts."""
    checkpoint_every: int = 10
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    seed: int = 1234
    ray_address: str | None = None
    """Ray cluster to join; None starts a local one sized to this machine."""
    tensorboard: bool = True
    wandb: bool = False
    console: bool = True
    fit_check: FitCheckConfig = field(default_factory=FitCheckConfig)
    """The planner's pre-start check (GPU to fit, explicit override); see megatron_rlhf.planning."""

    def __post_init__(self) -> None:
        if not isinstance(self.reward_config, RewardConfig):
            raise TypeError(f"RLConfig.reward_config must be a RewardConfig (load_reward_config(path) reads a "
                            f"reward YAML), got {self.reward_config!r}")
        if self.curriculum is not None and not isinstance(self.curriculum, CurriculumConfig):
            raise TypeError(f"RLConfig.curriculum must be a CurriculumConfig or None "
                            f"(CurriculumConfig.from_mapping types a parsed mapping), got {self.curriculum!r}")
        if not self.prompt_files:
            raise ValueError("RLConfig.prompt_files is empty: give at least one prompt JSONL file")
        for name in ("steps", "prompts_per_step", "n", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)} must be >= 1")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"RLConfig.placement={self.placement!r} (colocated or disaggregated)")
        if self.rollout_engines and (self.placement != "disaggregated"
                                     or any(not isinstance(tp, int) or tp < 1 for tp in self.rollout_engines)):
            raise ValueError(f"RLConfig.rollout_engines={list(self.rollout_engines)} needs placement: "
                             "disaggregated and TP sizes >= 1")
        if (self.resources.uses_gpus and self.placement == "colocated"
                and self.engine_tensor_parallel * self.resources.gpus_per_rank > 1):
            raise ValueError(f"RLConfig.engine_tensor_parallel={self.engine_tensor_parallel}: a colocated engine "
                             "shares the actor rank-0 GPU (TP 1); use placement: disaggregated for larger engines")
        if self.rollout_mode not in ROLLOUT_MODES:
            raise ValueError(f"RLConfig.rollout_mode={self.rollout_mode!r} (choose {', '.join(ROLLOUT_MODES)})")
        if self.rollout_mode == "one_step_off" and self.placement != "disaggregated":
            raise ValueError(f"RLConfig.rollout_mode='one_step_off' needs placement: disaggregated (got "
                             f"{self.placement!r}): the engines generate while the actor trains, so they "
                             "cannot live inside the actor")
        for tp in set(self.engine_tensor_parallels):
            check_engine_bind(self.engine_cpu_bind, tp, "RLConfig.engine_cpu_bind")
        self._check_engine_process()
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if self.sync_alarm_action not in SYNC_ALARM_ACTIONS:
            raise ValueError(f"RLConfig.sync_alarm_action={self.sync_alarm_action!r} (warn or stop)")
        if not self.temperature > 0:
            raise ValueError(f"RLConfig.temperature={self.temperature} must be > 0")
        samples = self.prompts_per_step * self.n
        if samples % self.update.num_minibatches:
            raise ValueError(
                f"prompts_per_step x n = {samples} samples do not split into "
                f"num_minibatches={self.update.num_minibatches}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> RLConfig:
        """The run configuration from its parsed YAML mapping (``algorithm`` may already be typed),
        typed strictly (``config.typed_load``). ``reward_config`` (a path, used as given, or null)
        is read here, once; ``curriculum`` is typed. ConfigError / MissingInput naming ``where``
        and the key path (a reward YAML's own errors name that file and its key path)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
        fields = dict(data)
        reward = fields.pop("reward_config", None)
        if isinstance(reward, str):
            fields["reward_config"] = load_reward_config(reward, at(where, "reward_config"))
        elif isinstance(reward, RewardConfig):
            fields["reward_config"] = reward
        elif reward is not None:
            raise ConfigError(f"{at(where, 'reward_config')}: expected the path of a reward YAML file or null, "
                              f"got {reward!r}")
        curriculum = fields.get("curriculum")
        if curriculum is not None and not isinstance(curriculum, CurriculumConfig):
            fields["curriculum"] = CurriculumConfig.from_mapping(curriculum, at(where, "curriculum"))
        return dataclass_from_mapping(cls, fields, where)

    @property
    def sampling(self) -> SamplingSettings:
        """What the engine samples each step's responses with (``n``, ``temperature``,
        ``max_new_tokens``); seeded by ``seed`` (the loop derives each step's seed from it)."""
        return SamplingSettings(n=self.n, temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                seed=self.seed)

    @property
    def engine_tensor_parallels(self) -> tuple[int, ...]:
        """vLLM TP size of each rollout engine of the run."""
        return tuple(self.rollout_engines) or (self.engine_tensor_parallel,)

    def _check_engine_process(self) -> None:
        """A bad or impossible ``engine_process``, refused before anything starts."""
        from megatron_rlhf.config.rollout import ENGINE_PROCESSES

        if self.engine_process not in ENGINE_PROCESSES:
            raise ValueError(f"RLConfig.engine_process={self.engine_process!r} (choose {', '.join(ENGINE_PROCESSES)})")
        if self.engine_process != "in_process":
            return
        for obstacle in self._in_process_obstacles():
            if obstacle is not None:
                raise ValueError(f"RLConfig.engine_process='in_process': {obstacle}; use separate or auto")

    def run_threads(self, trainer_sizes: Mapping[str, int], cores: Sequence[int],
                    environment_bind: str | None) -> RunThreads:
        """The threads of the run's processes: its Megatron groups of ``trainer_sizes`` ranks and
        its engines on ``cores`` (``config.cpu_split``; ``environment_bind``: the user's
        ``VLLM_CPU_OMP_THREADS_BIND``). Explicit ``threads_per_rank`` and ``engine_cpu_bind`` win.
        The split applies where every process runs on the driver's machine (one node, no
        ``ray_address``); otherwise ``auto`` ranks take 1 thread and each engine splits its own
        machine's cores. GPU runs: 1 thread per rank, no CPU binding (the variable is ignored)."""
        split = split_cpu_cores(cores, sum(trainer_sizes.values()), self.engine_tensor_parallels,
                                overlapped=self.rollout_mode == "one_step_off")
        on_gpu = self.resources.uses_gpus
        local = self.resources.nodes == 1 and self.ray_address is None
        groups = {"actor": self.actor, "reference": self.reference, "critic": self.critic}
        threads = {}
        for name in trainer_sizes:
            chosen = groups[name].threads_per_rank if name in groups else "auto"
            threads[name] = chosen if chosen != "auto" else split.rank_threads if local and not on_gpu else 1
        if on_gpu:
            return RunThreads(threads, tuple((AUTO, "GPU run") for _ in split.engine_binds), split, on_gpu)
        if self.engine_cpu_bind == AUTO and environment_bind:
            for tp in self.engine_tensor_parallels:
                check_engine_bind(environment_bind, tp, f"environment {BIND_ENV}")
        computed = split.engine_binds if local else (AUTO,) * len(split.engine_binds)
        binds = tuple(resolve_engine_bind(self.engine_cpu_bind, bind, environment_bind) for bind in computed)
        if not local:
            binds = tuple((bind, "each engine's own machine" if bind == AUTO else source) for bind, source in binds)
        return RunThreads(threads, binds, split, on_gpu, self.engines_in_process())

    def _in_process_obstacles(self) -> tuple[str | None, ...]:
        """Per engine: why it cannot run in the process that holds it (None: it can). That process
        is the colocated actor's rank 0 (in the actor's torch.distributed world) or a disaggregated
        engine's own actor (none); NUMA nodes are read here when every process runs on this machine
        (one node, no ``ray_address``), elsewhere each engine's host decides at start-up."""
        from megatron_rlhf.rollout.engine_in_process import host_numa_nodes, in_process_obstacle

        holder_world = None if self.placement == "disaggregated" else self.actor.world_size
        numa_nodes = host_numa_nodes() if self.resources.nodes == 1 and self.ray_address is None else 1
        return tuple(in_process_obstacle(self.resources.uses_gpus, tp, holder_world, numa_nodes)
                     for tp in self.engine_tensor_parallels)

    def engines_in_process(self) -> tuple[bool, ...]:
        """Per engine: whether it will run in the process that holds it (``engine_process`` auto or
        in_process where that can run)."""
        return tuple(self.engine_process != "separate" and obstacle is None for obstacle in self._in_process_obstacles())

    @property
    def algorithm_name(self) -> str:
        return "ppo" if self.algorithm.needs_critic else "grpo"

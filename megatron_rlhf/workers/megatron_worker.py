"""Thin Ray workers that hold one Megatron model shard for a role and call library functions.

One class per role of the RL loop: :class:`ActorWorker` (``lm`` model, PPO/GRPO updates through
:class:`~megatron_rlhf.training.actor_critic.ActorTrainer`, weight sync into the rollout engine),
:class:`ReferenceWorker` (frozen ``lm`` model, log-probs only) and :class:`CriticWorker`
(``value`` model, :class:`~megatron_rlhf.training.actor_critic.CriticTrainer`). Each is one rank of
a :class:`~megatron_rlhf.workers.group.WorkerGroup`; the driver calls a method on every rank of
the group at once, because the library functions behind them are collectives.

Workers hold no algorithm logic: they build the model for their role and fill it from a Hugging
Face directory (:func:`~megatron_rlhf.checkpoint.role_model.load_role_model`), and forward calls. The classes are plain Python (Ray wraps
them in :class:`WorkerGroup`), so a test can also run one in-process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_rlhf.algorithms import AlgorithmConfig, Experience
from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.config.optimizer import OptimizerSettings
from megatron_rlhf.config.ppo_update import PPOUpdateConfig
from megatron_rlhf.config.precision import PrecisionConfig
from megatron_rlhf.types import RolloutBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleWorkerSpec:
    """What one worker group builds."""

    hf_dir: str
    """Hugging Face directory the model starts from (weights, config)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The group's Megatron layout; its world size is the group size (DP takes the rest)."""
    optimizer: OptimizerSettings | None = None
    """Optimizer of a trained role (actor, critic); None for frozen roles."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    update: PPOUpdateConfig = field(default_factory=PPOUpdateConfig)
    temperature: float = 1.0
    """The run's one sampling temperature (> 0): the engine samples at it (the actor refuses
    to generate at another) and the actor's and reference's log-probs are computed at it."""
    seed: int = 1234
    threads: int = 1
    """torch intra-op threads per rank (CPU machines)."""
    params_dtype: str = "float32"
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """fp32 | bf16 | fp8 training precision of the group (sets the weight dtype when not fp32)."""
    tokenizer_size: int | None = None
    """``len(tokenizer)`` of ``hf_dir``'s tokenizer, counted once by the driver (which has it
    loaded); None: each rank loads the tokenizer to count it (importing transformers, about 1.5 s
    of CPU per rank process)."""


def defined_vocab_size(hf_dir: str, vocab_size: int, tokenizer_size: int | None = None) -> int:
    """Tokens the tokenizer defines (the engine never samples the padded rows beyond them, and
    its log-probs are normalised over these), at most the model's vocabulary size;
    ``tokenizer_size``: the tokenizer's length when the caller has counted it (else loaded here)."""
    if tokenizer_size is None:
        from transformers import AutoTokenizer

        tokenizer_size = len(AutoTokenizer.from_pretrained(hf_dir))
    return min(tokenizer_size, vocab_size)


class MegatronWorker:
    """One rank: process-group set-up, model build and load; subclasses add role methods."""

    role = "lm"

    def __init__(self, rank: int, world_size: int, spec: RoleWorkerSpec):
        self.rank = rank
        self.world_size = world_size
        self.spec = spec
        self.model: torch.nn.Module | None = None
        self.arch: Any = None
        self.padded_vocab = 0

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and the port of the rendezvous store this rank (rank 0) now holds
        open, so no other process on the node can take the port before the group joins."""
        from megatron_rlhf.parallel.init import open_rendezvous_store

        self._store = open_rendezvous_store(self.world_size)
        try:
            import ray

            address = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray (in-process use): loopback
            address = "127.0.0.1"
        return address, int(self._store.port)

    def rendezvous_store(self, address: str, port: int) -> Any:
        """The store of this group's rendezvous: rank 0's own, a client of it elsewhere."""
        from megatron_rlhf.parallel.init import join_rendezvous_store

        store = getattr(self, "_store", None)
        self._store = None
        return store if store is not None else join_rendezvous_store(address, port, self.world_size)

    def join_process_group(self, address: str, port: int) -> None:
        """Initialise torch.distributed + Megatron for this rank, then :meth:`load_model`."""
        from megatron_rlhf.parallel.init import initialize_parallel
        from megatron_rlhf.workers.placement import assigned_local_device

        device = assigned_local_device()  # the GPU Ray gave this rank (None: CPU rank / no Ray GPU)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(self.rank if device is None else device),
                          MASTER_ADDR=address, MASTER_PORT=str(port))
        torch.set_num_threads(self.spec.threads)
        state = initialize_parallel(self.spec.parallel, seed=self.spec.seed,
                                    store=self.rendezvous_store(address, port))
        self._joined()
        self.load_model(state)

    def _joined(self) -> None:
        """Hook: the process group is up, the model not yet built."""

    def load_model(self, state: Any) -> None:
        """Build this rank's stage for the role and fill it from ``spec.hf_dir``, in the parallel
        state ``state`` (the :class:`~megatron_rlhf.parallel.init.ParallelState` of ``spec.parallel``,
        already initialised), then the role's set-up."""
        from megatron_rlhf.checkpoint.role_model import HFWeights, load_role_model
        from megatron_rlhf.models.arch import arch_spec_from_hf_dir
        from megatron_rlhf.models.provider import ModelBuildConfig
        from megatron_rlhf.training.gpu_metrics import GpuPhaseMonitor

        self.state = state
        self.arch = arch_spec_from_hf_dir(self.spec.hf_dir)
        build = ModelBuildConfig(role=self.role, params_dtype=self.spec.params_dtype, precision=self.spec.precision)
        self.gpu = GpuPhaseMonitor(self.rank)
        self.weights_dtype = build.weights_dtype
        loaded = load_role_model(self.arch, self.spec.parallel, build, HFWeights(self.spec.hf_dir), state.device)
        self.model, self.padded_vocab = loaded.model, loaded.padded_vocab
        self.valid_vocab_size = defined_vocab_size(self.spec.hf_dir, self.arch.vocab_size, self.spec.tokenizer_size)
        self._after_load()

    def _after_load(self) -> None:
        """Role set-up once the weights are in (trainer, optimizer)."""

    def ppo_minibatches(self) -> int:
        """PPO minibatches per update of the run: the role proxies keep their boundaries when they
        split a batch over data-parallel replicas, for every role alike."""
        return self.spec.update.num_minibatches

    def rank_layout(self) -> Any:
        """This rank's DP rank and whether it holds its replica's results (the dispatch's view)."""
        from megatron.core import parallel_state

        from megatron_rlhf.parallel.data_dispatch import RankLayout

        holds = (parallel_state.get_tensor_model_parallel_rank() == 0
                 and parallel_state.get_context_parallel_rank() == 0
                 and parallel_state.is_pipeline_last_stage())
        return RankLayout(self.rank, parallel_state.get_data_parallel_rank(),
                          parallel_state.get_data_parallel_world_size(), holds)

    def _held(self, result: Any) -> Any:
        """``result`` on the rank that holds its replica's results, None elsewhere (not sent back)."""
        return result if self.rank_layout().holds_output else None

    def _checkpointed(self, name: str) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        return {name: trainer.updater if trainer is not None else self.model}

    def save_state(self, run_dir: str, name: str, step: int, extra_state: dict, keep_last: int) -> str:
        """Atomic checkpoint of this group's model (+ optimizer, schedule, RNG) under ``run_dir/name``."""
        from megatron_rlhf.checkpoint.train_state import save_train_state

        return str(save_train_state(os.path.join(run_dir, name), step, self._checkpointed(name), extra_state,
                                    keep_last=keep_last))

    def load_state(self, run_dir: str, name: str, step: int | None) -> tuple[int, dict] | None:
        """Restore the newest complete checkpoint (or the one at ``step``); None when there is none."""
        from megatron_rlhf.checkpoint.train_state import (
            complete_checkpoints,
            load_latest_train_state,
            load_train_state,
        )

        root = os.path.join(run_dir, name)
        if step is None:
            info = load_latest_train_state(root, self._checkpointed(name))
        else:
            found = dict(complete_checkpoints(root))
            info = load_train_state(found[step], self._checkpointed(name)) if step in found else None
        return None if info is None else (info.step, info.extra_state)

    def gpu_metrics(self) -> dict[str, float]:
        """This rank's GPU metrics since the last call (empty without a GPU)."""
        monitor = getattr(self, "gpu", None)
        return monitor.pop() if monitor is not None else {}

    def _update_flops_per_gpu(self, batch: RolloutBatch) -> float:
        """Model FLOPs of an update over ``batch`` per GPU of the group: ``batch`` is this data-parallel
        replica's share, whose work its ``world_size / DP`` ranks (TP x PP x CP) share."""
        from megatron.core import parallel_state

        from megatron_rlhf.training.gpu_metrics import training_flops

        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        replica_ranks = self.world_size // parallel_state.get_data_parallel_world_size()
        return training_flops(self.arch, lengths, self.role, self.spec.update.ppo_epochs) / replica_ranks

    def shutdown(self) -> None:
        from megatron_rlhf.parallel.init import destroy_parallel

        destroy_parallel()

    def pid(self) -> int:
        return os.getpid()


class ReferenceWorker(MegatronWorker):
    """Frozen policy copy: the KL anchor.

    Its log-probs take the actor's path (:func:`~megatron_rlhf.models.sequence_logprobs.response_logprobs`
    with the same temperature, vocabulary and microbatch size, all from the spec both are built
    with), so with the actor's weights it gives the actor's log-probs bit for bit: KL 0 at step 0.
    """

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        """This rank's share's ``[b, R]`` log-probs; None off the replica's output rank."""
        from megatron_rlhf.models.sequence_logprobs import response_logprobs

        with self.gpu.phase("reference_logprobs"):
            update = self.spec.update
            return self._held(response_logprobs(self.model, batch, self.valid_vocab_size, self.spec.temperature,
                                                update.micro_batch_size, update.packing,
                                                update.max_tokens_per_microbatch))


class ActorWorker(MegatronWorker):
    """The policy: log-probs and entropy, PPO/GRPO updates, weight export into the engine."""

    def _after_load(self) -> None:
        from megatron_rlhf.training.actor_critic import ActorTrainer

        if self.spec.optimizer is None:
            raise ValueError("the actor worker needs RoleWorkerSpec.optimizer")
        self.trainer = ActorTrainer(self.model, self.spec.optimizer, self.spec.algorithm, self.spec.update,
                                    valid_vocab_size=self.valid_vocab_size, temperature=self.spec.temperature)
        self.engine = None
        self.weight_sync = None

    # --- rollout engine (colocated on rank 0, or a remote engine) ---------------------------
    def stage_engine(self, rollout_config: Any) -> None:
        """Start the colocated engine of ``rollout_config`` on rank 0 as soon as this rank has
        joined its process group, in a thread of its own, while the rank builds and loads its
        model (CPU machines: vLLM's engine-core and worker processes start on the cores the
        load leaves idle); :meth:`attach_engine` then takes it. The engine sees the environment
        it saw when started after the load (rank variables set by the join). An engine that runs
        in the rank's own process (``engine_process`` resolving to ``in_process``) is not staged:
        :meth:`attach_engine` starts it, after the load. Call before the join."""
        self._staged_engine = rollout_config if self.rank == 0 else None

    def _joined(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        config = getattr(self, "_staged_engine", None)
        if config is None:
            return
        from megatron_rlhf.rollout.engine_in_process import IN_PROCESS, engine_process_here

        if engine_process_here(config) == IN_PROCESS:
            # vLLM's worker builds its groups in this rank's process group: not while the model
            # load may build others; attach_engine starts it (seconds, in this process)
            self._staged_engine = None
            return
        # Both threads import from transformers, whose lazy module is not thread-safe (a name
        # half-imported by one thread is missing for the other): the rank's thread imports first what
        # either side uses (the tokenizer and config classes by loading them, vLLM, the model code).
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM  # noqa: F401 - vllm.entrypoints.llm and what it imports from transformers

        import megatron_rlhf.checkpoint.role_model  # noqa: F401
        import megatron_rlhf.training.actor_critic  # noqa: F401
        from megatron_rlhf.rollout.engine import RolloutEngine

        AutoConfig.from_pretrained(config.model_dir)
        AutoTokenizer.from_pretrained(config.model_dir)
        pool = ThreadPoolExecutor(1, thread_name_prefix="engine-start")
        self._engine_starting = pool.submit(RolloutEngine, config)
        pool.shutdown(wait=False)

    def _started_engine(self, rollout_config: Any) -> Any:
        """The engine :meth:`stage_engine` started (waits for it), or None when none was staged."""
        starting, self._engine_starting = getattr(self, "_engine_starting", None), None
        if starting is None:
            return None
        engine = starting.result()
        if self._staged_engine != rollout_config:
            engine.shutdown()
            raise ValueError(f"attach_engine({rollout_config}) differs from the staged engine {self._staged_engine}")
        return engine

    def attach_engine(self, rollout_config: Any | None, remote: Any | None = None,
                      bucket_bytes: int = 64 * 1024**2) -> None:
        """Start the colocated engine on rank 0 (``rollout_config``) or use remote ones (a handle
        or a list of handles: rollout data parallelism, every engine synced), and open the
        weight-transfer group(s) (a collective over the actor group)."""
        from megatron_rlhf.rollout.weight_sync import WeightSync, WeightSyncConfig, WeightSyncFanout

        remotes = list(remote) if isinstance(remote, (list, tuple)) else [remote] if remote is not None else []
        engines = None
        if self.rank == 0:
            if remotes:
                from megatron_rlhf.workers.rollout_worker import RemoteEngine

                engines = [RemoteEngine(handle) for handle in remotes]
            else:
                from megatron_rlhf.rollout.engine import RolloutEngine

                engines = [self._started_engine(rollout_config) or RolloutEngine(rollout_config)]
            if len(engines) == 1:
                self.engine = engines[0]
            else:
                from megatron_rlhf.rollout.engine_pool import EnginePool

                self.engine = EnginePool(engines)
        host = "127.0.0.1"
        if remote is not None:  # the engine's workers may run on another node: listen where they reach us
            import ray

            host = ray.util.get_node_ip_address()
        sync_config = WeightSyncConfig(bucket_bytes=bucket_bytes, host=host)
        if len(remotes) > 1:
            self.weight_sync = WeightSyncFanout(engines, len(remotes), sync_config)
        else:
            self.weight_sync = WeightSync(self.engine, sync_config)
        self.weight_sync.connect()

    def generate(self, prompts: list, settings: Any) -> RolloutBatch:
        """Sample with the colocated engine (rank 0 only; other ranks return None)."""
        if self.rank != 0:
            return None
        if self.engine is None:
            raise RuntimeError("generate() called on an actor without an attached engine")
        if settings.temperature != self.spec.temperature:
            raise ValueError(f"generate() at temperature {settings.temperature}, but this actor computes log-probs "
                             f"at {self.spec.temperature}: one temperature serves both (RoleWorkerSpec.temperature)")
        with self.gpu.phase("rollout"):
            batch = self.engine.generate(prompts, settings)
        # Colocated GPU engines with sleep mode hand their memory to training until the next
        # sync (a no-op otherwise, and for a remote engine, which has its own devices).
        self.engine.release_memory()
        return batch

    def generate_stream(self, prompts: list, settings: Any):
        """:meth:`generate` as :mod:`~megatron_rlhf.rollout.stream` events (rank 0 only; a Ray
        streaming generator)."""
        if self.rank != 0 or self.engine is None:
            raise RuntimeError("generate_stream() is for the actor's rank 0 with an attached engine")
        if settings.temperature != self.spec.temperature:
            raise ValueError(f"generate() at temperature {settings.temperature}, but this actor computes log-probs "
                             f"at {self.spec.temperature}: one temperature serves both (RoleWorkerSpec.temperature)")
        with self.gpu.phase("rollout"):
            yield from self.engine.generate_stream(prompts, settings)
        self.engine.release_memory()

    def sync_weights(self, wait: bool = True) -> dict[str, Any]:
        """The transfer's report; ``wait=False`` may leave a disaggregated engine loading (its
        Ray handles under ``"pending"``, rank 0: see ``WeightSync.sync``)."""
        if self.engine is not None:  # rank 0 holds the engine
            self.engine.wake(("weights",))  # vLLM loads into its own weight memory: back first
        with self.gpu.phase("weight_sync"):
            report = self.weight_sync.sync(self.model, self.arch, wait=wait)
        if self.engine is not None:
            self.engine.wake(("kv_cache",))
        return {"seconds": report.seconds, "bytes": float(report.bytes), "buckets": float(report.buckets),
                "pending": list(report.pending)}

    # --- training ----------------------------------------------------------------------------
    def logprobs_and_entropy(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's share's ``([b, R], [b, R])``; None off the replica's output rank."""
        with self.gpu.phase("actor_logprobs"):
            return self._held(self.trainer.logprobs_and_entropy(batch))

    def update(self, batch: RolloutBatch, experience: Experience, kl_coef: float,
               algorithm: AlgorithmConfig | None = None) -> list[Any]:
        """PPO epochs over the batch; ``algorithm`` (the driver's) replaces the spec's when given."""
        if algorithm is not None:
            self.trainer.algorithm = algorithm
        with self.gpu.update("actor_update", self._update_flops_per_gpu(batch), self.weights_dtype):
            return self.trainer.update(batch, experience, kl_coef=kl_coef)

    def old_logprob_pass_reason(self, algorithm: AlgorithmConfig | None = None) -> str | None:
        """Why the step needs the old-policy log-prob pass under ``algorithm`` (the driver's; the
        spec's when None); None: :meth:`update_on_policy` replaces it."""
        if algorithm is not None:
            self.trainer.algorithm = algorithm
        return self.trainer.old_logprob_pass_reason()

    def update_on_policy(self, batch: RolloutBatch, experience: Experience, kl_coef: float,
                         algorithm: AlgorithmConfig | None = None) -> tuple[list[Any], torch.Tensor, torch.Tensor] | None:
        """One on-policy step without an old-policy pass: ``(stats, logprobs [b, R], entropy [b, R])``
        of this rank's share, the log-probs and entropy the update's own forward computed; None off
        the replica's output rank."""
        if algorithm is not None:
            self.trainer.algorithm = algorithm
        with self.gpu.update("actor_update", self._update_flops_per_gpu(batch), self.weights_dtype):
            result = self.trainer.update_on_policy(batch, experience, kl_coef=kl_coef)
        return self._held((result.stats, result.logprobs, result.entropy))

    def export_hf(self, out_dir: str) -> str | None:
        """Write the current policy as a Hugging Face directory (rank 0 writes; a collective)."""
        from megatron_rlhf.checkpoint.hf_export import save_hf_directory

        return save_hf_directory(self.model, self.arch, self.spec.hf_dir, out_dir, role="lm")

    def shutdown(self) -> None:
        starting, self._engine_starting = getattr(self, "_engine_starting", None), None
        if starting is not None:  # staged, never attached (a failed start-up): stop it too
            try:
                starting.result().shutdown()
            except Exception as error:  # noqa: BLE001 - its failure is reported by the start-up
                log.warning("the staged engine did not start: %s", error)
        if getattr(self, "weight_sync", None) is not None:
            self.weight_sync.shutdown()  # releases the shared-memory segment of the shm transport
        if getattr(self, "engine", None) is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
            self.engine = None
        super().shutdown()


class CriticWorker(MegatronWorker):
    """The value model of PPO (its value head starts fresh; the trunk from ``hf_dir``)."""

    role = "value"

    def _after_load(self) -> None:
        from megatron_rlhf.training.actor_critic import CriticTrainer

        if self.spec.optimizer is None:
            raise ValueError("the critic worker needs RoleWorkerSpec.optimizer")
        self.trainer = CriticTrainer(self.model, self.spec.optimizer, self.spec.algorithm, self.spec.update)

    def values(self, batch: RolloutBatch) -> torch.Tensor | None:
        """This rank's share's ``[b, R]`` values; None off the replica's output rank."""
        with self.gpu.phase("critic_values"):
            return self._held(self.trainer.values(batch))

    def update(self, batch: RolloutBatch, experience: Experience, algorithm: AlgorithmConfig | None = None) -> list[Any]:
        if algorithm is not None:
            self.trainer.algorithm = algorithm
        with self.gpu.update("critic_update", self._update_flops_per_gpu(batch), self.weights_dtype):
            return self.trainer.update(batch, experience)

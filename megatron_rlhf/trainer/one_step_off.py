"""One-step-off-policy rollouts: the next step's batch is generated while this step trains.

With ``RLConfig.rollout_mode: one_step_off`` (disaggregated placement: the engines are Ray actors
of their own, not inside the actor's rank 0), step ``k`` of
:func:`~megatron_rlhf.trainer.rl_step.rl_step` runs::

    take B_k (generated during step k-1, rewards streamed alongside)   -> phase "rollout"
    combine B_k's rewards                                              -> phase "reward"
    start B_{k+1} on the engines (weights theta_k), rewards streaming  -> background thread
      ... first the engines finish loading theta_k (the last sync's loads)
      ... once generated: B_{k+1}'s reference log-probs issued            -> the reference group
    old / reference log-probs, values, experience, updates -> theta_{k+1}
    wait until B_{k+1} is generated                                    -> phase "rollout_wait"
    copy theta_{k+1} out to the engines, which load it on their own    -> phase "weight_sync"

so generation of step ``k + 1`` overlaps the passes and the update of step ``k``, the engines'
loading of theta_{k+1} overlaps the start of step ``k + 1`` (where the transport allows:
``WeightSync.can_defer``; the step waits only until the weights are packed), and B_{k+1} was
sampled by weights one update older than those it is trained from (staleness 1; the first step,
and the first step after a resume, are on-policy: staleness 0). Staleness never exceeds 1: the
engines take new weights only between two generations, after every update. The PPO ratio is
taken against the trainer's own log-probs of B_k (``old_logprobs``), and the gap between the
engine's sampling policy and the trainer's is what truncated importance sampling corrects
(``AlgorithmConfig.rollout_is``, :mod:`megatron_rlhf.algorithms.rollout_correction`).

Prompts are drawn from the sampler in the same order as in synchronous mode and each step's
sampling seed is that step's (``seed + stride * step``), so both modes see the same prompts.

Checkpoint / resume: a checkpoint after step ``k`` holds the sampler as it was before the
in-flight batch B_{k+1} drew its prompts; that batch is discarded (never trained on) when the run
stops, and a resumed run draws the same prompts again and regenerates them with the restored
weights theta_{k+1} (staleness 0 for that one step). A resumed one-step-off run is therefore not
bit-identical to an uninterrupted one (that step's samples come from newer weights); everything
else the loop checkpoints is restored exactly.

Rewards keep their order: a batch's rewards are combined (normalisation, the infra-error window)
in the main thread, in step order, before the next batch starts.

The frozen reference needs nothing of step ``k``: ``early_passes`` (the run gives the reference
group's ``start_logprobs``) is called with B_{k+1} on the generating thread as soon as the
batch is generated, so its pass runs during the rest of step ``k`` (the wait, the weight sync)
instead of at the start of step ``k + 1``; :meth:`OneStepOffRollouts.take` hands back what it
returned (None for a batch generated in the foreground: the step issues the pass itself). Only
the reference: the critic's values and the actor's log-probs of B_{k+1} need the weights of
update ``k``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from megatron_rlhf.trainer.rollout_phase import generate_scored

log = logging.getLogger(__name__)


class TakenBatch(NamedTuple):
    """What :meth:`OneStepOffRollouts.take` hands a step."""

    prompts: list
    batch: Any
    scoring: Any
    """The batch's reward stream."""
    staleness: int
    """Updates between the weights that sampled the batch and the trainer's."""
    early: Any = None
    """What ``early_passes`` returned for the batch (None: not called, the batch was generated now)."""
    load_wait: float = 0.0
    """Seconds its generation waited for the engines to finish loading the last sync's weights."""


@dataclass
class _InFlight:
    step: int
    prompts: list
    version: int
    """Updates behind the weights the batch is generated with (the engine's weight version)."""
    thread: threading.Thread
    result: tuple | None = None
    early: Any = None
    error: BaseException | None = None
    load_wait: float = 0.0
    """Seconds the generating thread waited for the engines to finish loading the weights."""


class OneStepOffRollouts:
    """Generates the batch of step ``k + 1`` on the disaggregated engines during step ``k``."""

    def __init__(self, engine: Any, sampler: Any, sampling_for: Callable[[int], Any], tokenizer: Any,
                 router: Any, chat_template: bool, last_step: int, engine_version: int,
                 early_passes: Callable[[Any], Any] | None = None):
        self.engine = engine
        """Driver-side proxy of the rollout engine(s) (``generate_stream``): never the actor's rank 0."""
        self.sampler = sampler
        self.sampling_for = sampling_for
        self.tokenizer = tokenizer
        self.router = router
        self.chat_template = chat_template
        self.last_step = last_step
        """Steps of the run: no batch is started for a step at or past it."""
        self.engine_version = engine_version
        """How many updates the engine's weights have seen (the step of the last sync)."""
        self.early_passes = early_passes
        """Called with each background batch once generated (on the generating thread); see the module docstring."""
        self._inflight: _InFlight | None = None
        self._sampler_before: dict | None = None
        self._loading: list = []
        """Ray handles of the engines' loads of the last sync (``synced``): waited for before generating."""

    def _draw(self) -> list:
        return list(self.sampler.next_batch())

    def _wait_loaded(self) -> float:
        """Wait until the engines finished loading the last sync's weights; the seconds waited."""
        loading, self._loading = self._loading, []
        if not loading:
            return 0.0
        from megatron_rlhf.workers.rollout_worker import wait_engine_calls

        start = time.perf_counter()
        wait_engine_calls(loading)
        return time.perf_counter() - start

    def _generate(self, step: int, prompts: list) -> tuple:
        batch, stream = generate_scored(self.engine, [p.engine_input(self.chat_template) for p in prompts],
                                        self.sampling_for(step), prompts, self.tokenizer, self.router, step)
        return batch, stream

    def start(self, step: int) -> None:
        """Draw the prompts of ``step`` and start generating them in the background (no-op past
        the last step, or when a batch is already in flight)."""
        if step >= self.last_step or self._inflight is not None:
            return
        self._sampler_before = self.sampler.state_dict()
        prompts = self._draw()

        def run() -> None:
            try:
                flight.load_wait = self._wait_loaded()
                flight.result = self._generate(step, prompts)
                if self.early_passes is not None:
                    flight.early = self.early_passes(flight.result[0])
            except BaseException as error:  # re-raised by take / wait_generated
                flight.error = error

        flight = _InFlight(step, prompts, self.engine_version, threading.Thread(target=run, daemon=True,
                                                                                name=f"rollout-step-{step}"))
        self._inflight = flight
        flight.thread.start()

    def take(self, step: int) -> TakenBatch:
        """The batch of ``step``: started during the previous step, or generated now (the first
        step, after a resume)."""
        flight = self._inflight
        if flight is None:
            prompts = self._draw()
            load_wait = self._wait_loaded()
            batch, stream = self._generate(step, prompts)
            return TakenBatch(prompts, batch, stream, step - self.engine_version, load_wait=load_wait)
        if flight.step != step:
            raise RuntimeError(f"the batch in flight is for step {flight.step}, step {step} asked for it")
        self.wait_generated()
        self._inflight, self._sampler_before = None, None
        batch, stream = flight.result
        return TakenBatch(flight.prompts, batch, stream, step - flight.version, flight.early, flight.load_wait)

    def wait_generated(self) -> None:
        """Block until the batch in flight is generated (its rewards may still be scoring): the
        engines are idle afterwards and may take new weights. Raises what the generation raised."""
        flight = self._inflight
        if flight is None:
            return
        flight.thread.join()
        if flight.error is not None:
            self._inflight = None
            if flight.result is not None:  # generated, then the early pass failed: stop its scoring
                flight.result[1].close()
            raise flight.error

    def synced(self, version: int, loading: Any = ()) -> None:
        """The engines now hold the weights after ``version`` updates, once ``loading`` (the
        sync's ``"pending"`` Ray handles: loads still running) is done; the next generation waits for it."""
        self.engine_version = version
        self._loading = list(loading)

    def sampler_state(self) -> dict:
        """The sampler's state for a checkpoint: before the in-flight batch drew its prompts."""
        return self._sampler_before if self._inflight is not None else self.sampler.state_dict()

    def close(self) -> None:
        """Discard the batch in flight (waits for its generation; its rewards are dropped) and
        wait for the engines' last loads (a failure is logged: the run is over)."""
        flight, self._inflight = self._inflight, None
        if flight is not None:
            flight.thread.join()
            if flight.result is not None:
                flight.result[1].close()
        try:
            self._wait_loaded()
        except Exception as error:  # noqa: BLE001 - nothing will generate with these weights
            log.warning("the engines' last weight load failed: %s", error)

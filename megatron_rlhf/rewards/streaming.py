"""Scoring samples as they are generated: rewards off the critical path of a rollout.

:class:`RewardStream` takes the samples of one batch in any order and in any number of pieces
(e.g. each prompt group as the engine finishes it) and calls the router's sources on them at
once, in background threads: every source works on its own thread, concurrently with the other
sources and with the caller (generation). A source is never called twice at the same time; while
a call is running, newly arrived samples queue and go together in the source's next call (so a
slow learned scorer batches up what the fast verifiers already finished). :meth:`RewardStream.results`
waits for the last calls and combines the whole batch with
:meth:`~megatron_rlhf.rewards.router.HybridRewardRouter.combine`.

Guarantee: the results, their order (by row) and the router's state afterwards are those of
``router.score(samples)`` on the whole batch in row order, for sources whose reward of a sample
does not depend on which other samples share its call (true of the verifiers and the sandbox; a
learned scorer's batch padding can change the last bits of its float output). Normalisation,
clipping and the infra-error guard see the whole batch, in :meth:`~RewardStream.results`, and
nowhere else (so a stream that is never finished leaves the router untouched).

Errors: an exception raised by a source is re-raised by :meth:`~RewardStream.results`; rows added
twice or missing raise ``ValueError``.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from megatron_rlhf.rewards.sample import RewardResult, RewardSample


class RewardStream:
    """One batch's samples scored as they arrive (see the module docstring)."""

    def __init__(self, router: Any):
        self.router = router
        self._lock = threading.RLock()  # a done callback may run inside _start_locked
        self._samples: dict[int, RewardSample] = {}
        self._domains: dict[int, str] = {}
        self._pending: dict[str, list[int]] = {}
        self._running: dict[str, Future] = {}
        self._raw: dict[str, dict[int, RewardResult]] = {}
        self._error: BaseException | None = None
        self._idle = threading.Condition(self._lock)
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def add(self, rows: Iterable[tuple[int, RewardSample]]) -> None:
        """Queue ``(row, sample)`` pairs; their sources start on them now if idle."""
        rows = list(rows)
        routed = [(row, sample, self.router.route(sample)) for row, sample in rows]  # raises UnroutableSample
        with self._lock:
            for row, sample, domain in routed:
                if row in self._samples:
                    raise ValueError(f"row {row} was added to the reward stream twice")
                self._samples[row], self._domains[row] = sample, domain
                for name in self.router.config.domains[domain].sources:
                    self._pending.setdefault(name, []).append(row)
            for name in list(self._pending):
                self._start_locked(name)

    def _start_locked(self, name: str) -> None:
        if self._closed or name in self._running or not self._pending.get(name):
            return
        rows = self._pending.pop(name)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(len(self.router.sources), 1), thread_name_prefix="reward-stream")
        samples = [self._samples[row] for row in rows]
        future = self._pool.submit(self.router.sources[name].score, samples)
        self._running[name] = future
        future.add_done_callback(lambda done, name=name, rows=rows: self._finished(name, rows, done))

    def _finished(self, name: str, rows: list[int], future: Future) -> None:
        with self._lock:
            del self._running[name]
            try:
                results = future.result()
                if len(results) != len(rows):
                    raise RuntimeError(f"source {name!r} returned {len(results)} results for {len(rows)} samples")
                self._raw.setdefault(name, {}).update(zip(rows, results))
            except BaseException as error:  # re-raised by results()
                if self._error is None:
                    self._error = error
            if self._error is None:
                self._start_locked(name)
            self._idle.notify_all()

    def results(self, count: int) -> list[RewardResult]:
        """Wait for every queued call, then the router's combined results of rows ``0..count-1``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("results() of a closed reward stream")
            while self._running or (self._error is None and any(self._pending.values())):
                self._idle.wait()
            error = self._error
        self.close()
        if error is not None:
            raise error
        missing = [row for row in range(count) if row not in self._samples]
        if missing or len(self._samples) != count:
            raise ValueError(f"the reward stream holds rows {sorted(self._samples)[:8]}..., expected 0..{count - 1}"
                             f" (missing {missing[:8]})")
        return self.router.combine([self._domains[row] for row in range(count)], self._raw)

    def close(self) -> None:
        """Stop the threads: queued samples are dropped, running calls waited for (idempotent)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def score_in_pieces(router: Any, pieces: Sequence[Sequence[tuple[int, RewardSample]]]) -> list[RewardResult]:
    """Stream ``pieces`` in order and return the combined results (what a rollout does)."""
    stream = RewardStream(router)
    for piece in pieces:
        stream.add(piece)
    return stream.results(sum(len(piece) for piece in pieces))

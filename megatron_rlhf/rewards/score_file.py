"""`megatron-rlhf score`: score a JSONL file of samples with the hybrid reward router.

Input: one JSON object per line, ``{"id", "domain", "prompt", "response", "ground_truth"}``
(blank lines are skipped; bytes that are not UTF-8 reach the verifiers as lone surrogates).
Output: one JSON object per non-blank input line, in input order::

    {"id": ..., "line": N, "domain": ..., "reward": 1.0 | 0.0 | null, "status": ..., "verdict": ...,
     "detail": "...", "seconds": 0.12}

``status`` is ``scored``, ``failed_verification``, ``infra_error`` or ``malformed`` (a line that
is not a valid sample; ``detail`` says why, and the rest of the file is still scored). The summary
printed on stdout ends with ``scored=<n> passed=<n> failed=<n> errors=<n>``, where scored counts
every record written, passed the ``scored`` ones, failed the ``failed_verification`` ones and
errors the ``infra_error`` and ``malformed`` ones. Exit code: 0 without errors, 1 with errors or
when the infra-error rate stopped the run, 2 for a user error (missing file, bad config, a file
with no sample at all, an output that is the input or whose directory does not exist), raised
before any sample is scored or anything is written. A file whose every line is malformed or
unroutable still gets its per-line reasons written (exit 1).
"""

from __future__ import annotations

import collections
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from megatron_rlhf.config.errors import MissingInput
from megatron_rlhf.rewards.interface import InfraErrorRateExceeded
from megatron_rlhf.rewards.reward_config import RewardConfig, build_sources
from megatron_rlhf.rewards.router import HybridRewardRouter, UnroutableSample, route_domain
from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus
from megatron_rlhf.rewards.sandbox.isolation import SandboxUnavailable

logger = logging.getLogger(__name__)
REQUIRED_FIELDS = ("id", "domain", "prompt", "response", "ground_truth")


@dataclass
class Malformed:
    line: int
    sample_id: Any
    message: str


def read_samples(path: Path) -> list[RewardSample | Malformed]:
    """Samples (with ``metadata['line']``) and malformed lines, in file order."""
    entries: list[RewardSample | Malformed] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            entries.append(_parse_line(raw, line_number, path))
    return entries


def _parse_line(raw: bytes, line_number: int, path: Path) -> RewardSample | Malformed:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as error:
        return Malformed(line_number, None, f"{where}: not valid JSON ({str(error)[:200]})")
    if not isinstance(record, dict):
        return Malformed(line_number, None, f"{where}: expected a JSON object, got {type(record).__name__}")
    sample_id = record.get("id")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        return Malformed(line_number, sample_id, f"{where}: missing field(s) {missing}")
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        return Malformed(line_number, None, f"{where}: 'id' must be a string or an integer, got {sample_id!r}")
    for name in ("domain", "prompt", "response"):
        if not isinstance(record[name], str):
            return Malformed(line_number, sample_id, f"{where}: {name!r} must be a string, got {type(record[name]).__name__}")
    return RewardSample(
        sample_id=str(sample_id),
        domain=record["domain"],
        prompt=record["prompt"],
        response=record["response"],
        ground_truth=record["ground_truth"],
        metadata={"line": line_number, "id": sample_id},
    )


def _restricted(config: RewardConfig, domains: set[str]) -> RewardConfig:
    """The config with only the domains (and so the sources) the file uses."""
    routes = {d: r for d, r in config.router.domains.items() if d in domains}
    router = replace(config.router, domains=routes, fallback_domain=(
        config.router.fallback_domain if config.router.fallback_domain in routes else None))
    used = {name for route in routes.values() for name in route.sources}
    return RewardConfig(router, {n: s for n, s in config.sources.items() if n in used})


def score_file(input_path: Path, output_path: Path, config: RewardConfig, out: TextIO,
               chunk_size: int = 256) -> dict[str, int]:
    """Score ``input_path`` into ``output_path``; print the summary on ``out``; return the counts."""
    if not input_path.is_file():
        raise MissingInput(f"--input {input_path} does not exist")
    entries = read_samples(input_path)
    used_domains = set()
    for index, entry in enumerate(entries):
        if isinstance(entry, RewardSample):
            try:
                used_domains.add(route_domain(config.router, entry))
            except UnroutableSample as error:
                line = entry.metadata["line"]
                entries[index] = Malformed(line, entry.metadata["id"], f"{input_path}:{line}: {error}")
    samples = [entry for entry in entries if isinstance(entry, RewardSample)]
    results: dict[int, RewardResult] = {}
    stopped: str | None = None
    router = None
    if samples:  # a file of only malformed/unroutable lines still gets its per-line reasons
        config = _restricted(config, used_domains)
        router = HybridRewardRouter(config.router, build_sources(config))
    try:
        for start in range(0, len(samples), chunk_size):
            chunk = samples[start : start + chunk_size]
            try:
                chunk_results = router.score(chunk)
            except InfraErrorRateExceeded as stop:
                chunk_results, stopped = stop.results or [], str(stop)
            for sample, result in zip(chunk, chunk_results):
                results[sample.metadata["line"]] = result
            logger.info("scored %d/%d samples", min(start + chunk_size, len(samples)), len(samples))
            if stopped:
                break
    finally:
        if router is not None:
            router.close()
    counts = _write_records(entries, results, output_path)
    _print_summary(entries, results, counts, stopped, out)
    return counts


def _write_records(entries: list, results: dict[int, RewardResult], output_path: Path) -> dict[str, int]:
    counts = collections.Counter(scored=0, passed=0, failed=0, errors=0)
    with open(output_path, "w", encoding="utf-8", errors="surrogateescape") as handle:
        for entry in entries:
            if isinstance(entry, Malformed):
                record = {"id": entry.sample_id, "line": entry.line, "domain": None, "reward": None,
                          "status": "malformed", "verdict": "invalid_input", "detail": entry.message, "seconds": 0.0}
                counts["errors"] += 1
            elif (result := results.get(entry.metadata["line"])) is None:
                continue  # not reached: the run stopped on the infra-error rate
            else:
                record = {"id": entry.metadata["id"], "line": entry.metadata["line"], "domain": entry.domain,
                          "reward": result.reward, "status": result.status.value, "verdict": result.verdict.value,
                          "detail": result.detail, "seconds": round(result.seconds, 4)}
                counts[{RewardStatus.SCORED: "passed", RewardStatus.FAILED_VERIFICATION: "failed",
                        RewardStatus.INFRA_ERROR: "errors"}[result.status]] += 1
            counts["scored"] += 1
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")
    return dict(counts)


def _print_summary(entries: list, results: dict[int, RewardResult], counts: dict[str, int],
                   stopped: str | None, out: TextIO) -> None:
    per_domain: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in entries:
        if isinstance(entry, RewardSample) and (result := results.get(entry.metadata["line"])):
            per_domain[entry.domain][result.status.value] += 1
            per_domain[entry.domain]["verdict " + result.verdict.value] += 1
    for domain in sorted(per_domain):
        tally = per_domain[domain]
        verdicts = " ".join(f"{k[8:]}={v}" for k, v in sorted(tally.items()) if k.startswith("verdict "))
        print(f"{domain}: passed={tally['scored']} failed={tally['failed_verification']} "
              f"errors={tally['infra_error']} ({verdicts})", file=out)
    for entry in entries:
        if isinstance(entry, Malformed):
            print(f"malformed: {entry.message}", file=out)
    if stopped:
        print(f"stopped: {stopped}", file=out)
    print(f"scored={counts['scored']} passed={counts['passed']} failed={counts['failed']} errors={counts['errors']}", file=out)
    out.flush()


# --- command line ------------------------------------------------------------------------------


def run_score(input_path: str | Path, output_path: str | Path, config: RewardConfig, chunk_size: int = 256) -> int:
    """Score ``input_path`` into ``output_path`` with ``config`` (checked by ``preflight.score``
    before this); the command's exit status: 0 every sample scored, 1 some scored with errors,
    2 the sandbox is unavailable."""
    try:
        counts = score_file(Path(input_path), Path(output_path), config, sys.stdout, chunk_size)
    except SandboxUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if counts["errors"] == 0 else 1

"""Generative reward model (GenRM): a language model that judges a response and writes a verdict.

As in the ByteDance Seed study ("Exploring Data Scaling Trends and Effects in RLHF"), the judge is
asked either *with* a reference (the ground-truth answer of a reasoning task: "does the response
agree with it?") or *without* one (general tasks: "how good is the response?"). The same prompt
text is used to build the judge's SFT data (:func:`genrm_training_examples`) and to score
(:class:`GenRMSource`), so what the judge is trained on is what it is asked.

Verdicts the parser reads (:func:`parse_judgement`), case-, whitespace- and markdown-insensitive
(``**Verdict:** Correct``, ``### verdict - INCORRECT``), the LAST one in the text winning:

- ``Verdict: correct`` / ``incorrect`` (also ``right`` / ``wrong`` / ``not correct``) -> 1.0 / 0.0;
- ``Score: k/10`` (also ``k out of 10``, ``Rating: k``, any ``/d`` denominator; no denominator
  means out of 10) -> k / d, refused when k > d.

Guarantees of :class:`GenRMSource` (a :class:`~megatron_rlhf.rewards.interface.RewardSource`):
one result per sample, in order; a judgement without a readable verdict is an INFRA_ERROR with
verdict ``UNPARSEABLE_JUDGEMENT`` (``reward=None``: excluded from the update and counted by the
infra-error guard, never a silent 0); a judge prompt too long for the engine, an engine failure,
or a missing reference when one is required are INFRA_ERROR with their own verdict and detail.
Not guaranteed: that the verdict is right, or that an untrained judge writes parseable text.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from megatron_rlhf.config.rollout import RolloutConfig
from megatron_rlhf.config.sampling import SamplingSettings
from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus, Verdict

if TYPE_CHECKING:  # the engine (torch, vLLM) is imported when a source starts one
    from megatron_rlhf.rollout.engine import RolloutEngine

REFERENCE_MODES = ("required", "optional", "never")
VERDICT_FORMATS = ("binary", "score")

_MARKDOWN = str.maketrans({character: " " for character in "*_`#>[](){}\"'"})
_SEPARATOR = r"(?:[:=\-\u2013\u2014]\s*|is\b\s*)"
_NUMBER = r"\d+(?:\.\d+)?"
_VERDICT = re.compile(
    r"\b(?:verdict|judge?ment)\s*" + _SEPARATOR + r"*(not\s+correct|incorrect|correct|right|wrong)\b"
)
_SCORE = re.compile(  # "score: 8", "score is 8/10", "score 8 out of 10"; not "grade 5 students"
    r"\b(?:score|rating|grade)\s*(?:" + _SEPARATOR + r"+(?P<points>" + _NUMBER + r")"
    r"(?:\s*(?:/|out\s+of)\s*(?P<out_of>" + _NUMBER + r"))?"
    r"|(?P<bare_points>" + _NUMBER + r")\s*(?:/|out\s+of)\s*(?P<bare_out_of>" + _NUMBER + r"))"
)
_POSITIVE = {"correct", "right"}


@dataclass(frozen=True)
class GenRMConfig:
    rollout: RolloutConfig | None = None
    """Engine of the judge model when the source starts its own (the reward-config path);
    None: an engine must be passed to :class:`GenRMSource`."""
    reference: str = "optional"
    """required (a sample without a usable ground truth is an INVALID_INPUT error) | optional
    (judge with the reference when the sample has one, without otherwise) | never."""
    verdict_format: str = "binary"
    """binary ("Verdict: correct/incorrect") | score ("Score: k/10"): what the judge is asked for.
    The parser reads either form whatever is asked."""
    votes: int = 1
    """Judgements sampled per response; the reward is the mean of the parseable ones. >= 1;
    > 1 needs temperature > 0."""
    temperature: float = 0.0
    """Sampling temperature of the judge (0: greedy)."""
    max_new_tokens: int = 256
    """Longest judgement, in tokens. >= 1."""
    seed: int | None = 0
    """Sampling seed of the judge's requests (None: vLLM's own)."""
    max_field_chars: int = 8000
    """Prompt, response and reference are each cut to this many characters in the judge prompt
    (the middle is replaced by a marker). >= 100."""

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"genrm reference={self.reference!r} (choose {REFERENCE_MODES})")
        if self.verdict_format not in VERDICT_FORMATS:
            raise ValueError(f"genrm verdict_format={self.verdict_format!r} (choose {VERDICT_FORMATS})")
        for name, low in (("votes", 1), ("max_new_tokens", 1), ("max_field_chars", 100)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"genrm {name} must be an integer >= {low}, got {value!r}")
        if not self.temperature >= 0:
            raise ValueError(f"genrm temperature must be >= 0, got {self.temperature!r}")
        if self.votes > 1 and self.temperature == 0:
            raise ValueError(f"genrm votes={self.votes} with temperature 0 repeats one judgement; set temperature > 0")


# -- prompts and targets -----------------------------------------------------------------------

_WITH_REFERENCE = (
    "You are grading a response to a task against the reference answer.\n\n"
    "[Task]\n{prompt}\n\n[Reference answer]\n{reference}\n\n[Response]\n{response}\n\n"
    "Check whether the response's final answer agrees with the reference answer. "
)
_WITHOUT_REFERENCE = (
    "You are grading a response to a task.\n\n"
    "[Task]\n{prompt}\n\n[Response]\n{response}\n\n"
    "Judge whether the response is correct, helpful and complete. "
)
_ASK = {
    "binary": 'Reason briefly, then end with one line: "Verdict: correct" or "Verdict: incorrect".',
    "score": 'Reason briefly, then end with one line: "Score: k/10", k an integer from 0 to 10.',
}


def judge_messages(prompt: str, response: str, reference: str | None, verdict_format: str = "binary",
                   max_field_chars: int = 8000) -> list[dict[str, str]]:
    """The judge's chat prompt (one user turn), with the reference when ``reference`` is not None."""
    if verdict_format not in VERDICT_FORMATS:
        raise ValueError(f"verdict_format={verdict_format!r} (choose {VERDICT_FORMATS})")
    fields = {"prompt": _clip(prompt, max_field_chars), "response": _clip(response, max_field_chars)}
    if reference is None:
        text = _WITHOUT_REFERENCE.format(**fields)
    else:
        text = _WITH_REFERENCE.format(reference=_clip(reference, max_field_chars), **fields)
    return [{"role": "user", "content": text + _ASK[verdict_format]}]


def judgement_text(label: float, verdict_format: str, rationale: str | None = None) -> str:
    """The target judgement for a label in [0, 1] (binary: 0 or 1): optional rationale + verdict line."""
    if verdict_format == "binary":
        verdict = "Verdict: correct" if label == 1 else "Verdict: incorrect"
    else:
        verdict = f"Score: {round(10 * label)}/10"
    return f"{rationale.strip()}\n{verdict}" if rationale and rationale.strip() else verdict


def genrm_training_examples(records: Sequence[Mapping[str, Any]], with_reference: bool,
                            verdict_format: str = "binary", max_field_chars: int = 8000) -> list[dict]:
    """GenRM SFT examples ``{"messages": [user judge prompt, assistant judgement]}``.

    Each record has ``prompt``, ``response`` and ``label`` (binary: 0/1 or a bool; score: a
    number in [0, 1]); with ``with_reference`` also ``reference`` (or ``ground_truth``); an
    optional ``rationale`` is written before the verdict line. A record that does not fit raises
    ValueError naming its index (and ``id`` / ``line`` when present).
    """
    if verdict_format not in VERDICT_FORMATS:
        raise ValueError(f"verdict_format={verdict_format!r} (choose {VERDICT_FORMATS})")
    examples = []
    for index, record in enumerate(records):
        where = _where(index, record)
        for name in ("prompt", "response"):
            if not isinstance(record.get(name), str):
                raise ValueError(f"{where}: field {name!r} must be a string, got {type(record.get(name)).__name__}")
        label = _label(record.get("label"), verdict_format, where)
        reference = None
        if with_reference:
            reference = reference_text(record.get("reference", record.get("ground_truth")))
            if reference is None:
                raise ValueError(f"{where}: with_reference needs a 'reference' or 'ground_truth' answer (string or number)")
        messages = judge_messages(record["prompt"], record["response"], reference, verdict_format, max_field_chars)
        rationale = record.get("rationale")
        messages.append({"role": "assistant", "content": judgement_text(label, verdict_format,
                                                                         rationale if isinstance(rationale, str) else None)})
        examples.append({"messages": messages})
    return examples


def reference_text(ground_truth: Any) -> str | None:
    """A reference answer as text (string, number, or ``{"answer": ...}``); None when there is none."""
    if isinstance(ground_truth, Mapping) and "answer" in ground_truth:
        ground_truth = ground_truth["answer"]
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        return None
    text = str(ground_truth).strip()
    return text or None


# -- parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    reward: float
    """In [0, 1]: 1.0 / 0.0 for a binary verdict, k / d for a score."""
    form: str
    """verdict | score."""
    matched: str
    """The text of the verdict that was read."""


def parse_judgement(text: str) -> Judgement | None:
    """The last readable verdict or score in ``text``; None when there is none (see module doc)."""
    normalized = " ".join(text.lower().translate(_MARKDOWN).split())
    candidates = []
    for match in _VERDICT.finditer(normalized):
        reward = 1.0 if match.group(1) in _POSITIVE else 0.0
        candidates.append((match.start(), Judgement(reward, "verdict", match.group(0))))
    for match in _SCORE.finditer(normalized):
        points = float(match.group("points") or match.group("bare_points"))
        out_of = float(match.group("out_of") or match.group("bare_out_of") or 10)
        if out_of > 0 and 0 <= points <= out_of and math.isfinite(points):
            candidates.append((match.start(), Judgement(points / out_of, "score", match.group(0))))
        else:  # an impossible score ends the judgement unreadably rather than letting an earlier one win
            candidates.append((match.start(), None))
    return max(candidates, key=lambda item: item[0])[1] if candidates else None


# -- the reward source -------------------------------------------------------------------------


class GenRMSource:
    """:class:`~megatron_rlhf.rewards.interface.RewardSource` judging responses with a generative model."""

    name = "genrm"

    def __init__(self, config: GenRMConfig, engine: RolloutEngine | None = None) -> None:
        if engine is None and config.rollout is None:
            raise ValueError("GenRMSource needs an engine, or config.rollout to start one")
        self.config = config
        self._owns_engine = engine is None
        # The judge's weights never change while it scores: its own engine needs no weight transfer.
        if engine is None:
            from megatron_rlhf.rollout.engine import RolloutEngine

            engine = RolloutEngine(replace(config.rollout, weight_transfer_backend=None))
        self.engine = engine

    def close(self) -> None:
        if self._owns_engine and self.engine is not None:
            self.engine.shutdown()
        self.engine = None

    def messages_for(self, sample: RewardSample) -> list[dict[str, str]] | RewardResult:
        """The judge prompt for ``sample``, or an INVALID_INPUT result when a reference is required and missing."""
        reference = None if self.config.reference == "never" else reference_text(sample.ground_truth)
        if reference is None and self.config.reference == "required":
            return RewardResult.infra_error(
                Verdict.INVALID_INPUT, f"sample {sample.sample_id!r}: GenRM reference='required' but the "
                f"ground truth is not a reference answer ({type(sample.ground_truth).__name__})")
        return judge_messages(_valid_text(sample.prompt), _valid_text(sample.response), reference,
                              self.config.verdict_format, self.config.max_field_chars)

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        started = time.monotonic()
        results: list[RewardResult | None] = [None] * len(samples)
        pending: list[tuple[int, list[int]]] = []
        limit = self.engine.config.max_prompt_tokens or (self.engine.config.max_model_len - self.config.max_new_tokens)
        for index, sample in enumerate(samples):
            messages = self.messages_for(sample)
            if isinstance(messages, RewardResult):
                results[index] = messages
                continue
            ids = self.engine.encode_prompts([messages])[0]
            if len(ids) > limit:
                results[index] = RewardResult.infra_error(
                    Verdict.SCORER_ERROR, f"judge prompt of {len(ids)} tokens is over the engine's limit of {limit}")
            else:
                pending.append((index, ids))
        judgements = self._generate(pending, results)
        for index, texts in judgements.items():
            results[index] = self._result(texts)
        elapsed = (time.monotonic() - started) / max(len(samples), 1)
        return [RewardResult(r.reward, r.status, r.verdict, r.detail, elapsed, r.step_rewards) for r in results]

    def _generate(self, pending: list[tuple[int, list[int]]],
                  results: list[RewardResult | None]) -> dict[int, list[str]]:
        if not pending:
            return {}
        settings = SamplingSettings(n=self.config.votes, temperature=self.config.temperature,
                                    max_new_tokens=self.config.max_new_tokens, seed=self.config.seed)
        try:
            batch = self.engine.generate([ids for _, ids in pending], settings)
        except Exception as error:  # noqa: BLE001 - the judge failed: every pending sample is a scorer error
            for index, _ in pending:
                results[index] = RewardResult.infra_error(Verdict.SCORER_ERROR, f"GenRM engine: {type(error).__name__}: {error}")
            return {}
        texts: dict[int, list[str]] = {index: [] for index, _ in pending}
        lengths = batch.response_lengths.tolist()
        for row, request in enumerate(batch.prompt_index.tolist()):
            token_ids = batch.response_ids[row, : lengths[row]].tolist()
            texts[pending[request][0]].append(self.engine.tokenizer.decode(token_ids, skip_special_tokens=True))
        for index, judged in list(texts.items()):
            if not judged:  # not admitted by the engine (cannot happen after the length check)
                results[index] = RewardResult.infra_error(Verdict.SCORER_ERROR, "the engine returned no judgement")
                del texts[index]
        return texts

    def _result(self, texts: list[str]) -> RewardResult:
        parsed = [parse_judgement(text) for text in texts]
        readable = [judgement for judgement in parsed if judgement is not None]
        if not readable:
            tail = texts[-1][-200:] if texts else ""
            return RewardResult.infra_error(
                Verdict.UNPARSEABLE_JUDGEMENT, f"no verdict in {len(texts)} judgement(s); last ends {tail!r}")
        reward = sum(judgement.reward for judgement in readable) / len(readable)
        detail = f"{len(readable)}/{len(texts)} readable; last {readable[-1].matched!r}"
        if len(texts) == 1 and readable[0].form == "verdict":
            if reward == 1.0:
                return RewardResult.correct(detail)
            return RewardResult.incorrect(Verdict.WRONG_ANSWER, detail)
        return RewardResult(reward, RewardStatus.SCORED, Verdict.OK, detail)


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    keep = max_chars // 2
    return f"{text[:keep]}\n[... {len(text) - 2 * keep} characters omitted ...]\n{text[-keep:]}"


def _valid_text(text: str) -> str:
    """Lone surrogates (undecodable bytes of a response) replaced, so the tokenizer accepts the text."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _label(value: Any, verdict_format: str, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: 'label' must be a number, got {value!r}")
    if verdict_format == "binary" and value not in (0, 1):
        raise ValueError(f"{where}: a binary GenRM label must be 0 or 1, got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"{where}: a score GenRM label must be in [0, 1], got {value!r}")
    return float(value)


def _where(index: int, record: Mapping[str, Any]) -> str:
    parts = [f"record {index}"]
    for key in ("id", "line"):
        if key in record:
            parts.append(f"{key}={record[key]!r}")
    return " ".join(parts)

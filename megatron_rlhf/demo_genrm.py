"""`megatron-rlhf demo --with-genrm`: the GenRM of the ByteDance Seed study in the demo's RL stage.

With ``--with-genrm`` the demo trains a generative judge and gives the RL stage the study's full
hybrid reward: the verifiers for math and code, and for general chat the GenRM judging each
response against a reference chosen by the Bradley-Terry reward model's Best-of-N, next to that
reward model's own score. Two stages are added (see :mod:`megatron_rlhf.demo`):

- ``genrm``: :func:`judge_records` turns the demo's labelled data into the judge's records, each
  with a reference answer: a math/code task's right solution is the reference for its right
  (label 1) and its wrong (label 0) solution; a chat preference pair's chosen response is the
  reference for itself (1) and for the rejected one (0). The judge is the SFT policy fine-tuned on
  them by :func:`~megatron_rlhf.trainer.genrm.run_genrm`, the body of `train-genrm`;
- ``bon_reference``: the reward model's Best-of-N answer becomes each general RL prompt's
  ``ground_truth`` (:func:`bon_reference_rows`, the selection rule of
  :func:`~megatron_rlhf.evaluation.bon_reference.pick_references`). The N answers are those the
  ``pre_ppo`` stage already sampled from the SFT policy and scored with the reward model (Pre-PPO
  selection needs exactly that: ``pre_ppo_samples`` per prompt), so the references cost no
  second engine and no second scoring pass; the RL stage trains on the file written here.

The RL stage then routes ``general`` to ``{genrm: genrm_weight, reward_model: genrm_rm_weight}``
(``reference: required``: a general prompt without a reference is an infra error, never judged
against nothing); each source's raw reward mean and sample count per step are logged as
``source/<name>/mean|count`` and summed up in the report (:func:`source_contributions`).

Guarantees: :func:`judge_records` is pure and deterministic (the input order); the stages call the
library's own jobs, so what the demo runs is what `train-genrm` and `train-rl` run. Not
guaranteed: that the toy judge's verdicts are right; a judgement without a readable verdict is an
infra error of the GenRM source (counted, and the run stops above the router's rate).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

JUDGE_MAX_TOKENS = 448
"""Tokens kept per judge conversation (prompt + reference + response + verdict) in training."""
JUDGE_MAX_MODEL_LEN = 512
"""The judge engine's context: the demo model's position embeddings."""


def judge_records(labelled: Iterable[Mapping[str, Any]], preferences: Iterable[Mapping[str, Any]]) -> list[dict]:
    """GenRM training records ``{prompt, reference, response, label, domain}`` (module docstring).

    ``labelled``: rows ``{prompt, response, label, domain}`` (a task's right solution has label 1);
    a prompt without a right solution gives no record. ``preferences``: rows ``{prompt, chosen,
    rejected}``. Raises ValueError naming the row when a field is missing.
    """
    rows = list(labelled)
    right: dict[str, str] = {}
    for index, row in enumerate(rows):
        _require(row, ("prompt", "response", "label"), f"labelled row {index}")
        if row["label"] == 1:
            right.setdefault(row["prompt"], row["response"])
    records = [
        {"prompt": row["prompt"], "reference": right[row["prompt"]], "response": row["response"],
         "label": int(row["label"]), "domain": row.get("domain", "reasoning")}
        for row in rows if row["prompt"] in right
    ]
    for index, pair in enumerate(preferences):
        _require(pair, ("prompt", "chosen", "rejected"), f"preference row {index}")
        for response, label in ((pair["chosen"], 1), (pair["rejected"], 0)):
            records.append({"prompt": pair["prompt"], "reference": pair["chosen"], "response": response,
                            "label": label, "domain": pair.get("domain", "general")})
    return records


def cap_per_domain(records: Iterable[Mapping[str, Any]], per_domain: int) -> list[dict]:
    """The first ``per_domain`` records of each ``domain`` (input order kept); 0: all of them."""
    kept, counts = [], {}
    for record in records:
        counts[record["domain"]] = counts.get(record["domain"], 0) + 1
        if not per_domain or counts[record["domain"]] <= per_domain:
            kept.append(dict(record))
    return kept


def bon_reference_rows(records: Iterable[Any], samples: Iterable[Mapping[str, Any]],
                       domains: tuple[str, ...] = ("general",)) -> list[dict[str, Any]]:
    """Prompt rows of ``records`` (PromptRecords) whose ``ground_truth``, for the prompts of
    ``domains``, is the best-scored of the prompt's sampled answers.

    ``samples``: rows ``{id, responses, scores}``; an answer the reward model could not score
    (score None) or that is blank never wins (a blank reference is no reference). Ties go to the first answer; a prompt of ``domains`` with
    no row or no scored answer gets no reference (a ``required`` GenRM then reports an error).
    Other prompts keep their row unchanged.
    """
    from megatron_rlhf.evaluation.bon_reference import pick_references

    by_id = {row["id"]: row for row in samples}
    rows = []
    for record in records:
        row = record.to_row()
        if record.domain in domains:
            row.pop("ground_truth", None)
            sampled = by_id.get(record.id, {"responses": [], "scores": []})
            scores = [math.nan if value is None or not text.strip() else float(value)
                      for text, value in zip(sampled["responses"], sampled["scores"])]
            picked = pick_references([sampled["responses"]], [scores])[0]
            if picked is not None:
                row["ground_truth"] = picked
        rows.append(row)
    return rows


def _require(row: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [name for name in fields if name not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def _read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- stage: genrm ---------------------------------------------------------------------------------


def stage_genrm(config, out: Path, results: dict) -> dict[str, Any]:
    """Train the judge from the SFT policy on :func:`judge_records` of the demo's data."""
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.data.jsonl import write_jsonl
    from megatron_rlhf.trainer.genrm import GenRMDataConfig, run_genrm
    from megatron_rlhf.trainer.sft import SFTConfig
    from megatron_rlhf.trainer.sft_run import SFTRunConfig

    prepared = results["prepare"]
    records = judge_records(_read_rows(prepared["reasoning_labelled"]), _read_rows(prepared["preference_train"]))
    validation = judge_records([], _read_rows(prepared["preference_eval"]))
    records = cap_per_domain(records, config.genrm_records_per_domain)
    data_dir = out / "data"
    write_jsonl(data_dir / "genrm_train.jsonl", records)
    write_jsonl(data_dir / "genrm_eval.jsonl", validation[:64])
    judge_dir = out / "genrm"
    optimizer = OptimizerSettings(lr=config.sft_lr, min_lr=config.sft_lr / 10, lr_warmup_steps=5,
                                  lr_decay_style="cosine", clip_grad=1.0)
    sft = SFTConfig(epochs=config.genrm_epochs, global_batch_size=config.genrm_batch_size,
                    micro_batch_size=config.genrm_batch_size, max_length=JUDGE_MAX_TOKENS, seed=config.seed + 5,
                    log_interval=25, progress_bar=False)
    report = run_genrm(SFTRunConfig(hf_dir=results["sft"]["policy"], train_path=str(data_dir / "genrm_train.jsonl"),
                                    validation_path=str(data_dir / "genrm_eval.jsonl"), out_dir=str(judge_dir),
                                    sft=sft, optimizer=optimizer, save_checkpoint=False, overwrite=True),
                       GenRMDataConfig(with_reference=True, verdict_format="binary"))
    return {"judge": str(judge_dir / "hf"), "records": len(records), "steps": len(report.steps),
            "truncated": report.num_truncated,
            "initial_validation_loss": report.initial_validation_loss,
            "final_validation_loss": report.final_validation_loss}


# --- stage: bon_reference ---------------------------------------------------------------------------


def stage_bon_reference(config, out: Path, results: dict) -> dict[str, Any]:
    """The RL prompt set with the reward model's Best-of-N answer as each general prompt's reference."""
    from megatron_rlhf.data.jsonl import write_jsonl
    from megatron_rlhf.data.prompts import load_prompt_dataset

    records, _ = load_prompt_dataset(results["pre_ppo"]["prompts"])
    rows = bon_reference_rows(records, _read_rows(results["pre_ppo"]["samples"]))
    path = out / "data" / "prompts_rl_bon.jsonl"
    write_jsonl(path, rows)
    general = [row for row in rows if row["domain"] == "general"]
    return {"prompts": str(path), "n": config.pre_ppo_samples, "general_prompts": len(general),
            "with_reference": sum(isinstance(row.get("ground_truth"), str) for row in general)}


# --- the RL stage's reward and the report -------------------------------------------------------------


def hybrid_reward(config, results: dict) -> dict[str, Any]:
    """The RL stage's reward YAML (as a mapping): verifiers, GenRM + BT RM for general chat."""
    rm = {"kind": "reward_model", "ckpt_dir": results["reward_model"]["checkpoint"]}
    sources: dict[str, Any] = {"math": {"kind": "math_verifier"}, "code": {"kind": "code_verifier"}, "reward_model": rm}
    general: dict[str, Any] = {"sources": {"reward_model": 1.0}, "normalization": "batch_zscore"}
    if config.with_genrm:
        sources["genrm"] = {"kind": "genrm", "reference": "required", "verdict_format": "binary",
                            "max_new_tokens": config.genrm_max_new_tokens, "seed": config.seed + 7,
                            "rollout": {"model_dir": results["genrm"]["judge"], "max_model_len": JUDGE_MAX_MODEL_LEN,
                                        "seed": config.seed + 7}}
        general["sources"] = {"genrm": config.genrm_weight, "reward_model": config.genrm_rm_weight}
    return {"sources": sources, "domains": {"math": {"sources": {"math": 1.0}}, "code": {"sources": {"code": 1.0}},
                                            "general": general}}


def source_contributions(metrics: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per reward source over a run's logged steps: samples scored (sum of ``source/<name>/count``)
    and their mean raw reward (count-weighted mean of ``source/<name>/mean``)."""
    totals: dict[str, list[float]] = {}
    for row in metrics:
        for key, count in row.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "source" and parts[2] == "count":
                mean = row.get(f"source/{parts[1]}/mean")
                if isinstance(mean, (int, float)) and math.isfinite(mean):
                    total = totals.setdefault(parts[1], [0.0, 0.0])
                    total[0] += float(count)
                    total[1] += float(count) * float(mean)
    return {name: {"samples": int(count), "mean_reward": total / count if count else 0.0}
            for name, (count, total) in sorted(totals.items())}


def contributions_markdown(contributions: Mapping[str, Mapping[str, float]]) -> str:
    """The report's "Reward sources" section."""
    lines = ["", "## Reward sources (RL)", "",
             "Raw reward of each source of the hybrid reward, over every RL sample it scored.", "",
             "| source | samples scored | mean raw reward |", "|---|---:|---:|"]
    lines += [f"| {name} | {values['samples']} | {values['mean_reward']:.3f} |" for name, values in contributions.items()]
    return "\n".join(lines) + "\n"

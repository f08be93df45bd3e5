"""Reusable pre-flight checks (see the package docstring); each raises a UserError naming its place.

All imports of the checked layers are local to the functions, so importing this module is free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from megatron_rlhf.config.errors import ConfigError, MissingInput, OutputInTheWay, UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_hf_model_dir(path: Any, where: str, need_tokenizer: bool = True) -> dict[str, Any]:
    """The parsed ``config.json`` of the Hugging Face model directory ``path`` (``where`` names
    the key or option that gave it); UserError if it is missing, unreadable, of an unsupported
    architecture or ill-typed, or (``need_tokenizer``) has no tokenizer."""
    from megatron_rlhf.models.arch import arch_spec_from_hf_config, load_hf_config

    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: expected a Hugging Face model directory, got {path!r}")
    directory = Path(path)
    if not directory.is_dir():
        raise MissingInput(f"{where}: {path} is not a directory (expected a Hugging Face model directory)")
    try:
        hf_config = load_hf_config(directory)
    except (OSError, ValueError) as error:
        raise UserError(f"{where}: {error}") from None
    arch_spec_from_hf_config(hf_config, source=str(directory / "config.json"))
    if need_tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise MissingInput(f"{where}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return hf_config


def model_length_limit(hf_config: dict[str, Any]) -> int | None:
    """Longest sequence (prompt + response tokens) the model supports, or None if it says nothing."""
    value = hf_config.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_length_fits(hf_config: dict[str, Any], model_dir: str, requested: int, where: str) -> None:
    """UserError if ``requested`` tokens (named by ``where``) exceed the model's position limit."""
    limit = model_length_limit(hf_config)
    if limit is not None and requested > limit:
        raise UserError(f"{where} = {requested} tokens is more than {model_dir} supports "
                        f"(max_position_embeddings = {limit} in {Path(model_dir) / 'config.json'})")


def check_prompt_files(files: Sequence[Any], where: str, router: Any | None = None,
                       reward_where: str = "the default reward config") -> dict[str, int]:
    """Parse every prompt file strictly (the first malformed line stops, naming ``file:line``) and,
    given a ``RouterConfig``, check that every prompt's domain has a reward route. Returns the
    number of prompts per domain."""
    from megatron_rlhf.data.jsonl import DatasetError
    from megatron_rlhf.data.prompts import read_prompt_lines

    if isinstance(files, (str, bytes)) or not isinstance(files, (list, tuple)) or not files:
        raise ConfigError(f"{where}: expected a non-empty list of prompt JSONL files, got {files!r}")
    domains: dict[str, int] = {}
    for index, path in enumerate(files):
        if not isinstance(path, str) or not Path(path).is_file():
            raise MissingInput(f"{where}[{index}]: prompt file {path!r} not found")
        try:
            records = read_prompt_lines(path)
        except DatasetError as error:
            raise UserError(f"{where}[{index}]: {error}") from None
        if not records:
            raise UserError(f"{where}[{index}]: {path} holds no prompt (the file is empty)")
        for record in records:
            if router is not None and record.domain not in router.domains and router.fallback_domain is None:
                raise UserError(
                    f"{record.source}: prompt domain {record.domain!r} has no reward route in {reward_where} "
                    f"(routed domains: {', '.join(sorted(router.domains))}; or set fallback_domain)"
                )
            domains[record.domain] = domains.get(record.domain, 0) + 1
    return domains


def check_reward_config(path: str | None, where: str) -> Any:
    """Load the reward YAML at ``path`` (None: the default verifiers) and check its scorers
    (:func:`check_reward_scorers`). Returns the RewardConfig."""
    from megatron_rlhf.rewards.reward_config import default_reward_config, load_reward_config

    if path is None:
        return default_reward_config()
    if not isinstance(path, str) or not Path(path).is_file():
        raise MissingInput(f"{where}: reward config {path!r} not found")
    config = load_reward_config(path)
    check_reward_scorers(config)
    return config


def check_reward_scorers(config: Any) -> None:
    """Each scorer of the parsed RewardConfig ``config`` is what it claims to be: a
    ``reward_model`` source's directory is a train-rm checkpoint, a ``genrm`` source's judge is a
    Hugging Face model. Errors name the reward file (``config.origin``) and the key path."""
    from megatron_rlhf.rewards.reward_model_source import check_reward_model_checkpoint

    origin = config.origin or "the reward config"
    for name, spec in config.sources.items():
        here = f"{origin}: sources.{name}"
        if spec.kind == "reward_model":
            check_reward_model_checkpoint(spec.config.ckpt_dir, f"{here}.ckpt_dir")
        elif spec.kind == "genrm" and spec.config.rollout is not None:
            check_hf_model_dir(spec.config.rollout.model_dir, f"{here}.rollout.model_dir")


def check_output_file(output: str, inputs: Sequence[str], where: str) -> None:
    """UserError unless ``output`` can be written without touching an input: it is not one of
    ``inputs`` (same file, also through links), not a directory, and its directory exists."""
    path = Path(output)
    for item in inputs:
        if path.exists() and Path(item).exists() and path.resolve() == Path(item).resolve():
            raise OutputInTheWay(f"{where} {output} is the input {item}: it would be overwritten; "
                                 "choose another output file")
    if path.is_dir():
        raise OutputInTheWay(f"{where} {output} is a directory (expected a file path)")
    if not path.parent.is_dir():
        raise MissingInput(f"{where} {output}: the directory {path.parent} does not exist")


def check_output_dir(output: str, where: str) -> None:
    """UserError if the output directory ``output`` is a file or cannot be created (its nearest
    existing ancestor is not a directory); creates nothing."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OutputInTheWay(f"{where}: {output} exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputInTheWay(f"{where}: {output} cannot be created ({ancestor} is not a directory)")

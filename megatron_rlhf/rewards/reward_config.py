"""Reward configuration: source kinds, the router's YAML file, and building both.

YAML layout (every key optional except ``domains``'s sources; unknown keys are errors)::

    infra_errors: {max_rate: 0.05, window: 1000, min_samples: 20}
    sources:                      # name -> {kind: <registered kind>, ...that kind's config fields}
      math: {kind: math_verifier, time_limit_seconds: 10, sandbox: {max_concurrency: 2}}
      code: {kind: code_verifier, limits: {wall_seconds: 10, memory_bytes: 536870912}}
      choice: {kind: multiple_choice}
      ifeval: {kind: instruction_following, partial_credit: false}
    domains:                      # domain tag -> route
      math: {sources: {math: 1.0}, normalization: none, clip: [-1.0, 1.0]}
      code: {sources: {code: 1.0}}
    fallback_domain: null

Kinds shipped: ``math_verifier``, ``code_verifier``, ``multiple_choice``, ``instruction_following``.
The learned sources register theirs with :func:`register_source_kind` (a config dataclass and a
factory) and are then configured the same way. Errors name the file and the key path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

from megatron_rlhf.rewards.interface import InfraErrorPolicy, RewardSource
from megatron_rlhf.rewards.router import DomainRoute, RouterConfig
from megatron_rlhf.rewards.verifiers.code_verifier import CodeVerifier, CodeVerifierConfig
from megatron_rlhf.rewards.verifiers.instruction_following import (
    InstructionFollowingConfig,
    InstructionFollowingVerifier,
)
from megatron_rlhf.rewards.verifiers.math_verifier import MathVerifier, MathVerifierConfig
from megatron_rlhf.rewards.verifiers.multiple_choice import MultipleChoiceConfig, MultipleChoiceVerifier

SourceFactory = Callable[[Any], RewardSource]
SOURCE_KINDS: dict[str, tuple[type, SourceFactory]] = {
    "math_verifier": (MathVerifierConfig, MathVerifier),
    "code_verifier": (CodeVerifierConfig, CodeVerifier),
    "multiple_choice": (MultipleChoiceConfig, MultipleChoiceVerifier),
    "instruction_following": (InstructionFollowingConfig, InstructionFollowingVerifier),
}


def register_source_kind(kind: str, config_class: type, factory: SourceFactory) -> None:
    """Make ``kind`` usable in reward configs (how RM / PRM / GenRM sources plug in)."""
    if kind in SOURCE_KINDS:
        raise ValueError(f"reward source kind {kind!r} is already registered")
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config_class of {kind!r} must be a dataclass")
    SOURCE_KINDS[kind] = (config_class, factory)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    config: Any
    """An instance of the kind's config dataclass."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    router: RouterConfig
    sources: Mapping[str, SourceSpec]


def default_reward_config() -> RewardConfig:
    """One verifier per verifiable domain, weight 1, no normalisation (what `score` uses by default)."""
    sources = {
        "math": SourceSpec("math_verifier", MathVerifierConfig()),
        "code": SourceSpec("code_verifier", CodeVerifierConfig()),
        "multiple_choice": SourceSpec("multiple_choice", MultipleChoiceConfig()),
        "instruction_following": SourceSpec("instruction_following", InstructionFollowingConfig()),
    }
    domains = {name: DomainRoute(sources={name: 1.0}) for name in sources}
    return RewardConfig(RouterConfig(domains=domains), sources)


def reward_config_from_mapping(data: Any, where: str) -> RewardConfig:
    """Validate a parsed YAML document; ValueError naming ``where`` and the key path."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: the reward config must be a mapping, got {type(data).__name__}")
    _reject_unknown(data, {"infra_errors", "sources", "domains", "fallback_domain"}, where)
    sources_data = data.get("sources", {})
    if not isinstance(sources_data, dict):
        raise ValueError(f"{where}: 'sources' must be a mapping of name -> {{kind: ..., ...}}")
    sources = {}
    for name, spec in sources_data.items():
        at = f"{where}: sources.{name}"
        if not isinstance(spec, dict) or spec.get("kind") not in SOURCE_KINDS:
            kind = spec.get("kind") if isinstance(spec, dict) else spec
            raise ValueError(f"{at}.kind: unknown reward source kind {kind!r}; known: {', '.join(SOURCE_KINDS)}")
        config_class, _ = SOURCE_KINDS[spec["kind"]]
        fields = {key: value for key, value in spec.items() if key != "kind"}
        sources[name] = SourceSpec(spec["kind"], dataclass_from_mapping(config_class, fields, at))
    domains_data = data.get("domains")
    if not isinstance(domains_data, dict) or not domains_data:
        raise ValueError(f"{where}: 'domains' must map each domain tag to {{sources: {{name: weight}}, ...}}")
    domains = {
        domain: dataclass_from_mapping(DomainRoute, route, f"{where}: domains.{domain}")
        for domain, route in domains_data.items()
    }
    infra = dataclass_from_mapping(InfraErrorPolicy, data.get("infra_errors", {}), f"{where}: infra_errors")
    try:
        router = RouterConfig(domains=domains, infra_errors=infra, fallback_domain=data.get("fallback_domain"))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    for domain, route in domains.items():
        missing = [name for name in route.sources if name not in sources]
        if missing:
            raise ValueError(f"{where}: domains.{domain}.sources names undefined source(s) {missing}; defined: {sorted(sources)}")
    return RewardConfig(router, sources)


def load_reward_config(path: str | Path) -> RewardConfig:
    """Read a reward config YAML file (the entry points call this)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    return reward_config_from_mapping(data, str(path))


def build_sources(config: RewardConfig, only: set[str] | None = None) -> dict[str, RewardSource]:
    """Instantiate the configured sources (all, or those named in ``only``); on failure the ones
    already built are closed."""
    built: dict[str, RewardSource] = {}
    try:
        for name, spec in config.sources.items():
            if only is not None and name not in only:
                continue
            built[name] = SOURCE_KINDS[spec.kind][1](spec.config)
    except BaseException:
        for source in built.values():
            source.close()
        raise
    return built


def dataclass_from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping: nested dataclasses, tuples from lists, exact keys."""
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(data, names, where)
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return dataclass_from_mapping(option, value, where)
        if typing.get_origin(option) is tuple and isinstance(value, list):
            return tuple(value)
    return value


def _reject_unknown(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")

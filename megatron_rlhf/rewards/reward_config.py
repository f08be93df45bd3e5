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

Kinds (one registry, :data:`SOURCE_KINDS`, read by every command that takes a reward YAML):
``math_verifier``, ``code_verifier``, ``multiple_choice``, ``instruction_following``, ``genrm``
(a judge model on its own vLLM engine) and ``reward_model`` (a ``train-rm`` checkpoint; ``train-rl``
serves it from a worker group, ``score`` and ``label-steps`` from local processes). A kind's config
class and factory are named as ``module:attribute`` and imported on first use (a YAML without
``genrm`` sources never imports torch or vLLM). Errors name the file and the key path; fields are typed strictly
(:mod:`megatron_rlhf.config.typed_load`). More kinds plug in with :func:`register_source_kind`.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Mapping

from megatron_rlhf.config.errors import ConfigError, MissingInput
from megatron_rlhf.config.typed_load import at, dataclass_from_mapping
from megatron_rlhf.rewards.interface import InfraErrorPolicy, RewardSource
from megatron_rlhf.rewards.router import DomainRoute, RouterConfig

SourceFactory = Callable[[Any], RewardSource]


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One registered kind: its config dataclass and the factory building a source from it."""

    config: type | str
    """The config dataclass, or ``"module:Class"`` imported on first use."""
    factory: SourceFactory | str
    """``factory(config) -> RewardSource`` in this process, or ``"module:function"``."""

    def config_class(self) -> type:
        return _resolve(self.config)

    def build(self, config: Any) -> RewardSource:
        return _resolve(self.factory)(config)


def _resolve(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_VERIFIERS = "megatron_rlhf.rewards.verifiers."
SOURCE_KINDS: dict[str, SourceKind] = {
    "math_verifier": SourceKind(_VERIFIERS + "math_verifier:MathVerifierConfig", _VERIFIERS + "math_verifier:MathVerifier"),
    "code_verifier": SourceKind(_VERIFIERS + "code_verifier:CodeVerifierConfig", _VERIFIERS + "code_verifier:CodeVerifier"),
    "multiple_choice": SourceKind(_VERIFIERS + "multiple_choice:MultipleChoiceConfig",
                                  _VERIFIERS + "multiple_choice:MultipleChoiceVerifier"),
    "instruction_following": SourceKind(_VERIFIERS + "instruction_following:InstructionFollowingConfig",
                                        _VERIFIERS + "instruction_following:InstructionFollowingVerifier"),
    "genrm": SourceKind("megatron_rlhf.rewards.genrm:GenRMConfig", "megatron_rlhf.rewards.genrm:GenRMSource"),
    "reward_model": SourceKind("megatron_rlhf.rewards.reward_model_source:RewardModelSourceConfig",
                               "megatron_rlhf.rewards.reward_model_source:SpawnedRewardModelSource"),
}


def register_source_kind(kind: str, config_class: type | str, factory: SourceFactory | str) -> None:
    """Make ``kind`` usable in reward configs (a config dataclass and a factory, or their
    ``module:attribute`` names)."""
    if kind in SOURCE_KINDS:
        raise ValueError(f"reward source kind {kind!r} is already registered")
    if not isinstance(config_class, str) and not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config_class of {kind!r} must be a dataclass")
    SOURCE_KINDS[kind] = SourceKind(config_class, factory)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    config: Any
    """An instance of the kind's config dataclass."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """A parsed, validated reward configuration: what ``train-rl``, ``score`` and ``label-steps``
    build their sources and router from (parsing happens once, at the entry point)."""

    router: RouterConfig
    sources: Mapping[str, SourceSpec]
    origin: str | None = None
    """The YAML file it was read from, as given (messages name it); None: built in code."""


def default_reward_config() -> RewardConfig:
    """One verifier per verifiable domain, weight 1, no normalisation (what `score` uses by default)."""
    kinds = {"math": "math_verifier", "code": "code_verifier", "multiple_choice": "multiple_choice",
             "instruction_following": "instruction_following"}
    sources = {name: SourceSpec(kind, SOURCE_KINDS[kind].config_class()()) for name, kind in kinds.items()}
    domains = {name: DomainRoute(sources={name: 1.0}) for name in sources}
    return RewardConfig(RouterConfig(domains=domains), sources)


def reward_config_from_mapping(data: Any, where: str, origin: str | None = None) -> RewardConfig:
    """Validate a parsed YAML document; ConfigError naming ``where`` and the key path. ``origin``:
    the file the document came from (kept in :attr:`RewardConfig.origin`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the reward config must be a mapping, got {type(data).__name__}")
    _reject_unknown(data, {"infra_errors", "sources", "domains", "fallback_domain"}, where)
    sources_data = data.get("sources", {})
    if not isinstance(sources_data, dict):
        raise ConfigError(f"{where}: sources: must be a mapping of name -> {{kind: ..., ...}}")
    sources = {}
    for name, spec in sources_data.items():
        here = at(where, f"sources.{name}")
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        if not isinstance(kind, str) or kind not in SOURCE_KINDS:
            raise ConfigError(f"{here}.kind: unknown reward source kind {kind!r}; known: {', '.join(SOURCE_KINDS)}")
        fields = {key: value for key, value in spec.items() if key != "kind"}
        sources[name] = SourceSpec(kind, dataclass_from_mapping(SOURCE_KINDS[kind].config_class(), fields, here))
    domains_data = data.get("domains")
    if not isinstance(domains_data, dict) or not domains_data:
        raise ConfigError(f"{where}: domains: must map each domain tag to {{sources: {{name: weight}}, ...}}")
    domains = {
        domain: dataclass_from_mapping(DomainRoute, route, at(where, f"domains.{domain}"))
        for domain, route in domains_data.items()
    }
    infra = dataclass_from_mapping(InfraErrorPolicy, data.get("infra_errors", {}), at(where, "infra_errors"))
    fallback = data.get("fallback_domain")
    if fallback is not None and not isinstance(fallback, str):
        raise ConfigError(f"{where}: fallback_domain: expected a domain name or null, got {fallback!r}")
    try:
        router = RouterConfig(domains=domains, infra_errors=infra, fallback_domain=fallback)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
    for domain, route in domains.items():
        missing = [name for name in route.sources if name not in sources]
        if missing:
            raise ConfigError(f"{where}: domains.{domain}.sources names undefined source(s) {missing}; "
                              f"defined: {sorted(sources)}")
    return RewardConfig(router, sources, origin)


def load_reward_config(path: str | Path, where: str | None = None) -> RewardConfig:
    """Read a reward config YAML file (the entry points call this, once per run). ``path`` is
    used as given (a relative path is relative to the working directory); ``where`` names the
    setting that gave the path (``run.yaml: reward_config``) in the error for a missing file."""
    import yaml

    given = str(path)
    path = Path(path)
    if not path.is_file():
        if where is not None:
            raise MissingInput(f"{where}: reward config {given!r} not found")
        raise MissingInput(f"reward config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return reward_config_from_mapping(data, given, origin=given)


def build_sources(config: RewardConfig, only: set[str] | None = None) -> dict[str, RewardSource]:
    """Instantiate the configured sources (all, or those named in ``only``); on failure the ones
    already built are closed."""
    built: dict[str, RewardSource] = {}
    try:
        for name, spec in config.sources.items():
            if only is not None and name not in only:
                continue
            built[name] = SOURCE_KINDS[spec.kind].build(spec.config)
    except BaseException:
        for source in built.values():
            source.close()
        raise
    return built


def _reject_unknown(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")

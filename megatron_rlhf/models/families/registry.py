"""The list of model families, and lookups by HF ``model_type`` and by family name.

Adding an architecture: write its module in this package (a :class:`ModelFamily` named
``FAMILY``, see :mod:`megatron_rlhf.models.families.family`) and list the module in the import
line and in ``FAMILIES`` below. Nothing else in the package names a family.
"""

from __future__ import annotations

from megatron_rlhf.models.arch_spec import UnsupportedArchitecture
from megatron_rlhf.models.families import glm, glm4, llama, mixtral, qwen2, qwen3, qwen3_moe
from megatron_rlhf.models.families.family import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = tuple(
    module.FAMILY for module in (llama, qwen2, qwen3, glm, glm4, qwen3_moe, mixtral)
)
"""Every supported family, in the order error messages and tests list them."""

_BY_NAME = {family.name: family for family in FAMILIES}
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)
"""Every HF ``model_type`` some family reads."""


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (``ArchSpec.family``); raises UnsupportedArchitecture."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no model family {name!r} (have: {', '.join(_BY_NAME)})"
        ) from None


def family_for_model_type(model_type: object, where: str) -> ModelFamily:
    """The family that reads HF ``model_type``; raises UnsupportedArchitecture naming ``where``."""
    family = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        supported = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UnsupportedArchitecture(
            f"{where}: model_type={model_type!r} is not supported (supported: {supported})"
        )
    return family

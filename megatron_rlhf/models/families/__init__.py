"""One module per model family: everything the package knows about an architecture, in one place.

Each module (``llama``, ``qwen2``, ``qwen3``, ``glm``, ``glm4``, ``qwen3_moe``, ``mixtral``)
defines ``FAMILY``, a :class:`~megatron_rlhf.models.families.family.ModelFamily`: its HF
``model_type`` values and default class name, transformers' defaults for fields a config may
omit, the features it refuses, the ArchSpec features it switches on, its HF <-> Megatron weight
rules and the fields of its tiny test model. ``registry`` lists the families;
``weight_rules`` holds the rule type and the building blocks the families compose.

Readers: :mod:`megatron_rlhf.models.arch` (config -> ArchSpec), :mod:`megatron_rlhf.mapping`
(weight conversion and sync) and :mod:`megatron_rlhf.models.tiny` (test models). The package is
pure Python (no torch, no transformers).
"""

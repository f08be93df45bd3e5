"""HF <-> Megatron weight mappings: the engine and tensor transforms over each family's rules.

The rules themselves (one declarative list per architecture, one truth for names) live with their
family in :mod:`megatron_rlhf.models.families`. Used by the checkpoint converters
(``checkpoints_tools/``) and by weight sync into vLLM.
"""

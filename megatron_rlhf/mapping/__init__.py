"""HF <-> Megatron weight mappings: one module per architecture, one truth for names.

Used by the checkpoint converters (``checkpoints_tools/``) and by weight sync into vLLM.
"""

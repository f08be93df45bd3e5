"""Unit tests of :mod:`megatron_rlhf.algorithms`: CPU only, one process, no Megatron, ~5 s.

``references.py`` holds independent list-based reference formulas; ``batches.py`` builds seeded
random (edge) batches. Run with ``python -m pytest tests/unit/algorithms -q``.
"""

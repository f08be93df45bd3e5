"""Rollouts with vLLM and weight sync from Megatron into vLLM. Imports vLLM only when used."""

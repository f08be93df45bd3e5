"""Thin Ray actors that hold a Megatron model shard or a vLLM engine and call library functions."""

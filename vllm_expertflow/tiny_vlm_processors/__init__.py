"""Processors the tiny vision-language checkpoints ship as local remote code (``trust_remote_code``).

Some released VLMs (Kimi-VL) keep their processor on the hub, not in transformers; these are
small re-implementations of what vLLM calls, copied into the tiny checkpoint by
``vllm_expertflow.tiny_models``. They are not imported from here.
"""

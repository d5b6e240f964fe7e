"""Everything that touches vLLM lives in this package.

Every private vLLM API the plugin relies on is imported or patched in ``vllm_api.py``;
a vLLM upgrade should be a diff of that one file. The other modules here use only what
it exports plus vLLM's public surface (``vllm.logger``, ``LLM``).
"""

"""Accuracy evaluation: VQAv2 (official soft accuracy) and MMBench (CircularEval).

Pure Python + pandas/pyarrow/PIL; no vLLM import, so scoring and data conversion run
without an engine. ``vqav2`` and ``mmbench`` each hold the metric, loaders for the
published file schemas, and a converter that writes the easy-vqa package's data in
those schemas (the real sets cannot be downloaded here).
"""

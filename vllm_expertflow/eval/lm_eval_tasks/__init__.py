"""lm-eval task configs (``--include_path vllm_expertflow/eval/lm_eval_tasks``); see ``utils.py`` and README.md."""

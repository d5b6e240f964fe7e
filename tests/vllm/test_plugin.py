"""The plugin entry point: idempotent, installed through vLLM's plugin group, flags carried into additional_config."""

from __future__ import annotations

import importlib.metadata

import pytest


def test_entry_point_is_installed_in_vllms_plugin_group():
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("expertflow") == "vllm_expertflow:register"


def test_register_is_idempotent_and_cli_flags_reach_additional_config():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_expertflow

    vllm_expertflow.register()
    vllm_expertflow.register()  # vLLM calls it more than once per process; a second OOT registration would raise
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--enable-expert-offload", "--expert-cache-slots", "6",
                              "--expert-cache-policy", "lfru", "--expert-scheduling", "fcfs",
                              "--expert-miss-policy", "skip"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config["expert_offload"] == {
        "enabled": True, "cache_slots": 6, "policy": "lfru", "scheduling": "fcfs", "miss_policy": "skip"}
    # without the flags nothing is added: offload stays off
    plain = EngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert "expert_offload" not in (plain.additional_config or {})


def test_flag_values_are_checked_by_argparse():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_expertflow

    vllm_expertflow.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--expert-cache-slots", "-3"])

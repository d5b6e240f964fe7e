"""Bad settings fail at startup, before any weights are read, naming the value and what is valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO
from vllm_expertflow.tiny_models import build_tiny_moe

pytestmark = pytest.mark.vllm


def serve(*flags: str, model: str = "unused-model") -> subprocess.CompletedProcess:
    vllm_cli = Path(sys.executable).parent / "vllm"
    return subprocess.run([str(vllm_cli), "serve", model, *flags], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


@pytest.mark.parametrize("flags, message", [
    (["--enable-expert-offload", "--expert-cache-slots", "4", "--expert-cache-policy", "mru"],
     "invalid choice: 'mru' (choose from 'lru', 'lfu', 'lfru', 'expertflow')"),
    (["--enable-expert-offload", "--expert-cache-slots", "0"], "must be a positive integer"),
    (["--enable-expert-offload", "--expert-cache-gb", "lots"], "must be a positive number of GB, got 'lots'"),
    (["--enable-expert-offload", "--expert-cache-slots", "4", "--expert-scheduling-max-overflow", "2"],
     "must be a number in [0, 1] or 'none', got '2'"),
    (["--enable-expert-offload", "--expert-cache-slots", "4", "--expert-miss-policy", "reroute",
      "--expert-reroute-margin", "-1"], "must be a finite number >= 0 (router logits), got '-1'"),
])
def test_cli_rejects_bad_flags_before_anything_starts(flags, message):
    proc = serve(*flags)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr


def test_cli_refuses_both_sizes_with_the_flag_names(tiny_models):
    proc = serve("--enable-expert-offload", "--expert-cache-slots", "4", "--expert-cache-gb", "1",
                 model=str(tiny_models["qwen3_moe"]))
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "exactly one of cache_slots (--expert-cache-slots) or cache_gb (--expert-cache-gb); both given" in output
    assert "Loading safetensors" not in output  # refused before the model was loaded


def test_model_dependent_checks(tiny_models, tmp_path):
    qwen3 = str(tiny_models["qwen3_moe"])
    dense = str(build_tiny_moe("dense", tmp_path / "dense"))
    per_layer_bytes = 3 * 128 * 96 * 2 * 4  # bytes per expert x 4 MoE layers
    cases = [
        (qwen3, {"enabled": True, "cache_slots": 1}),
        (qwen3, {"enabled": True, "cache_gb": per_layer_bytes / 1024**3}),  # one slot per layer
        (qwen3, {"enabled": True}),
        (qwen3, {"enabled": True, "cache_slots": 99}),
        (dense, {"enabled": True, "cache_slots": 4}),
    ]
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("startup_probe.py")), json.dumps(cases)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    below_top_k, small_budget, no_size, too_many, dense_model = report
    assert "cache_slots=1 is below the model's top_k=2" in below_top_k["error"]
    assert "valid: 2..16" in below_top_k["error"]
    assert "gives 1 slot(s) per MoE layer, below the model's top_k=2; the minimum is 0.000549316 GB" in \
        small_budget["error"]
    assert "neither given" in no_size["error"]
    assert too_many["ok"]
    logs = proc.stdout + proc.stderr
    assert "cache_slots=99 exceeds the 16 experts per layer" in logs
    assert "16/16 slots per layer" not in logs and "16 slots per layer" in logs
    assert dense_model["ok"]
    assert "has no MoE layers: serving it normally" in logs


def test_prefetch_flags_and_predictor_file_are_checked_at_startup(tiny_models, tmp_path):
    proc = serve("--enable-expert-offload", "--expert-cache-slots", "4", "--expert-prefetch", "oracle")
    assert proc.returncode == 2
    assert "invalid choice: 'oracle' (choose from 'none', 'lookahead', 'predictor')" in proc.stderr

    from vllm_expertflow.core.predictors import RoutingPathPredictor

    qwen3 = str(tiny_models["qwen3_moe"])
    wrong = tmp_path / "wrong.pt"
    RoutingPathPredictor(3, 16, 2, hidden=8).save(wrong)  # the model has 4 MoE layers
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a predictor")
    base = {"enabled": True, "cache_slots": 4, "prefetch": "predictor"}
    cases = [
        (qwen3, {**base, "predictor_path": str(tmp_path / "missing.pt")}),
        (qwen3, {**base, "predictor_path": str(wrong)}),
        (qwen3, {**base, "predictor_path": str(garbage)}),
        (qwen3, {"enabled": True, "cache_slots": 4, "miss_policy": "skip", "reroute_margin": 0.5}),
    ]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("startup_probe.py")), json.dumps(cases)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    missing, mismatch, not_a_predictor, lossy = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert "missing.pt' (--expert-predictor) is not a file" in missing["error"]
    assert "trained for 3 MoE layers x 16 experts (top_k 2)" in mismatch["error"]
    assert "has 4 MoE layers x 16 experts (top_k 2)" in mismatch["error"]
    assert "does not load" in not_a_predictor["error"]
    assert "reroute_margin=0.5 (--expert-reroute-margin) is only used with miss_policy 'reroute'" in lossy["error"]


def test_cache_gb_minimum_counts_the_kernels_padded_expert_size(tmp_path_factory):
    # moe_intermediate_size 336 pads to 352 in vLLM-CPU's kernel: the minimum is computed from the
    # padded size, so a budget just below it fails at startup and one just above runs with top_k slots.
    wide = str(build_tiny_moe("qwen3_moe_wide", tmp_path_factory.mktemp("wide") / "qwen3_moe_wide"))
    minimum_gb = 2 * (3 * 128 * 352 * 2) * 4 / 1024**3  # top_k x padded bytes per expert x 4 MoE layers
    cases = [
        (wide, {"enabled": True, "cache_gb": minimum_gb * 0.999}),
        (wide, {"enabled": True, "cache_gb": minimum_gb * 1.001}),
    ]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("startup_probe.py")), json.dumps(cases)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    below, above = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert f"the minimum is {minimum_gb:.6g} GB" in below["error"] and not below["weights_loaded"]
    assert "x 270336 bytes per expert" in below["error"]
    assert above["ok"] and above["slots"] == [2]


def test_refusals_come_before_the_weights_load(tiny_models, tmp_path):
    qwen3 = str(tiny_models["qwen3_moe"])
    traced = tmp_path / "traced"
    traced.mkdir()
    (traced / "routing-00000.npz").write_bytes(b"an earlier run's chunk")
    offload = {"enabled": True, "cache_slots": 4}
    cases = [
        (qwen3, offload, {"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}),
        (qwen3, {**offload, "scheduling": "fcfs"}, {"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}),
        (qwen3, {**offload, "trace_dir": str(traced)}),
        (qwen3, offload, {"enable_expert_parallel": True}),
    ]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("startup_probe.py")), json.dumps(cases)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    user_scheduler, user_scheduler_fcfs, trace_dir, expert_parallel = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert "--scheduler-cls 'vllm.v1.core.sched.scheduler.Scheduler' cannot be combined with --enable-expert-offload" \
        in user_scheduler["error"]
    assert user_scheduler_fcfs["ok"]  # with vLLM's order kept, the user's scheduler composes the steps
    assert "already holds a routing trace; give an empty or new directory" in trace_dir["error"]
    assert "does not support expert parallelism yet" in expert_parallel["error"]
    for refused in (user_scheduler, trace_dir, expert_parallel):
        assert not refused["weights_loaded"]


def test_quantized_moe_is_refused_by_the_front_end_before_the_engine_starts(monkeypatch):
    # No quantized MoE checkpoint can be built here (vLLM-CPU loads none of the MoE quantization
    # formats), so the front end's check gets the shape vLLM would report for one.
    from types import SimpleNamespace

    from vllm_expertflow.config import ExpertOffloadConfig, ExpertOffloadConfigError
    from vllm_expertflow.vllm_adapter import startup, vllm_api

    shape = vllm_api.MoEModelShape(name="some/fp8-moe", num_experts=8, top_k=2, num_layers=2, text_config=None,
                                   dtype_bytes=2, quantization="fp8", model_type="qwen3_moe", mla_on_cpu=False)
    monkeypatch.setattr(startup, "moe_model_shape", lambda vllm_config: shape)
    config = SimpleNamespace(additional_config={})
    with pytest.raises(ExpertOffloadConfigError, match=r"some/fp8-moe uses quantization='fp8'.*unquantized"):
        startup.check_model(ExpertOffloadConfig.from_dict({"enabled": True, "cache_slots": 4}), config)
    assert config.additional_config == {}  # refused before anything was planned for the workers


def test_layer_refusals_name_the_layer_and_what_would_work():
    from vllm_expertflow.config import ExpertOffloadConfigError
    from vllm_expertflow.vllm_adapter.moe import OffloadedUnquantizedFusedMoEMethod, refuse_unsupported_layer

    class QuantizedMethod:  # any method other than the unquantized one vLLM would pick
        is_monolithic = False

    class MonolithicMethod(OffloadedUnquantizedFusedMoEMethod):
        is_monolithic = True
        unquantized_backend = "FLASHINFER_TRTLLM"

    class ModularMethod(OffloadedUnquantizedFusedMoEMethod):
        is_monolithic = False

    # Built without vLLM's constructor: only the attributes the checks read are needed.
    monolithic, modular = MonolithicMethod.__new__(MonolithicMethod), ModularMethod.__new__(ModularMethod)
    with pytest.raises(ExpertOffloadConfigError, match=r"unquantized MoE weights only; layer layers\.0\.mlp uses "
                                                       r"QuantizedMethod"):
        refuse_unsupported_layer("layers.0.mlp", QuantizedMethod(), 8, 8)
    with pytest.raises(ExpertOffloadConfigError, match=r"expert parallelism yet \(4 local of 8 experts"):
        refuse_unsupported_layer("layers.0.mlp", modular, 4, 8)
    with pytest.raises(ExpertOffloadConfigError, match=r"monolithic backend FLASHINFER_TRTLLM; choose another"):
        refuse_unsupported_layer("layers.0.mlp", monolithic, 8, 8)
    refuse_unsupported_layer("layers.0.mlp", modular, 8, 8)  # the supported case passes

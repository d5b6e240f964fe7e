"""Every MoE family we build as a tiny checkpoint, offload on vs off: lossless, or refused at startup.

One process runs all architectures (``architecture_probe.py``), each with offload off and
with offload at slots = top_k, about E/4 and about E/2. Greedy tokens must equal offload-off's
(bf16, 16 prompts of varied lengths). With offload enabled, every engine must either run every
fused-MoE layer on an expert cache or refuse at startup, before weights load ("never silent").

The DeepSeek (MLA) models run with ``scheduling: fcfs``: vLLM-CPU's rotary kernel, as MLA
calls it, gives a request's rows different values in different batches
(``test_cpu_mla_rotary_is_batch_variant``), so plain vLLM's own output depends on which
requests share a step, and expert-aware scheduling, which changes that, would change tokens
for a reason that is not the cache's. With vLLM's step composition kept, the slot path must be exact.

Each architecture's outcome is written to ``runs/coverage/architectures.json``;
``scripts/make_coverage_table.py`` renders it into the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest

from tests.vllm.conftest import REPO, record_coverage
from vllm_expertflow.tiny_models import build_tiny_moe

pytestmark = pytest.mark.vllm


@dataclass(frozen=True)
class Architecture:
    shape: str  # vllm_expertflow.tiny_models shape
    hf_class: str
    example: str  # a real checkpoint of this architecture
    modality: str
    routing: str
    shared_experts: str
    num_experts: int
    top_k: int
    scheduling: str = "expertflow"
    expect_refusal: str | None = None  # a phrase the startup refusal must contain
    # Why the tiny model's small caches cannot miss (then only token identity is checked), else None.
    never_misses: str | None = None
    # A phrase of the error plain vLLM-CPU (offload off) fails with: then it cannot run this family at all.
    vllm_cpu_error: str | None = None


ARCHITECTURES = [
    Architecture("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek-ai/DeepSeek-V2-Lite-Chat (text model of DeepSeek-VL2)",
                 "text", "softmax, group-limited greedy top-k, routed scaling 1.5", "1", 20, 2, scheduling="fcfs"),
    Architecture("deepseek_v3", "DeepseekV3ForCausalLM", "moonshotai/Moonlight-16B-A3B (text model of Kimi-VL)",
                 "text", "sigmoid + e_score_correction_bias (noaux_tc), grouped top-k, renormalised, scaling 2.5",
                 "1", 16, 2, scheduling="fcfs"),
    Architecture("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen/Qwen1.5-MoE-A2.7B", "text",
                 "softmax top-k, not renormalised", "1 (sigmoid-gated)", 8, 2),
    Architecture("llama4_text", "Llama4ForCausalLM", "meta-llama/Llama-4-Scout-17B-16E (text)", "text",
                 "sigmoid top-1, router weight applied to the input, MoE every 2nd layer", "1", 8, 1),
    Architecture("olmoe", "OlmoeForCausalLM", "allenai/OLMoE-1B-7B-0924", "text", "softmax top-k, not renormalised",
                 "none", 16, 2),
    Architecture("glm4_moe", "Glm4MoeForCausalLM", "zai-org/GLM-4.5-Air", "text",
                 "sigmoid + e_score_correction_bias, renormalised, scaling 2.5, first layer dense", "1", 16, 2),
    Architecture("phimoe", "PhiMoEForCausalLM", "microsoft/Phi-3.5-MoE-instruct", "text", "sparsemixer top-2",
                 "none", 8, 2, never_misses="the tiny random model routes every token to the same 2 experts per layer"),
    Architecture("granitemoe", "GraniteMoeForCausalLM", "ibm-granite/granite-3.1-3b-a800m-instruct", "text",
                 "softmax over the top-k logits", "none", 8, 2),
    Architecture("ernie45_moe", "Ernie4_5_MoeForCausalLM", "baidu/ERNIE-4.5-21B-A3B-PT", "text",
                 "softmax top-k, renormalised, MoE from layer 1", "1", 16, 2),
    Architecture("gpt_oss", "GptOssForCausalLM", "openai/gpt-oss-20b", "text",
                 "softmax over the top-k logits, router bias; expert biases, clamped SwiGLU", "none", 8, 2),
    Architecture("granitemoeshared", "GraniteMoeSharedForCausalLM", "ibm-research/moe-7b-1b-active-shared-experts",
                 "text", "softmax over the top-k logits", "1", 8, 2),
    Architecture("hunyuan_moe", "HunYuanMoEV1ForCausalLM", "tencent/Hunyuan-A13B-Instruct", "text",
                 "softmax top-k, renormalised (vLLM's Transformers backend)", "1", 16, 2,
                 expect_refusal="runs it through the Transformers backend"),
    Architecture("minimax_m2", "MiniMaxM2ForCausalLM", "MiniMaxAI/MiniMax-M2", "text",
                 "sigmoid + e_score_correction_bias, renormalised", "none", 16, 2,
                 vllm_cpu_error="cpu_router.py"),
    Architecture("qwen3_next", "Qwen3NextForCausalLM", "Qwen/Qwen3-Next-80B-A3B-Instruct", "text",
                 "softmax top-k, renormalised; gated DeltaNet linear attention in 3 of 4 layers", "1 (sigmoid-gated)",
                 16, 2),
    Architecture("minimax_text01", "MiniMaxText01ForCausalLM", "MiniMaxAI/MiniMax-Text-01", "text",
                 "softmax top-2; lightning (linear) attention in 3 of 4 layers", "none", 8, 2,
                 vllm_cpu_error="was supported in vLLM until v0.23.0"),
]


def slot_counts(arch: Architecture) -> list[int]:
    return sorted({arch.top_k, max(arch.top_k, arch.num_experts // 4), arch.num_experts // 2})


def run_probe(probe: str, architectures: list[Architecture], build, root, request) -> dict[str, dict]:
    """Run ``probe`` on the architectures this session selected, built by ``build(shape, dir)``: shape -> report."""
    # Only the architectures this session runs (-k phimoe starts one model, not all).
    selected = {item.callspec.params["arch"].shape for item in request.session.items
                if hasattr(item, "callspec") and "arch" in item.callspec.params}
    cases = [
        {"shape": a.shape, "model": str(build(a.shape, root / a.shape)), "slots": slot_counts(a),
         "scheduling": a.scheduling}
        for a in architectures if a.shape in selected
    ]
    cases_file, out = root / "cases.json", root / "report.json"
    cases_file.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, probe, str(cases_file), str(out)],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"probe wrote no report ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return {entry["shape"]: entry for entry in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def probe_report(tmp_path_factory, request) -> dict[str, dict]:
    return run_probe("tests/vllm/architecture_probe.py", ARCHITECTURES, build_tiny_moe,
                     tmp_path_factory.mktemp("architectures"), request)


def record(arch: Architecture, status: str, test_name: str) -> None:
    """Add this architecture's outcome to the coverage results (rendered by scripts/make_coverage_table.py)."""
    record_coverage("architectures", arch.shape, {**asdict(arch), "status": status, "test": test_name})


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.shape)
def test_offload_is_lossless_or_refused_at_startup(arch, probe_report, request):
    entry = probe_report[arch.shape]
    if arch.vllm_cpu_error is not None:
        assert "error" in entry and not entry.get("runs"), f"{arch.shape} runs on vLLM-CPU now: test offload on it"
        assert arch.vllm_cpu_error in entry["error"], entry["error"]
        error = " ".join(entry["error"].split())  # one line: it becomes a table cell
        record(arch, f"vLLM-CPU cannot run it (offload off): {error[:300]}", request.node.name)
        return
    assert "error" not in entry, f"{arch.shape}: {entry.get('error')}"
    if arch.expect_refusal is not None:
        assert entry.get("refused"), f"{arch.shape} started with offload enabled instead of refusing"
        assert arch.expect_refusal in entry["refused"]
        assert [r["name"] for r in entry["runs"]] == ["offload-off"]  # offload off still serves it
        assert entry["refused_before_load"], "the refusal must come from the front end, before weights load"
        record(arch, f"refused at startup: {entry['refused'].split(': ', 1)[-1][:200]}", request.node.name)
        return
    assert "refused" not in entry, f"{arch.shape} refused offload: {entry['refused']}"
    runs = {r["name"]: r for r in entry["runs"]}
    plain = runs.pop("offload-off")
    assert plain["cache"] is None and plain["moe_layers"]["offloaded"] == 0
    assert len(plain["tokens"]) == 16 and all(len(t) == 12 for t in plain["tokens"])
    moe_layers = plain["moe_layers"]["total"]
    assert moe_layers >= 1
    for name, run in runs.items():
        same = sum(a == b for a, b in zip(run["tokens"], plain["tokens"], strict=True))
        assert run["tokens"] == plain["tokens"], f"{arch.shape} {name}: {same}/16 prompts identical to offload-off"
        # never silent: every fused-MoE layer runs on an expert cache
        assert run["moe_layers"] == {"total": moe_layers, "offloaded": moe_layers}
        assert len(run["cache"]["layers"]) == moe_layers
    smallest = runs[f"slots-{arch.top_k}"]["cache"]
    slots = "/".join(str(s) for s in slot_counts(arch))
    status = f"lossless at {slots} of {arch.num_experts} slots ({arch.scheduling} scheduling)"
    if arch.never_misses is None:
        # the small caches really miss: steps were split into passes and experts loaded again and again
        assert smallest["passes"] > smallest["steps"]
        assert smallest["loads"] > arch.num_experts * moe_layers
    else:
        assert smallest["passes"] == smallest["steps"]  # if it starts to miss, the check above applies: drop the flag
        status += f"; caches never missed: {arch.never_misses}"
    record(arch, status, request.node.name)


def test_cpu_mla_rotary_is_batch_variant():
    """Why the MLA models run with fcfs scheduling: a request's rotary output depends on its batch in vLLM-CPU.

    MLA rotates a strided ``[tokens, heads, 64]`` view of q and a ``[tokens, 1, 64]`` view of the
    latent projection in place. If a vLLM upgrade makes this batch-invariant, this test fails:
    then drop the MLA warning in startup.check_model and run the MLA models with expertflow scheduling.
    """
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=1024, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                        is_neox_style=False, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    tokens, heads = 10, 4
    q_all = torch.randn(2 * tokens, heads, 128 + 64, generator=generator).bfloat16()
    kv_all = torch.randn(2 * tokens, 512 + 64, generator=generator).bfloat16()
    positions = torch.cat([torch.arange(tokens), torch.arange(tokens)])

    def rotate(rows: int) -> torch.Tensor:
        q, kv = q_all[:rows].clone(), kv_all[:rows].clone()
        rope.forward_cpu(positions[:rows], q[..., 128:], kv[:, 512:].unsqueeze(1))
        return q[:tokens, :, 128:]

    alone, batched = rotate(tokens), rotate(2 * tokens)
    assert not torch.equal(alone, batched)

"""The synthetic topic model ``qwen3_moe_topics`` routes by topic (transformers only, no vLLM).

The token-scheduling benchmark's topic workload relies on it: a request uses a small part of
each layer's experts, mostly its topic's, while requests of all topics together use most of
them, in prefill and in greedy decoding alike.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vllm_expertflow.tiny_models import (  # noqa: E402
    TOPIC_COUNT,
    TOPIC_WORDS,
    build_tiny_moe,
    sample_topic_prompts,
    topic_experts,
)

NUM_PROMPTS = 32
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def topic_model(tmp_path_factory):
    return build_tiny_moe("qwen3_moe_topics", tmp_path_factory.mktemp("tiny") / "qwen3_moe_topics")


@pytest.fixture(scope="module")
def routing(topic_model):
    """Per prompt: its topic, its prefill and decode ``topk_ids [tokens, layers, top_k]`` and its decoded words."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(topic_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(topic_model, dtype=torch.float32).eval()
    calls: list[list[torch.Tensor]] = []

    def capture(layer):
        def hook(module, inputs, output):
            if layer == 0:
                calls.append([])
            calls[-1].append(output[2])  # the router's top-k expert ids, [tokens, top_k]
        return hook

    for layer, decoder in enumerate(model.model.layers):
        decoder.mlp.gate.register_forward_hook(capture(layer))
    results = []
    for topic, prompt in sample_topic_prompts(NUM_PROMPTS, seed=11):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        calls.clear()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=1)
        steps = [torch.stack(layers, dim=1).numpy() for layers in calls]  # each [tokens, layers, top_k]
        words = tokenizer.convert_ids_to_tokens(out[0, ids.shape[1]:].tolist())
        results.append((topic, steps[0], np.concatenate(steps[1:]), words))
    return results, model.config


def test_topic_prompts_are_deterministic_and_mostly_on_topic():
    prompts = sample_topic_prompts(40, topics=3, seed=5)
    assert prompts == sample_topic_prompts(40, topics=3, seed=5)
    assert {topic for topic, _ in prompts} == {0, 1, 2}
    words = [(topic, word) for topic, prompt in prompts for word in prompt.split()]
    assert np.mean([word in TOPIC_WORDS[topic] for topic, word in words]) > 0.85
    with pytest.raises(ValueError, match="topics must be in 1..8, got 9"):
        sample_topic_prompts(1, topics=TOPIC_COUNT + 1)


def test_topic_model_build_is_deterministic(topic_model, tmp_path):
    again = build_tiny_moe("qwen3_moe_topics", tmp_path / "again")
    first = transformers.AutoModelForCausalLM.from_pretrained(topic_model).state_dict()
    second = transformers.AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_requests_route_inside_their_topic(routing):
    results, config = routing
    layers, experts = config.num_hidden_layers, config.num_experts
    owners = topic_experts(experts, layers).numpy()  # [layers, topics, experts per topic]
    on_topic = {"prefill": [], "decode": []}
    per_request, per_topic_decode = [], np.zeros((TOPIC_COUNT, layers, experts), dtype=bool)
    workload = np.zeros((layers, experts), dtype=bool)
    for topic, prefill, decode, _ in results:
        for phase, ids in (("prefill", prefill), ("decode", decode)):
            on_topic[phase].append(np.mean([np.isin(ids[:, layer], owners[layer, topic]).mean()
                                            for layer in range(layers)]))
        both = np.concatenate([prefill, decode])
        per_request.append(np.mean([len(np.unique(both[:, layer])) for layer in range(layers)]))
        for layer in range(layers):
            per_topic_decode[topic, layer, decode[:, layer].ravel()] = True
            workload[layer, both[:, layer].ravel()] = True
    # Random routers (the other shapes) put about 1/8 of the picks on a topic's 8 experts.
    assert np.mean(on_topic["prefill"]) > 0.8
    assert np.mean(on_topic["decode"]) > 0.85
    # A request (prompt of 4-30 words plus 8 decoded tokens) touches few of the 64 experts per layer ...
    assert np.mean(per_request) < 15
    # ... and so do all decode steps of one topic, over 4 requests on average ...
    seen = [t for t in range(TOPIC_COUNT) if per_topic_decode[t].any()]
    assert per_topic_decode[seen].sum(axis=2).mean() <= 10
    # ... while the whole workload uses most of every layer's experts.
    assert workload.sum(axis=1).min() >= 0.75 * experts


def test_greedy_decoding_stays_in_the_prompt_topic(routing):
    results, _ = routing
    assert np.mean([np.mean([w in TOPIC_WORDS[topic] for w in words]) for topic, _, _, words in results]) > 0.9


def test_study_shape_vlm_has_the_study_models_shape_and_the_released_expert_layout(tmp_path):
    import json

    from safetensors import safe_open

    from vllm_expertflow.tiny_models import STUDY_SHAPE, build_study_shape_vlm

    out = build_study_shape_vlm(tmp_path / "study-shape")
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["num_local_experts"], text["num_experts_per_tok"],
            text["moe_intermediate_size"], text["hidden_size"], text["mlp_only_layers"]) == (6, 128, 8, 32, 192, [])
    assert STUDY_SHAPE["num_experts"] == 128
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        gate_up = [k for k in f.keys() if k.endswith("layers.0.mlp.experts.gate_up_proj")]
        down = [k for k in f.keys() if k.endswith("layers.0.mlp.experts.down_proj")]
        assert f.get_slice(gate_up[0]).get_shape() == [128, 192, 64]  # [E, H, 2I], as vLLM's loader expects
        assert f.get_slice(down[0]).get_shape() == [128, 32, 192]  # [E, I, H]
    assert (out / "tokenizer.json").exists() and (out / "processor_config.json").exists()
    assert build_study_shape_vlm(out) == out  # a second call reuses the build

import numpy as np
import pytest
import torch

from vllm_expertflow.core.predictor_eval import evaluate_predictor, split_requests
from vllm_expertflow.core.predictors import (
    DemandForecast,
    FrequencyPredictor,
    HistoryPredictor,
    LookaheadPredictor,
    PromptRoutingPredictor,
    RoutingPathPredictor,
    make_predictor,
    multi_hot,
    position_buckets,
    signature_precision_recall,
    step_demand,
)
from vllm_expertflow.core.trace import RoutingTrace


def trace_of(steps: list[list[tuple[str, int, list[list[int]]]]], num_experts: int, top_k: int) -> RoutingTrace:
    """steps: per step, tokens as (request, position, [per-layer experts])."""
    rows = [(step, *token) for step, tokens in enumerate(steps) for token in tokens]
    num_layers = len(rows[0][3])
    return RoutingTrace(
        topk_ids=np.asarray([r[3] for r in rows], dtype=np.int32).reshape(len(rows), num_layers, top_k),
        step_id=np.asarray([r[0] for r in rows], dtype=np.int32),
        request_id=np.asarray([r[1] for r in rows]),
        position=np.asarray([r[2] for r in rows], dtype=np.int32),
        num_experts=num_experts,
        top_k=top_k,
        layer_names=[f"layer{i}" for i in range(num_layers)],
    )


def test_history_precision_and_recall_on_a_hand_made_trace():
    trace = trace_of(
        [
            [("a", 0, [[0, 1]])],
            [("a", 1, [[0, 2]]), ("b", 0, [[3, 1]])],
            [("a", 2, [[2, 3]]), ("b", 1, [[3, 1]])],
        ],
        num_experts=4,
        top_k=2,
    )
    scores = evaluate_predictor(HistoryPredictor(1, 4, 2), trace)["layer0"]
    # Step 0: nothing seen, all frequencies tie -> {0, 1}, needed {0, 1}.
    # Step 1: a repeats {0, 1}; b is new -> frequency top-2 {0, 1} (counts 2, 2, 1, 1). Needed {0, 1, 2, 3}.
    # Step 2: a -> {0, 2}, b -> {3, 1}: predicted {0, 1, 2, 3}; needed {1, 2, 3}.
    assert scores["precision"] == pytest.approx((2 + 2 + 3) / (2 + 2 + 4))
    assert scores["recall"] == pytest.approx((2 + 2 + 3) / (2 + 4 + 3))
    # Token hits 2, then a 1 / b 1, then a 1 / b 2, over 5 tokens x top_k 2.
    assert scores["token_recall"] == pytest.approx(7 / 10)
    assert scores["steps"] == 3


def test_frequency_predictor_predicts_the_fitted_top_k_for_everyone():
    trace = trace_of([[("a", 0, [[2, 3], [1, 3]])], [("a", 1, [[2, 0], [3, 1]])]], num_experts=4, top_k=2)
    predictor = FrequencyPredictor(2, 4, 2)
    predictor.fit([trace])
    guess = predictor.predict(["x", "y"], [0, 5])
    assert guess.shape == (2, 2, 2) and guess.dtype == np.int32
    assert sorted(guess[0, 0]) == [0, 2] and sorted(guess[1, 1]) == [1, 3]
    proba = predictor.predict_proba(["x"], [0])
    assert proba.shape == (1, 2, 4) and np.all((proba >= 0) & (proba <= 1))


def test_history_probabilities_are_calibrated_by_the_repeat_rate():
    # Request a always repeats its experts: the measured repeat rate approaches 1.
    trace = trace_of([[("a", p, [[1, 2]])] for p in range(30)], num_experts=4, top_k=2)
    predictor = HistoryPredictor(1, 4, 2)
    predictor.fit([trace])
    assert predictor.repeat_rate()[0] > 0.95
    predictor.observe(["z"], [0], np.array([[[0, 3]]]))
    proba = predictor.predict_proba(["z"], [1])[0, 0]
    assert proba[0] > 0.9 and proba[3] > 0.9 and proba[1] < 0.1
    assert predictor.predict(["z", "new"], [1, 0])[0, 0].tolist() == [0, 3]


def shifting_trace(num_requests: int, steps: int, seed: int, num_experts: int = 8, num_layers: int = 2) -> RoutingTrace:
    """Learnable structure: a request's experts move up by one each step (so copying the last step is always wrong)."""
    rng = np.random.default_rng(seed)
    rows = []
    for request in range(num_requests):
        start = rng.integers(0, num_experts, size=num_layers)
        for position in range(steps):
            experts = [[(s + position) % num_experts, (s + position + 3) % num_experts] for s in start]
            rows.append((position, f"r{request}", position, experts))
    rows.sort(key=lambda r: r[0])  # all requests decode together, one token per step each
    return RoutingTrace(
        topk_ids=np.asarray([r[3] for r in rows], dtype=np.int32),
        step_id=np.asarray([r[0] for r in rows], dtype=np.int32),
        request_id=np.asarray([r[1] for r in rows]),
        position=np.asarray([r[2] for r in rows], dtype=np.int32),
        num_experts=num_experts,
        top_k=2,
        layer_names=["l0", "l1"],
    )


def mean_token_recall(scores):
    return float(np.mean([s["token_recall"] for s in scores.values()]))


def test_learned_predictor_beats_the_baselines_on_learnable_structure(tmp_path):
    train, held_out = shifting_trace(40, 10, seed=0), shifting_trace(10, 10, seed=1)
    learned = RoutingPathPredictor(2, 8, 2, hidden=64)
    losses = learned.fit([train], epochs=40, batch_size=64, lr=1e-2)
    assert losses[-1] < losses[0]
    history, frequency = HistoryPredictor(2, 8, 2), FrequencyPredictor(2, 8, 2)
    history.fit([train])
    frequency.fit([train])
    learned_recall = mean_token_recall(evaluate_predictor(learned, held_out))
    assert learned_recall > 0.8
    assert learned_recall > mean_token_recall(evaluate_predictor(history, held_out)) + 0.3
    assert learned_recall > mean_token_recall(evaluate_predictor(frequency, held_out)) + 0.3

    path = tmp_path / "rpp.pt"
    learned.save(path)
    loaded = make_predictor(str(path), held_out)
    assert isinstance(loaded, RoutingPathPredictor)
    assert evaluate_predictor(loaded, held_out) == evaluate_predictor(learned, held_out)


def test_loading_and_choosing_predictors_name_the_valid_choices(tmp_path):
    trace = shifting_trace(2, 3, seed=0)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a predictor")
    with pytest.raises(ValueError, match="not a saved routing predictor"):
        RoutingPathPredictor.load(bad)
    torch.save({"kind": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved learned routing predictor"):
        RoutingPathPredictor.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="unknown predictor 'oracle'; valid choices are 'frequency', 'history'"):
        make_predictor("oracle", trace)
    with pytest.raises(ValueError, match=r"for 4 layers x 8 experts, top_k 2, but the trace has 2 x 8"):
        make_predictor(HistoryPredictor(4, 8, 2), trace)


def test_split_requests_keeps_requests_whole():
    trace = shifting_trace(10, 4, seed=2)
    train, held_out = split_requests(trace, 0.2, seed=3)
    assert len(set(held_out.request_id)) == 2 and len(set(train.request_id)) == 8
    assert not set(held_out.request_id) & set(train.request_id)
    assert train.num_tokens + held_out.num_tokens == trace.num_tokens
    with pytest.raises(ValueError, match=r"held_out_fraction must be in \(0, 1\), got 1.5"):
        split_requests(trace, 1.5)


def test_demand_forecast_is_the_probability_that_any_token_needs_the_expert():
    proba = np.array([[[0.5, 0.0]], [[0.5, 1.0]]])  # 2 tokens, 1 layer, 2 experts
    assert step_demand(proba) == pytest.approx(np.array([[0.75, 1.0]]))
    trace = shifting_trace(3, 4, seed=4)
    forecast = DemandForecast.of(HistoryPredictor(2, 8, 2), trace)
    assert forecast.predictor == "history" and forecast.demand.shape == (trace.num_steps, 2, 8)
    assert np.all((forecast.demand >= 0) & (forecast.demand <= 1))


def test_helpers():
    assert position_buckets(np.array([0, 1, 2, 3, 4, 10_000])).tolist() == [0, 1, 2, 2, 3, 11]
    with pytest.raises(ValueError, match="positions must be >= 0, got -1"):
        position_buckets(np.array([-1]))
    hot = multi_hot(np.array([[[0, 2]]]), 3)
    assert hot.tolist() == [[[1.0, 0.0, 1.0]]]


def test_lookahead_applies_the_next_layers_routers_to_the_current_hidden_state():
    generator = torch.Generator().manual_seed(0)
    experts, hidden, layers = 8, 16, 3
    gates = [torch.randn(experts, hidden, generator=generator) for _ in range(layers)]
    states = torch.randn(32, hidden, generator=generator)
    predictor = LookaheadPredictor(gates, top_k=2)
    ahead = predictor.predict(states, from_layer=0, lookahead=2)
    assert ahead.shape == (32, 2, 2) and ahead.dtype == torch.int32
    for offset, layer in enumerate((1, 2)):
        assert torch.equal(ahead[:, offset], torch.topk(states @ gates[layer].T, 2).indices.to(torch.int32))
    assert predictor.predict(states, from_layer=2).shape == (32, 0, 2)  # past the last layer

    # Residual streams drift a little between layers; the speculative routing mostly survives that.
    drifted = states + 0.05 * torch.randn(states.shape, generator=generator)
    true_next = torch.topk(drifted @ gates[1].T, 2).indices
    hits = (ahead[:, 0, :, None] == true_next[:, None, :]).any(-1).float().mean()
    assert hits > 0.9

    with pytest.raises(ValueError, match=r"router_weights\[1\] has shape \(8, 4\); every gate must be \(8, 16\)"):
        LookaheadPredictor([gates[0], torch.randn(8, 4)], top_k=2)
    with pytest.raises(ValueError, match=r"hidden_states must be \[num_tokens, 16\]"):
        predictor.predict(torch.randn(2, 5), from_layer=0)
    with pytest.raises(ValueError, match="from_layer 3 out of range 0..2"):
        predictor.predict(states, from_layer=3)


def test_prompt_predictor_is_each_layers_router_on_the_token_embeddings():
    torch.manual_seed(0)
    vocab, hidden, experts, top_k = 50, 16, 12, 3
    embeddings = torch.randn(vocab, hidden)
    routers = [torch.randn(experts, hidden) for _ in range(2)]
    norms = [None, torch.rand(hidden) + 0.5]
    predictor = PromptRoutingPredictor.from_weights(embeddings, routers, top_k, norm_weights=norms, chunk=7)
    assert predictor.token_experts.shape == (vocab, 2, top_k)
    prompt = [3, 17, 17, 42, 999, -1]  # repeats count once; ids outside the vocabulary are skipped
    expected = np.zeros((2, experts), dtype=bool)
    for token in (3, 17, 42):
        expected[0, torch.topk(embeddings[token] @ routers[0].T, top_k).indices.numpy()] = True
        expected[1, torch.topk((embeddings[token] * norms[1]) @ routers[1].T, top_k).indices.numpy()] = True
    predicted = predictor.predict(prompt)
    np.testing.assert_array_equal(predicted.to_mask(), expected)
    # Scored against what the request then used: half of one layer's claims were right.
    used = np.zeros_like(expected)
    used[0, np.flatnonzero(expected[0])[:2]] = True
    from vllm_expertflow.core.grouping import ExpertSignature

    precision, recall = signature_precision_recall(predicted, ExpertSignature.from_mask(used))
    assert precision == pytest.approx(2 / expected.sum()) and recall == 1.0
    assert predictor.predict([]).to_mask().sum() == 0


def test_prompt_predictor_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="token_experts must be int"):
        PromptRoutingPredictor(np.zeros((4, 2), dtype=np.int32), 8)
    with pytest.raises(ValueError, match="outside 0..7"):
        PromptRoutingPredictor(np.full((4, 2, 2), 9, dtype=np.int32), 8)
    with pytest.raises(ValueError, match=r"embeddings must be \[vocab, 16\]"):
        PromptRoutingPredictor.from_weights(torch.zeros(5, 8), [torch.zeros(4, 16)], 2)
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        PromptRoutingPredictor.from_weights(torch.zeros(5, 16), [torch.zeros(4, 16)], 5)

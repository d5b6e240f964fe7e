import numpy as np
import pytest
import torch

from vllm_expertflow.core.trace import RoutingTrace, TraceWriter, read_trace

NUM_EXPERTS, TOP_K, LAYERS = 8, 2, ["model.layers.1.mlp", "model.layers.3.mlp", "model.layers.5.mlp"]


def random_steps(num_steps: int, seed: int = 0) -> list[tuple[int, list[str], np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(num_steps):
        tokens = int(rng.integers(1, 6))
        ids = np.stack([[rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in LAYERS] for _ in range(tokens)]).astype(
            np.int32
        )
        steps.append((step * 2, [f"req-{t % 2}" for t in range(tokens)], np.arange(tokens) + step, ids))
    return steps


def test_round_trip_over_several_chunks(tmp_path):
    steps = random_steps(12)
    with TraceWriter(tmp_path, NUM_EXPERTS, TOP_K, LAYERS, tokens_per_chunk=7, bytes_per_expert=4096) as writer:
        for step_id, requests, positions, ids in steps:
            writer.record_step(step_id, requests, positions, ids)
    assert writer.chunks_written > 1
    assert len(list(tmp_path.glob("routing-*.npz"))) == writer.chunks_written

    trace = read_trace(tmp_path)
    assert (trace.num_experts, trace.top_k, trace.layer_names) == (NUM_EXPERTS, TOP_K, LAYERS)
    assert trace.bytes_per_expert == 4096
    assert trace.num_steps == len(steps)
    assert trace.topk_ids.dtype == np.int32 and trace.topk_ids.shape == (trace.num_tokens, len(LAYERS), TOP_K)
    for got, (_, _, _, ids) in zip(trace.iter_steps(), steps, strict=True):
        np.testing.assert_array_equal(got, ids)
    np.testing.assert_array_equal(trace.step_id, np.concatenate([np.full(len(s[1]), s[0]) for s in steps]))
    assert trace.request_id.tolist() == [r for s in steps for r in s[1]]
    np.testing.assert_array_equal(trace.position, np.concatenate([s[2] for s in steps]))


def test_single_chunk_file_and_torch_inputs(tmp_path):
    ids = torch.tensor([[[0, 1]], [[2, 3]]], dtype=torch.int64)
    with TraceWriter(tmp_path, 4, 2, 1) as writer:
        writer.record_step(0, ["a", "b"], torch.tensor([0, 5]), ids)
        writer.record_step(1, [], [], np.zeros((0, 1, 2), dtype=np.int32))  # an empty step leaves no tokens
    trace = read_trace(tmp_path / "routing-000000.npz")
    assert trace.layer_names == ["0"] and trace.bytes_per_expert is None
    np.testing.assert_array_equal(trace.topk_ids, ids.numpy())
    assert trace.position.tolist() == [0, 5] and trace.num_steps == 1


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.zeros((2, 3, 3), dtype=np.int32), "topk_ids must be"),
        (np.full((2, 3, 2), 8, dtype=np.int32), "valid ids are 0..7"),
    ],
)
def test_record_step_rejects_bad_topk_ids(tmp_path, ids, match):
    writer = TraceWriter(tmp_path, NUM_EXPERTS, TOP_K, LAYERS)
    with pytest.raises(ValueError, match=match):
        writer.record_step(0, ["a", "b"], [0, 1], ids)


def test_record_step_rejects_bad_token_arrays_and_order(tmp_path):
    writer = TraceWriter(tmp_path, NUM_EXPERTS, TOP_K, LAYERS)
    ids = np.zeros((2, 3, 2), dtype=np.int32)
    with pytest.raises(ValueError, match="request_id must be"):
        writer.record_step(0, ["a"], [0, 1], ids)
    writer.record_step(5, ["a", "b"], [0, 1], ids)
    with pytest.raises(ValueError, match="step ids must increase: got 5 after 5"):
        writer.record_step(5, ["a", "b"], [0, 1], ids)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.record_step(6, ["a", "b"], [0, 1], ids)


def test_writer_refuses_a_directory_with_chunks(tmp_path):
    with TraceWriter(tmp_path, 4, 1, 1) as writer:
        writer.record_step(0, ["a"], [0], np.zeros((1, 1, 1), dtype=np.int32))
    with pytest.raises(FileExistsError, match="already holds chunks"):
        TraceWriter(tmp_path, 4, 1, 1)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace not found"):
        read_trace(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no trace chunks"):
        read_trace(tmp_path)
    for index, layers in enumerate((1, 2)):
        sub = tmp_path / str(index)
        with TraceWriter(sub, 4, 1, layers) as writer:
            writer.record_step(0, ["a"], [0], np.zeros((1, layers, 1), dtype=np.int32))
    (tmp_path / "1" / "routing-000000.npz").rename(tmp_path / "0" / "routing-000001.npz")
    with pytest.raises(ValueError, match="has metadata"):
        read_trace(tmp_path / "0")


def test_routing_trace_checks_its_arrays():
    ids = np.zeros((2, 1, 1), dtype=np.int32)
    names = np.array(["a", "b"])
    with pytest.raises(ValueError, match="non-decreasing"):
        RoutingTrace(ids, np.array([1, 0], dtype=np.int32), names, np.zeros(2, np.int32), 4, 1, ["0"])
    with pytest.raises(ValueError, match="position must be"):
        RoutingTrace(ids, np.zeros(2, np.int32), names, np.zeros(3, np.int32), 4, 1, ["0"])

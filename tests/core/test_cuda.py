"""The core on CUDA: pinned store, copy stream, events and the device slot table.

These tests are marked ``cuda`` and deselected by default (pyproject's addopts); CI has no
GPU. Run them on a CUDA machine with ``python -m pytest -m cuda tests/core/test_cuda.py``
(``scripts/gpu_check.sh`` does, with the GPU benchmarks). Decisions are made on the host,
so a CUDA cache must make exactly the loads, hits and evictions of a CPU cache fed the
same steps; outputs must match a dense reference computed on the host.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_expertflow.core import ExpertSlotCache, ExpertStore, LRUPolicy
from vllm_expertflow.core.expert_pool import ExpertPool

pytestmark = pytest.mark.cuda

HIDDEN, INTERMEDIATE = 32, 16


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests were selected (-m cuda) but torch sees no CUDA device")
    return torch.device("cuda")


def make_weights(num_experts: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTERMEDIATE, HIDDEN, generator=generator, dtype=torch.float64) * 0.2
    w2 = torch.randn(num_experts, HIDDEN, INTERMEDIATE, generator=generator, dtype=torch.float64) * 0.2
    return [w13.float(), w2.float()]


def swiglu_kernel(x, slot_weights, topk_weights, slot_ids, *, check: bool = True):
    """A real SwiGLU expert MLP over the slot buffers, on whatever device they live on."""
    assert slot_ids.dtype == torch.int32 and slot_ids.device == slot_weights[0].device
    if check:  # a host sync: waits for the compute stream
        assert int(slot_ids.min()) >= 0, "a token was routed to a non-resident expert"
    w13, w2 = slot_weights
    ids = slot_ids.long()
    gate_up = torch.einsum("th,tkih->tki", x, w13[ids])
    gate, up = gate_up.chunk(2, dim=-1)
    down = torch.einsum("tki,tkhi->tkh", torch.nn.functional.silu(gate) * up, w2[ids])
    return (down * topk_weights.unsqueeze(-1)).sum(dim=1)


def dense_reference(weights, x, topk_weights, topk_ids):
    """Every expert resident: the same kernel on the full expert tensors, on the host in float64."""
    full = [w.double() for w in weights]
    return swiglu_kernel(x.double().cpu(), full, topk_weights.double().cpu(), topk_ids.int().cpu()).float()


def random_steps(seed: int, num_steps: int, num_experts: int, top_k: int, max_tokens: int = 6):
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(num_experts, 0.5))
    for _ in range(num_steps):
        tokens = int(rng.integers(1, max_tokens + 1))
        ids = np.stack([rng.choice(num_experts, top_k, replace=False, p=popularity) for _ in range(tokens)])
        x = torch.from_numpy(rng.standard_normal((tokens, HIDDEN))).float()
        w = torch.from_numpy(rng.random((tokens, top_k))).float()
        yield torch.from_numpy(ids), x, w


def assert_close_to_reference(out, reference):
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), reference, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("num_slots", [2, 3, 5])
def test_cuda_cache_makes_the_cpu_caches_decisions_and_exact_outputs(cuda, num_slots):
    weights = make_weights(8, seed=num_slots)
    store = ExpertStore(weights, pin_memory=True)
    assert all(w.is_pinned() for w in store.weights)
    on_gpu = ExpertSlotCache(store, num_slots, LRUPolicy(), cuda)
    on_cpu = ExpertSlotCache(ExpertStore(weights), num_slots, LRUPolicy(), "cpu")
    for step, (ids, x, w) in enumerate(random_steps(num_slots, 40, 8, 2)):
        if step % 3 == 0:  # prefetches on the copy stream, some of them wrong
            guess = torch.randint(0, 8, (3,), generator=torch.Generator().manual_seed(step)).tolist()
            assert on_gpu.prefetch(guess) == on_cpu.prefetch(guess)
        out = on_gpu.run(x.to(cuda), w.to(cuda), ids.to(cuda), swiglu_kernel)
        assert_close_to_reference(out, dense_reference(weights, x, w, ids))
        on_cpu.run(x, w, ids, swiglu_kernel)
    assert on_gpu.stats.as_dict() == on_cpu.stats.as_dict()
    assert on_gpu.stats.loads > num_slots and on_gpu.stats.prefetch_loads > 0
    torch.cuda.synchronize()
    for expert, slot in on_gpu.map.resident().items():
        for slot_buffer, source in zip(on_gpu.slots, store.expert(expert), strict=True):
            assert torch.equal(slot_buffer[slot].cpu(), source)


def _slow_kernel(x, slot_weights, topk_weights, slot_ids):
    # Holds the compute stream (~50 ms) before the kernel reads the slots, so a copy that did not
    # wait for the compute stream would overwrite a slot before it is read. Nothing here may
    # wait for the device, or the kernel would have run before the test's prefetch is issued.
    torch.cuda._sleep(100_000_000)
    return swiglu_kernel(x, slot_weights, topk_weights, slot_ids, check=False)


def test_prefetch_waits_for_queued_kernels_that_read_the_slots_it_overwrites(cuda):
    weights = make_weights(8, seed=11)
    cache = ExpertSlotCache(ExpertStore(weights, pin_memory=True), 2, LRUPolicy(), cuda)
    ids = torch.tensor([[0, 1], [1, 0]])
    x, w = torch.randn(2, HIDDEN), torch.rand(2, 2)
    # Once through first: a kernel's first launch loads its module, which waits for the device
    # and would close the window this test needs.
    cache.run(x.to(cuda), w.to(cuda), ids.to(cuda), swiglu_kernel)
    out = cache.run(x.to(cuda), w.to(cuda), ids.to(cuda), _slow_kernel)  # queued, not yet run
    assert cache.prefetch([2, 3]) == 2  # evicts 0 and 1 while their reader sleeps
    assert_close_to_reference(out, dense_reference(weights, x, w, ids))


def test_pool_prefetch_waits_for_queued_kernels_that_read_the_slots_it_overwrites(cuda):
    stores = [ExpertStore(make_weights(8, seed=20 + layer), pin_memory=True) for layer in range(2)]
    pool = ExpertPool(stores[0], 2, 3, 2, cuda)  # 6 slots; each layer keeps at least 2
    layers = [pool.add_layer(layer, store) for layer, store in enumerate(stores)]
    ids = torch.tensor([[0, 1], [1, 2]])
    x, w = torch.randn(2, HIDDEN), torch.rand(2, 2)
    swiglu_kernel(x.to(cuda), [t.to(cuda) for t in stores[0].weights], w.to(cuda), ids.int().to(cuda))  # see above
    pool.begin_step()
    out = layers[0].run(x.to(cuda), w.to(cuda), ids.to(cuda), _slow_kernel)  # queued, not yet run
    # Unprotected, layer 1's prefetch fills the 3 free slots and takes one of layer 0's while it is read.
    assert layers[1].prefetch([4, 5, 6, 7], demand=np.ones(8)) == 4
    assert len(pool.policy.resident(0)) == 2
    assert_close_to_reference(out, dense_reference(stores[0].weights, x, w, ids))


@pytest.mark.parametrize("slots_per_layer", [2, 3])
def test_cuda_pool_makes_the_cpu_pools_decisions_and_exact_outputs(cuda, slots_per_layer):
    num_layers, num_experts, top_k = 3, 8, 2
    weights = [make_weights(num_experts, seed=30 + layer) for layer in range(num_layers)]

    def build(device, pin):
        stores = [ExpertStore(w, pin_memory=pin) for w in weights]
        pool = ExpertPool(stores[0], num_layers, slots_per_layer, top_k, device, prefetch=True)
        return pool, [pool.add_layer(layer, store) for layer, store in enumerate(stores)]

    gpu_pool, gpu_layers = build(cuda, True)
    cpu_pool, cpu_layers = build("cpu", False)
    steps = list(random_steps(slots_per_layer, 30 * num_layers, num_experts, top_k))
    for index in range(0, len(steps), num_layers):
        gpu_pool.begin_step()
        cpu_pool.begin_step()
        for layer in range(num_layers):
            ids, x, w = steps[index + layer]
            out = gpu_layers[layer].run(x.to(cuda), w.to(cuda), ids.to(cuda), swiglu_kernel)
            assert_close_to_reference(out, dense_reference(weights[layer], x, w, ids))
            cpu_layers[layer].run(x, w, ids, swiglu_kernel)
    assert [s.as_dict() for s in gpu_pool.stats] == [s.as_dict() for s in cpu_pool.stats]
    assert sum(s.loads for s in gpu_pool.stats) > gpu_pool.num_slots


@pytest.mark.parametrize("miss_policy", ["skip", "substitute"])
def test_cuda_lossy_runs_equal_the_cpu_ones(cuda, miss_policy):
    weights = make_weights(8, seed=40)
    on_gpu = ExpertSlotCache(ExpertStore(weights, pin_memory=True), 3, LRUPolicy(), cuda)
    on_cpu = ExpertSlotCache(ExpertStore(weights), 3, LRUPolicy(), "cpu")
    for step, (ids, x, w) in enumerate(random_steps(41, 30, 8, 2)):
        scores = torch.randn(len(ids), 8, generator=torch.Generator().manual_seed(step))
        gpu_out = on_gpu.run_lossy(x.to(cuda), w.to(cuda), ids.to(cuda), swiglu_kernel, miss_policy, scores.to(cuda))
        cpu_out = on_cpu.run_lossy(x, w, ids, swiglu_kernel, miss_policy, scores)
        torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=2e-4, atol=2e-5)
    assert on_gpu.stats.as_dict() == on_cpu.stats.as_dict()
    assert on_gpu.stats.misses > 0

"""Routing traces: which experts every token was routed to, layer by layer, step by step.

A trace is a directory of numbered NumPy ``.npz`` chunks (``routing-000000.npz``, ...),
each holding whole engine steps; a single ``.npz`` file is a trace too. The format is
documented in ``docs/trace-format.md``. Traces feed the replay simulator
(``core/simulate.py``) and, later, the routing-path predictor's training set.

Arrays, concatenated over a chunk's tokens in execution order:

- ``topk_ids: [num_tokens, num_layers, top_k] int32``, global expert ids
- ``step_id: [num_tokens] int32``, non-decreasing; one value per engine step
- ``request_id: [num_tokens] str``
- ``position: [num_tokens] int32``, the token's position in its request
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
CHUNK_PREFIX = "routing-"
CHUNK_SUFFIX = ".npz"
_METADATA_KEYS = ("format_version", "num_experts", "top_k", "layer_names")


@dataclasses.dataclass
class RoutingTrace:
    """A whole trace in memory; token arrays are concatenated in execution order."""

    topk_ids: np.ndarray  # [num_tokens, num_layers, top_k] int32
    step_id: np.ndarray  # [num_tokens] int32, non-decreasing
    request_id: np.ndarray  # [num_tokens] str
    position: np.ndarray  # [num_tokens] int32
    num_experts: int
    top_k: int
    layer_names: list[str]
    bytes_per_expert: int | None = None

    def __post_init__(self) -> None:
        _check_token_arrays(
            self.topk_ids,
            self.step_id,
            self.request_id,
            self.position,
            self.num_experts,
            self.top_k,
            len(self.layer_names),
        )
        if self.step_id.size and np.any(np.diff(self.step_id) < 0):
            raise ValueError("trace step_id must be non-decreasing in execution order")

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_steps(self) -> int:
        return len(self._step_starts())

    def step_bounds(self) -> list[tuple[int, int]]:
        """``[start, end)`` token ranges of the steps, in order."""
        starts = self._step_starts()
        ends = [*starts[1:], self.num_tokens]
        return list(zip(starts, ends, strict=True))

    def iter_steps(self) -> Iterator[np.ndarray]:
        """Yield each step's ``topk_ids: [step_tokens, num_layers, top_k] int32``."""
        for start, end in self.step_bounds():
            yield self.topk_ids[start:end]

    def _step_starts(self) -> list[int]:
        if self.num_tokens == 0:
            return []
        return [0, *(np.flatnonzero(np.diff(self.step_id)) + 1).tolist()]


class TraceWriter:
    """Buffers recorded steps and writes them as numbered ``.npz`` chunks under ``directory``.

    ``moe_layers`` is the number of MoE layers or their names, in execution order.
    A chunk is written once ``tokens_per_chunk`` tokens are buffered; a step never
    spans two chunks. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        num_experts: int,
        top_k: int,
        moe_layers: int | Sequence[str],
        *,
        tokens_per_chunk: int = 16384,
        bytes_per_expert: int | None = None,
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (num_experts), got {top_k}")
        if tokens_per_chunk < 1:
            raise ValueError(f"tokens_per_chunk must be >= 1, got {tokens_per_chunk}")
        layer_names = (
            [str(i) for i in range(moe_layers)] if isinstance(moe_layers, int) else [str(n) for n in moe_layers]
        )
        if not layer_names:
            raise ValueError(f"a trace needs at least one MoE layer, got moe_layers={moe_layers!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Appending to an old trace would mix runs under one step numbering.
        existing = sorted(self.directory.glob(f"{CHUNK_PREFIX}*{CHUNK_SUFFIX}"))
        if existing:
            raise FileExistsError(f"trace directory {self.directory} already holds chunks ({existing[0].name}, ...)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer_names = layer_names
        self.tokens_per_chunk = tokens_per_chunk
        self.bytes_per_expert = bytes_per_expert
        self.chunks_written = 0
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered_tokens = 0
        self._last_step: int | None = None
        self._closed = False

    def record_step(
        self,
        step_id: int,
        request_ids: Sequence[str],
        positions: Sequence[int] | np.ndarray | torch.Tensor,
        topk_ids: np.ndarray | torch.Tensor,
    ) -> None:
        """Buffer one engine step.

        topk_ids: ``[num_tokens, num_layers, top_k]`` int, global expert ids, tokens in
        execution order; request_ids and positions: ``[num_tokens]``. Step ids must
        increase from call to call.
        """
        if self._closed:
            raise RuntimeError(f"trace writer for {self.directory} is closed")
        step_id = int(step_id)
        if self._last_step is not None and step_id <= self._last_step:
            raise ValueError(f"step ids must increase: got {step_id} after {self._last_step}")
        ids = _to_numpy(topk_ids).astype(np.int32, copy=False)
        num_tokens = ids.shape[0] if ids.ndim else 0
        request_array = np.asarray([str(r) for r in request_ids], dtype=np.str_)
        position_array = _to_numpy(positions).astype(np.int32, copy=False)
        step_array = np.full((num_tokens,), step_id, dtype=np.int32)
        _check_token_arrays(
            ids, step_array, request_array, position_array, self.num_experts, self.top_k, len(self.layer_names)
        )
        self._last_step = step_id
        if num_tokens == 0:
            return
        # Copies: callers may reuse their buffers for the next step.
        self._buffer.append((ids.copy(), step_array, request_array, position_array.copy()))
        self._buffered_tokens += num_tokens
        if self._buffered_tokens >= self.tokens_per_chunk:
            self.flush()

    def flush(self) -> None:
        """Write the buffered steps as the next chunk; no-op when nothing is buffered."""
        if not self._buffer:
            return
        ids, steps, requests, positions = (np.concatenate(parts) for parts in zip(*self._buffer, strict=True))
        path = self.directory / f"{CHUNK_PREFIX}{self.chunks_written:06d}{CHUNK_SUFFIX}"
        arrays: dict[str, Any] = {
            "topk_ids": ids,
            "step_id": steps,
            "request_id": requests,
            "position": positions,
            "format_version": np.int32(FORMAT_VERSION),
            "num_experts": np.int32(self.num_experts),
            "top_k": np.int32(self.top_k),
            "layer_names": np.asarray(self.layer_names, dtype=np.str_),
        }
        if self.bytes_per_expert is not None:
            arrays["bytes_per_expert"] = np.int64(self.bytes_per_expert)
        # Write then rename, so a reader of a live trace never sees half a chunk.
        tmp_path = path.with_name(path.name + ".tmp")
        with open(tmp_path, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp_path, path)
        self.chunks_written += 1
        self._buffer.clear()
        self._buffered_tokens = 0

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_trace(path: str | os.PathLike[str]) -> RoutingTrace:
    """Read a trace directory (all its chunks, in order) or a single ``.npz`` chunk."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"{CHUNK_PREFIX}*{CHUNK_SUFFIX}"))
        if not files:
            raise FileNotFoundError(f"no trace chunks ({CHUNK_PREFIX}NNNNNN{CHUNK_SUFFIX}) in directory {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"trace not found: {path} is neither a trace directory nor an .npz file")
    chunks = [_read_chunk(f) for f in files]
    meta = chunks[0][1]
    for file, (_, other) in zip(files[1:], chunks[1:], strict=True):
        if other != meta:
            raise ValueError(f"trace chunk {file} has metadata {other}, but {files[0]} has {meta}")
    arrays = [c[0] for c in chunks]
    return RoutingTrace(
        topk_ids=np.concatenate([a["topk_ids"] for a in arrays]),
        step_id=np.concatenate([a["step_id"] for a in arrays]),
        request_id=np.concatenate([a["request_id"] for a in arrays]),
        position=np.concatenate([a["position"] for a in arrays]),
        num_experts=meta["num_experts"],
        top_k=meta["top_k"],
        layer_names=list(meta["layer_names"]),
        bytes_per_expert=meta.get("bytes_per_expert"),
    )


def _read_chunk(file: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    # allow_pickle=False: a trace is data, and object arrays could run code when loaded.
    with np.load(file, allow_pickle=False) as data:
        missing = [k for k in ("topk_ids", "step_id", "request_id", "position", *_METADATA_KEYS) if k not in data]
        if missing:
            raise ValueError(f"{file} is not a routing trace chunk: missing {missing}")
        version = int(data["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"{file} has trace format version {version}; this reader supports {FORMAT_VERSION}")
        meta: dict[str, Any] = {
            "num_experts": int(data["num_experts"]),
            "top_k": int(data["top_k"]),
            "layer_names": tuple(str(n) for n in data["layer_names"]),
        }
        if "bytes_per_expert" in data:
            meta["bytes_per_expert"] = int(data["bytes_per_expert"])
        arrays = {
            "topk_ids": data["topk_ids"].astype(np.int32, copy=False),
            "step_id": data["step_id"].astype(np.int32, copy=False),
            "request_id": data["request_id"],
            "position": data["position"].astype(np.int32, copy=False),
        }
    return arrays, meta


def _to_numpy(x: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_token_arrays(
    topk_ids: np.ndarray,
    step_id: np.ndarray,
    request_id: np.ndarray,
    position: np.ndarray,
    num_experts: int,
    top_k: int,
    num_layers: int,
) -> None:
    if topk_ids.ndim != 3 or topk_ids.shape[1:] != (num_layers, top_k):
        raise ValueError(
            f"topk_ids must be [num_tokens, {num_layers} (layers), {top_k} (top_k)], got shape {tuple(topk_ids.shape)}"
        )
    num_tokens = topk_ids.shape[0]
    for name, array in (("step_id", step_id), ("request_id", request_id), ("position", position)):
        if array.shape != (num_tokens,):
            raise ValueError(f"{name} must be [{num_tokens}] (one per token), got shape {tuple(array.shape)}")
    if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= num_experts):
        raise ValueError(
            f"topk_ids hold expert ids {int(topk_ids.min())}..{int(topk_ids.max())}, valid ids are 0..{num_experts - 1}"
        )

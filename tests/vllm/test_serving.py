"""`vllm serve` with the offload flags: concurrent completions and chats, then /metrics."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO, run_generate
from vllm_expertflow.tiny_models import build_tokenizer, sample_prompts

pytestmark = pytest.mark.vllm

MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    model = tiny_models["qwen3_moe"]
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    vllm_cli = Path(sys.executable).parent / "vllm"
    cmd = [str(vllm_cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--enable-expert-offload", "--expert-cache-slots", "4", "--enforce-eager", "--dtype", "bfloat16",
           "--max-model-len", "512", "--seed", "0"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-6000:]}")
            try:
                get(f"{base}/health")
                break
            except OSError:
                if time.time() > deadline:
                    proc.kill()
                    raise AssertionError(f"server did not start:\n{log_path.read_text()[-6000:]}") from None
                time.sleep(1)
        yield base, model, log_path
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_concurrent_requests_match_offline_and_metrics_count_them(server, tmp_path):
    base, model, log_path = server
    completions = sample_prompts(8, seed=7)
    chats = [[{"role": "user", "content": p}] for p in sample_prompts(8, seed=8)]
    tokenizer = build_tokenizer()
    chat_prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]

    def complete(prompt):
        body = {"model": str(model), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}
        return post(f"{base}/v1/completions", body)["choices"][0]["text"]

    def chat(messages):
        body = {"model": str(model), "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}
        return post(f"{base}/v1/chat/completions", body)["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        completion_futures = [pool.submit(complete, p) for p in completions]
        chat_futures = [pool.submit(chat, c) for c in chats]
        served = [f.result() for f in completion_futures] + [f.result() for f in chat_futures]

    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(completions + chat_prompts))
    [offline] = run_generate(model, [{"name": "offline", "offload": {"enabled": True, "cache_slots": 4}}],
                             tmp_path=tmp_path, extra_args=["--prompts-file", str(prompts_file),
                                                            "--max-tokens", str(MAX_TOKENS)])
    assert served == offline["texts"]

    assert "expert offload: 4 MoE layers, 16 experts per layer (top_k 2)" in log_path.read_text()

    pattern = re.compile(r'^vllm_expertflow_cache_(\w+)_total\{layer="([^"]+)"\} ([0-9.e+]+)$', re.M)
    deadline = time.time() + 10
    while True:
        counters: dict[str, dict[str, float]] = {}
        for name, layer, value in pattern.findall(get(f"{base}/metrics")):
            counters.setdefault(name, {})[layer] = float(value)
        loads = counters.get("loads", {})
        if len(loads) == 4 and sum(counters["hits"].values()) + sum(counters["misses"].values()) > 0:
            break
        assert time.time() < deadline, f"no expert cache metrics: {counters}"
        time.sleep(0.5)
    bytes_per_expert = 3 * 128 * 96 * 2  # gate, up and down projections in bf16
    for layer, count in loads.items():
        assert counters["bytes_loaded"][layer] == count * bytes_per_expert
        assert counters["misses"][layer] == count  # every miss is one load
    assert set(counters) >= {"hits", "misses", "loads", "bytes_loaded", "evictions"}

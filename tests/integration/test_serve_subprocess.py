"""`bot serve` on the real embedded backbone and the committed adapters, as a user runs it.

Starts `bot serve --precision fp32` in a subprocess on a free port and talks to it with
the `openai` client.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import REPO, run_concurrently

pytestmark = pytest.mark.integration
ROOT = REPO
KEY = "integration-key"


def _command() -> list[str]:
    script = Path(sys.executable).parent / "bot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bot.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = _command() + ["serve", "--port", str(port), "--precision", "fp32", "--api-key", KEY,
                        "--adapters-dir", str(ROOT / "adapters")]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                pytest.fail(f"bot serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"bot serve did not start:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def ask(client, model, text, **kw):
    return client.chat.completions.create(model=model, temperature=0,
                                          messages=[{"role": "user", "content": text}], **kw)


def test_models_and_auto_routing(client):
    ids = {m.id for m in client.models.list().data}
    assert {"SmolLM2-135M-Instruct", "chat", "topic", "sentiment", "auto"} <= ids
    raw = client.chat.completions.with_raw_response.create(
        model="auto", temperature=0,
        messages=[{"role": "user", "content": "The battery died after one day. Awful product."}])
    assert raw.headers["x-bot-adapter"] == "sentiment"
    body = json.loads(raw.text)
    assert body["bot"]["route"]["runner_up"] and body["bot"]["label_scores"]["negative"] > 0.5
    assert "negative" in body["choices"][0]["message"]["content"]


def test_base_model_answers_a_question(client):
    reply = ask(client, "SmolLM2-135M-Instruct", "What is the capital of France?", max_tokens=24)
    assert "Paris" in reply.choices[0].message.content


def test_streamed_chat_equals_the_full_reply(client):
    full = ask(client, "chat", "Hi! How was your weekend?", max_tokens=20)
    pieces = [c.choices[0].delta.content or "" for c in
              ask(client, "chat", "Hi! How was your weekend?", max_tokens=20, stream=True)
              if c.choices]
    assert "".join(pieces) == full.choices[0].message.content and full.choices[0].message.content


def test_sixteen_concurrent_clients_match_sequential_fp32(client):
    models = ["chat", "SmolLM2-135M-Instruct", "sentiment", "topic"] * 4
    texts = [f"{t} (case {i})" for i, t in enumerate(
        ["Tell me about your favourite food", "Name three colours",
         "I really enjoyed this film, the acting was superb", "Shares in the bank fell sharply"] * 4)]
    sequential = [ask(client, m, t, max_tokens=16).choices[0].message.content
                  for m, t in zip(models, texts)]
    got = run_concurrently(
        lambda i: ask(client, models[i], texts[i], max_tokens=16).choices[0].message.content, 16)
    assert None not in got, "a request was lost"
    assert got == sequential


def test_classify_endpoint(server):
    r = httpx.post(server + "/v1/classify", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "topic", "input": ["Chelsea won the league title on Sunday",
                                                     "The central bank raised interest rates"]})
    assert r.status_code == 200
    assert [d["label"] for d in r.json()["data"]] == ["sport", "business"]

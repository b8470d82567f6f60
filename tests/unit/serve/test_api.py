"""`bot serve`'s HTTP API on a tiny model, driven with the real `openai` client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from helpers import HashEncoder, run_concurrently, spread_backbone

from bot import Router
from bot.engine import Scheduler
from bot.manifests.spec import AdapterSpec
from bot.serve.server import BackgroundServer
from bot.serve.state import ServerState
from bot.tasks.classify import ClassifyTask
from bot.tasks.generate import GenerateTask

KEY = "test-key"


def build_state(tmp_path, api_key=KEY, max_queue=64, max_batch=8) -> ServerState:
    from peft import LoraConfig

    bb = spread_backbone()
    tasks = {}
    for name in ("a", "b"):
        spec = AdapterSpec.from_dict({"name": name, "kind": "generate", "template": ""},
                                     tmp_path / name / "adapter.yaml")
        tasks[name] = GenerateTask(spec, bb)
    spec = AdapterSpec.from_dict({"name": "mood", "kind": "classify", "labels": ["sad", "happy"],
                                  "reply_template": "Sounds {label} ({score:.2f})."},
                                 tmp_path / "mood" / "adapter.yaml")
    bb.add_adapter("mood", LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    tasks["mood"] = ClassifyTask(spec, bb)
    router = Router(HashEncoder(), per_adapter_k=3)
    router.add_route("a", ["hello how are you", "tell me a joke", "good morning friend"])
    router.add_route("mood", ["i loved this movie", "terrible product awful", "great phone"])
    sched = Scheduler(bb, {"mood": tasks["mood"]}, ["a", "b"], precision="fp32",
                      max_batch=max_batch, max_queue=max_queue, max_len=256)
    sched.eos = set()  # tiny random model: run full lengths
    return ServerState(bb, tasks, sched, router, api_key, default_max_tokens=16)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = build_state(tmp_path_factory.mktemp("serve"))
    with BackgroundServer(state) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat(client, model, text="hello there", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=0, **kw)


def test_models_lists_base_adapters_and_auto(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-spread", "a", "b", "mood", "auto"}
    assert models["a"].parent == "tiny-spread" and models["mood"].parent == "tiny-spread"
    assert models["tiny-spread"].parent is None


def test_chat_on_adapter_base_and_stream_agree(client):
    for model in ("a", "tiny-spread"):
        full = chat(client, model, max_tokens=10)
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
        pieces = [c.choices[0].delta.content or "" for c in
                  chat(client, model, max_tokens=10, stream=True) if c.choices]
        assert "".join(pieces) == full.choices[0].message.content
    assert chat(client, "a").choices[0].message.content != chat(client, "b").choices[0].message.content


def test_auto_routes_and_explains(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", temperature=0, messages=[{"role": "user", "content": "i loved this movie"}])
    assert raw.headers["x-bot-adapter"] == "mood"
    body = json.loads(raw.text)
    assert body["bot"]["route"]["adapter"] == "mood" and body["bot"]["route"]["runner_up"] == "a"
    assert set(body["bot"]["label_scores"]) == {"sad", "happy"}
    assert body["choices"][0]["message"]["content"].startswith("Sounds ")
    gen = client.chat.completions.with_raw_response.create(
        model="auto", temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": "hello how are you"}])
    assert gen.headers["x-bot-adapter"] == "a"


def test_classify_endpoint_batches_texts(server):
    r = httpx.post(server.url + "/v1/classify", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "mood", "input": ["good", "bad", "fine"]})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert all(abs(sum(d["probs"]) - 1) < 1e-5 and d["label"] in ("sad", "happy") for d in data)


def test_errors_have_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "nope")
    assert "available" in err.value.message
    with pytest.raises(openai.AuthenticationError):
        chat(openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0), "a")
    with pytest.raises(openai.BadRequestError, match="context limit of 256"):
        chat(client, "a", text="word " * 300)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="a", temperature=7,
                                       messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_load_and_unload_an_adapter(tmp_path, server, client):
    bb = server.state.backbone
    bb.save_adapter("b", tmp_path / "b2")  # a plain peft folder, as vLLM users have
    before = chat(client, "b", max_tokens=6).choices[0].message.content
    r = httpx.post(server.url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"},
                   json={"lora_name": "b2", "lora_path": str(tmp_path / "b2")})
    assert r.status_code == 200, r.text
    assert "b2" in {m.id for m in client.models.list().data}
    assert chat(client, "b2", max_tokens=6).choices[0].message.content == before
    r = httpx.post(server.url + "/v1/unload_lora_adapter", headers={"Authorization": f"Bearer {KEY}"},
                   json={"lora_name": "b2"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "b2")
    bad = httpx.post(server.url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"},
                     json={"lora_name": "x", "lora_path": str(tmp_path / "missing")})
    assert bad.status_code == 400 and "missing" in bad.json()["error"]["message"]


def test_load_needs_an_api_key(tmp_path):
    state = build_state(tmp_path, api_key=None)
    with BackgroundServer(state) as srv:
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
        # without a key, chat needs none
        assert httpx.get(srv.url + "/v1/models").status_code == 200


def test_queue_full_is_429_with_retry_after(tmp_path):
    state = build_state(tmp_path, max_queue=2, max_batch=1)
    gate = threading.Event()
    with BackgroundServer(state) as srv:
        state.scheduler.call(lambda: None)
        from concurrent.futures import Future

        state.scheduler._jobs.append((gate.wait, Future()))  # hold the scheduler between steps
        body = {"model": "a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        hdr = {"Authorization": f"Bearer {KEY}"}
        first = [threading.Thread(target=httpx.post, args=(srv.url + "/v1/chat/completions",),
                                  kwargs={"json": body, "headers": hdr, "timeout": 30})
                 for _ in range(2)]
        for t in first:
            t.start()
        while state.scheduler.in_flight() < 2:
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=hdr)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "limit 2" in r.json()["error"]["message"]
        gate.set()
        for t in first:
            t.join()


def test_sixteen_concurrent_clients_equal_their_sequential_answers(server, client):
    models = ["a", "b", "tiny-spread", "a"] * 4
    texts = [f"request number {i} about {'cats ' * (i % 5)}" for i in range(16)]
    sequential = [chat(client, m, t, max_tokens=12).choices[0].message.content
                  for m, t in zip(models, texts)]
    got = run_concurrently(
        lambda i: chat(client, models[i], texts[i], max_tokens=12).choices[0].message.content, 16, 60)
    assert got == sequential


def test_metrics_and_health(server, client):
    chat(client, "a", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    assert 'bot_requests_total{endpoint="/v1/chat/completions",model="a",status="200"}' in text
    assert "bot_batch_size_bucket" in text and "bot_time_to_first_token_seconds" in text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_classify_accepts_raw_or_templated_input(server):
    """A vLLM client sends the template filled in; bot serve must not apply it twice."""
    from bot.serve.api import _untemplated

    assert _untemplated("Review: {text}\nLabel:", "Review: great\nLabel:") == "great"
    assert _untemplated("Review: {text}\nLabel:", "great") == "great"
    assert _untemplated("{text}", "Review: x") == "Review: x"
    task = server.state.scheduler.classifiers["mood"]
    task.spec.template = "Mood of: {text}"
    hdr = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.post(server.url + "/v1/classify", headers=hdr, json={"model": "mood", "input": "good"})
    filled = httpx.post(server.url + "/v1/classify", headers=hdr,
                        json={"model": "mood", "input": "Mood of: good"})
    task.spec.template = "{text}"
    assert raw.json()["data"][0]["probs"] == filled.json()["data"][0]["probs"]


def test_a_client_that_disconnects_frees_its_row(server):
    body = {"model": "a", "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "go on and on"}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # one token arrived: the request is decoding; now hang up
    sched = server.state.scheduler
    for _ in range(200):
        if sched.in_flight() == 0:
            break
        time.sleep(0.05)
    assert sched.in_flight() == 0, "the disconnected request kept its row"
    text = httpx.get(server.url + "/metrics").text
    assert 'bot_request_seconds_count{model="a",outcome="cancelled"}' in text, \
        "the request ran to its end instead of being cancelled"

"""Issue 28: no request can stall or bloat `bot serve`, and bad input never gets a 500.

A real server over loopback on the tiny random model (helpers.make_state), with small limits
so that every refusal and timeout is reached in about a second.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from helpers import (
    AUTH,
    KEY,
    MAX_LEN,
    assert_openai_error,
    connect,
    make_state,
    metric,
    post,
    read_all,
    request_head,
    slow_steps,
    wait_until,
)

from bot.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with BackgroundServer(make_state(tmp_path_factory.mktemp("rel"))) as srv:
        yield srv


def chat_body(text="hello there", **kw):
    return {"model": "a", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **kw}


# ------------------------------------------------------------------ item 1
def test_1_classify_past_the_input_cap_is_400_naming_cap_and_fix(server):
    r = post(server, "/v1/classify", {"model": "mood", "input": [f"text {i}" for i in range(9)]})
    assert_openai_error(r, 400, "9 texts", "limit of 8", "--max-classify-inputs", "Fix",
                        param="input")
    ok = post(server, "/v1/classify", {"model": "mood", "input": [f"text {i}" for i in range(8)]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 8


def test_1_classify_work_counts_toward_the_queue(tmp_path):
    state = make_state(tmp_path, max_queue=2)
    gate = threading.Event()
    with BackgroundServer(state) as srv:
        holder = threading.Thread(target=state.scheduler.call, args=(gate.wait,))
        holder.start()  # the engine thread waits on the gate: nothing is answered meanwhile
        body = {"model": "mood", "input": ["good", "bad"]}
        waiting = [threading.Thread(target=post, args=(srv, "/v1/classify", body)) for _ in range(2)]
        for t in waiting:
            t.start()
        assert wait_until(lambda: state.scheduler.in_flight() == 2)
        r = post(srv, "/v1/classify", body)
        gate.set()
        for t in [holder, *waiting]:
            t.join(30)
    assert_openai_error(r, 429, "limit 2")
    assert r.headers["retry-after"] == "1"


def test_1_classify_of_a_client_that_left_is_dropped(tmp_path):
    state = make_state(tmp_path)
    gate = threading.Event()
    with BackgroundServer(state) as srv:
        holder = threading.Thread(target=state.scheduler.call, args=(gate.wait,))
        holder.start()
        body = json.dumps({"model": "mood", "input": ["one", "two", "three"]}).encode()
        sock = connect(srv)
        sock.sendall(request_head(srv, "/v1/classify", len(body)) + body)
        assert wait_until(lambda: state.scheduler.in_flight() == 1)
        sock.close()
        time.sleep(0.5)  # the server notices between its polls (every 0.05 s)
        gate.set()
        holder.join(30)
        assert wait_until(lambda: state.scheduler.in_flight() == 0)
        assert wait_until(lambda: metric(srv, 'bot_requests_total{endpoint="/v1/classify",'
                                              'model="mood",status="499"}') == 1)
        assert metric(srv, "bot_classified_texts_total") == 0, "texts classified for nobody"


# ------------------------------------------------------------------ item 2
def test_2_a_body_over_the_limit_is_413_before_it_is_read(server):
    sock = connect(server)
    sock.sendall(request_head(server, "/v1/chat/completions", 50 * 1024 * 1024) + b"{" * 1000)
    t0 = time.monotonic()
    reply = read_all(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert time.monotonic() - t0 < 2, "the server read on instead of refusing at the headers"
    err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["type"] == "invalid_request_error" and "65,536 bytes" in err["message"]
    assert "--max-body-bytes" in err["message"]


def test_2_a_chunked_body_is_counted_as_it_arrives(server):
    big = b'{"model": "a", "messages": [' + b" " * 80_000 + b"]}"
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                   content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]))
    assert_openai_error(r, 413, "--max-body-bytes")


def test_2_characters_are_checked_before_tokenizing(server, monkeypatch):
    calls = []
    real = server.state.prompt_ids
    monkeypatch.setattr(server.state, "prompt_ids", lambda *a: calls.append(1) or real(*a))
    r = post(server, "/v1/chat/completions", chat_body("x" * 9000))
    assert_openai_error(r, 400, "9,00", "limit of 8,192", "--max-input-chars", param="messages")
    r = post(server, "/v1/chat/completions",
             {"model": "a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}] * 300})
    assert_openai_error(r, 400, "300 messages", param="messages")
    assert calls == [], "the chat template ran on a request that was going to be refused"
    ok = post(server, "/v1/chat/completions", chat_body("x" * 100))
    assert ok.status_code == 200 and calls == [1]


@pytest.mark.slow
def test_2_tokenizing_runs_off_the_event_loop(server, monkeypatch):
    real = server.state.prompt_ids

    def slow(*args):
        time.sleep(1.5)  # a huge chat template: blocking, as apply_chat_template is
        return real(*args)

    monkeypatch.setattr(server.state, "prompt_ids", slow)
    done = threading.Thread(target=post, args=(server, "/v1/chat/completions", chat_body()))
    done.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    waited = time.monotonic() - t0
    done.join(30)
    assert waited < 0.5, f"/health waited {waited:.2f} s behind a chat template"


# ------------------------------------------------------------------ item 3


@pytest.mark.parametrize("stream", [False, True])
def test_3_a_client_that_disconnects_frees_its_row_within_a_step(tmp_path, monkeypatch, stream):
    state = make_state(tmp_path)
    sched = state.scheduler
    slow_steps(monkeypatch, sched)
    with BackgroundServer(state) as srv:
        body = json.dumps(chat_body("go on", max_tokens=200, stream=stream)).encode()
        sock = connect(srv)
        sock.sendall(request_head(srv, "/v1/chat/completions", len(body)) + body)
        assert wait_until(lambda: sched.steps >= 10), "the request never started decoding"
        sock.close()
        at_close = sched.steps
        assert wait_until(lambda: sched.in_flight() == 0, 5, 0.002)
        after = sched.steps - at_close
        assert after <= 3, f"the row decoded {after} more steps after its client left"
        assert wait_until(lambda: metric(srv, 'bot_requests_total{endpoint="/v1/chat/completions",'
                                              'model="a",status="499"}') == 1)
        assert metric(srv, 'bot_request_seconds_count{model="a",outcome="cancelled"}') == 1


# ------------------------------------------------------------------ item 4
BAD_BODIES = {
    "text part is a number": {"model": "a", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": 123}]}]},
    "text part is null": {"model": "a", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": None}]}]},
    "content is a number": {"model": "a", "max_tokens": 2, "messages": [
        {"role": "user", "content": 5}]},
    "huge seed": chat_body(seed=10 ** 23, temperature=0.7),
    "seed below int64": chat_body(seed=-(10 ** 23), temperature=0.7),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_4_inputs_that_were_500_are_400(server, name):
    r = post(server, "/v1/chat/completions", BAD_BODIES[name])
    err = assert_openai_error(r, 400)
    assert err["param"] and err["param"].startswith(("messages", "seed")), err


@pytest.mark.parametrize("model", ["a", "auto"])
def test_4_a_lone_surrogate_in_chat_is_400(server, model):
    raw = '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    r = post(server, "/v1/chat/completions", raw % model)
    assert_openai_error(r, 400, "surrogate", "Fix")


def test_4_a_lone_surrogate_in_classify_is_400(server):
    r = post(server, "/v1/classify", '{"model": "mood", "input": ["ok", "\\udc00 bad"]}')
    assert_openai_error(r, 400, "surrogate")


def test_4_the_largest_seeds_still_sample(server):
    for seed in (2 ** 64 - 1, -(2 ** 63)):
        r = post(server, "/v1/chat/completions", chat_body(seed=seed, temperature=0.7))
        assert r.status_code == 200, r.text


def test_4_an_unexpected_error_is_openai_shaped_and_counted(server, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(server.state, "model_cards", broken)
    r = httpx.get(server.url + "/v1/models", headers=AUTH)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert "boom" not in err["message"], "internal details belong in the log, not the answer"
    assert metric(server, 'bot_unexpected_errors_total{endpoint="/v1/models",'
                          'error="RuntimeError"}') == 1
    assert metric(server, 'bot_requests_total{endpoint="/v1/models",model="-",status="500"}') == 1


# ------------------------------------------------------------------ item 5
def _base_kind_folder(tmp_path):
    folder = tmp_path / "assistant-copy"
    folder.mkdir()
    (folder / "adapter.yaml").write_text("name: assistant\nkind: base\ndescription: the bare model\n")
    return folder


@pytest.mark.parametrize("name,words", [("../../evil", "lora_name"), ("evil", "kind"),
                                        ("auto", "reserved"), ("mood", "already loaded")])
def test_5_a_refused_load_leaves_no_trace(server, tmp_path, name, words):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": name,
                                               "lora_path": str(_base_kind_folder(tmp_path))})
    assert_openai_error(r, 400, words)
    models = httpx.get(server.url + "/health").json()["models"]
    assert models.count(name) == (1 if name in ("mood", "auto") else 0), models
    if name not in ("mood", "auto"):
        gone = post(server, "/v1/chat/completions", {**chat_body(), "model": name})
        assert gone.status_code == 404


def test_5_a_load_that_fails_half_way_is_undone(tmp_path, monkeypatch):
    state = make_state(tmp_path)
    state.backbone.save_adapter("a", tmp_path / "a2")  # a plain peft folder

    def refuse(name, task=None):
        raise RuntimeError("the engine refused it")

    with BackgroundServer(state) as srv:
        monkeypatch.setattr(state.scheduler, "add_adapter", refuse)
        r = post(srv, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": str(tmp_path / "a2")})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "a2" not in httpx.get(srv.url + "/health").json()["models"]
        assert "a2" not in state.tasks and "a2" not in state.backbone.adapters
        monkeypatch.undo()
        again = post(srv, "/v1/load_lora_adapter", {"lora_name": "a2",
                                                    "lora_path": str(tmp_path / "a2")})
        assert again.status_code == 200, again.text  # nothing left behind blocks the name


# ------------------------------------------------------------------ item 6
def test_6_unknown_models_share_one_metrics_label(server):
    before = len(httpx.get(server.url + "/metrics").text)
    for i in range(40):
        r = post(server, "/v1/chat/completions", {**chat_body(), "model": f"m{i}-" + "x" * 2000})
        assert r.status_code == 404
        assert len(r.json()["error"]["message"]) < 400, "the 2 KB name was echoed whole"
    for i in range(10):
        httpx.post(server.url + f"/v1/nothing-{i}", headers=AUTH)
    text = httpx.get(server.url + "/metrics").text
    assert "xxxxxxxx" not in text and "nothing-" not in text
    assert len(text) - before < 2000, f"/metrics grew {len(text) - before} bytes"
    assert metric(server, 'bot_requests_total{endpoint="/v1/chat/completions",'
                          'model="(unknown)",status="404"}') >= 40


# ------------------------------------------------------------------ item 9
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_9_max_tokens_zero_is_400(server, field):
    body = chat_body()
    del body["max_tokens"]
    r = post(server, "/v1/chat/completions", {**body, field: 0})
    assert_openai_error(r, 400, f"{field} must be at least 1", param=field)


def test_9_a_missing_max_tokens_is_the_rest_of_the_context(server):
    prompt = "word " * 40  # 200 byte tokens + the template: no room left for 256 more
    r = post(server, "/v1/chat/completions",
             {"model": "a", "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_LEN
    assert r.json()["choices"][0]["finish_reason"] == "length"
    full = post(server, "/v1/chat/completions", chat_body("w" * 300))
    assert_openai_error(full, 400, "context limit of 256", param="messages")


# ------------------------------------------------------------------ item 10
@pytest.mark.slow
def test_10_half_sent_headers_are_closed_after_the_header_timeout(server):
    sock = connect(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
    t0 = time.monotonic()
    reply = read_all(sock, limit_s=6)
    sock.close()
    waited = time.monotonic() - t0
    assert 0.8 < waited < 3, f"closed after {waited:.1f} s (header timeout 1 s)"
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]


@pytest.mark.slow
def test_10_a_silent_connection_is_closed_too(server):
    sock = connect(server)
    t0 = time.monotonic()
    read_all(sock, limit_s=6)
    sock.close()
    assert time.monotonic() - t0 < 3


@pytest.mark.slow
def test_10_half_sent_bodies_get_408_after_the_body_timeout(server):
    socks = [connect(server) for _ in range(5)]
    for s in socks:
        s.sendall(request_head(server, "/v1/chat/completions", 1000) + b'{"model": "a", ')
    t0 = time.monotonic()
    replies = [read_all(s, limit_s=6) for s in socks]
    for s in socks:
        s.close()
    assert time.monotonic() - t0 < 4
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert b"--body-timeout" in reply and b"connection: close" in reply.lower()


@pytest.mark.slow
def test_10_an_idle_keep_alive_connection_is_closed(server):
    sock = connect(server)
    sock.sendall(f"GET /health HTTP/1.1\r\nHost: {server.url[7:]}\r\n\r\n".encode())
    t0 = time.monotonic()
    reply = read_all(sock, limit_s=6)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200")
    assert time.monotonic() - t0 < 3, "an idle keep-alive connection stayed open"


# ------------------------------------------------------------------ minor items
def test_minor_405_is_an_invalid_request(server):
    r = httpx.get(server.url + "/v1/chat/completions", headers=AUTH)
    err = assert_openai_error(r, 405, "GET", "POST")
    assert err["code"] == "method_not_allowed"


def test_minor_malformed_json_names_no_character_offset(server):
    r = post(server, "/v1/chat/completions", '{"model": "a", "messages": [')
    err = assert_openai_error(r, 400, "not valid JSON", "Fix")
    assert err["param"] is None
    r = post(server, "/v1/chat/completions", '[1, 2]')
    assert_openai_error(r, 400, "JSON object", param=None)


def test_minor_a_long_stop_string_is_refused(server):
    r = post(server, "/v1/chat/completions", chat_body(stop="s" * 50_000))  # (1 MB: the body limit)
    assert_openai_error(r, 400, "stop string", "at most 128", param="stop")
    ok = post(server, "/v1/chat/completions", chat_body(stop=["s" * 128]))
    assert ok.status_code == 200


def test_minor_the_api_key_is_compared_in_constant_time(server, monkeypatch):
    import hmac

    import bot.serve.limits as limits

    seen, real = [], hmac.compare_digest
    monkeypatch.setattr(limits.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}
                     ).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
    assert seen == [(b"Bearer nope", f"Bearer {KEY}".encode()), (f"Bearer {KEY}".encode(),) * 2]


def test_minor_api_key_help_points_to_the_environment_variable(capsys):
    from bot.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "BOT_API_KEY" in text and "`ps`" in text
    for flag in ("--max-body-bytes", "--max-input-chars", "--max-classify-inputs",
                 "--header-timeout", "--body-timeout", "--keep-alive-timeout"):
        assert flag in text

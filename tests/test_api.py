"""`moemesh api` (OpenAI-compatible HTTP), its metrics and dashboard, and `moemesh chat`.

The slow tests run a live local swarm of the tiny test model, give it a small word-level
tokenizer with a chat template (built offline), and drive the API with the official
`openai` package: what it answers must be exactly what the SDK generates for the same seed.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.api.decode import Detokenizer, StopMatcher
from node.client import Client, Sampling
from node.testing.launch import event_of, local_swarm, start_daemon

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


# -- a tokenizer for the tiny model -----------------------------------------------------------


def _words() -> list[str]:
    """256 entries (the tiny model's vocabulary): specials, roles, then plain words."""
    common = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
    words = SPECIALS + ROLES + common
    return words + [f"w{i}" for i in range(256 - len(words))]


def with_tokenizer(model: Path, folder: Path) -> Path:
    """A copy of `model` with a word-level tokenizer.json and a chat template (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    shutil.copytree(model, folder)
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(_words())}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# -- pure pieces: no swarm --------------------------------------------------------------------


class _Utf8Bytes:
    """A byte-level codec: token i is byte i, so a character can span several tokens."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_waits_for_whole_characters_and_joins_to_the_whole_text() -> None:
    text = "héllo → wörld ✓"
    ids = list(text.encode())
    detokenizer = Detokenizer(_Utf8Bytes())
    pieces = [detokenizer.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detokenizer.flush() == text
    assert pieces[1] == "" and pieces[2] == "é"  # the two bytes of é: nothing, then the character


def test_stop_strings_cut_the_text_and_never_show_half_of_one() -> None:
    stops = StopMatcher(["END", "\n\n"])
    shown = [stops.feed(p) for p in ["hello E", "N", "D more"]]
    assert shown == ["hello ", "", ""] and stops.stopped
    stops = StopMatcher(["END"])
    shown = [stops.feed(p) for p in ["an E", "ND", "x"]]
    assert "".join(shown) == "an " and stops.stopped
    stops = StopMatcher(["END"])
    shown = [stops.feed(p) for p in ["an E", "lephant"]]
    assert shown == ["an ", "Elephant"] and not stops.stopped
    assert stops.feed("E") == "" and stops.flush() == "E"  # the end of the text: hold nothing back


def test_render_chat_of_one_turn_is_the_sdk_chat_prompt(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from node.client.text import TextCodec

    codec = TextCodec(with_tokenizer(tiny_models["mixtral"], tmp_path / "m"))
    one = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the a"}]
    assert codec.render_chat(one) == codec.chat_prompt("the a", system="be brief")
    two = [*one, {"role": "assistant", "content": "of to"}, {"role": "user", "content": "and"}]
    assert codec.render_chat(two).startswith(codec.render_chat(one, add_generation_prompt=False))


def test_the_api_does_not_import_torch() -> None:
    code = "import sys, node.api, node.cli.chat; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shaped(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


def test_bad_requests_are_refused_before_the_swarm_is_asked(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Validation needs no swarm: a swarm that is not there answers 503, also OpenAI-shaped."""
    from starlette.testclient import TestClient

    from node.api import ApiConfig, Relay, SwarmView, build_app

    client = Client(["127.0.0.1:9"], model_folder=with_tokenizer(tiny_models["mixtral"], tmp_path / "m"))
    app = build_app(Relay(client, ApiConfig()), SwarmView(client, (), ["127.0.0.1:9"], 0.0))
    with TestClient(app) as http:
        chat = "/v1/chat/completions"
        _shaped(http.post(chat, content=b"{not json"), 400)
        _shaped(http.post(chat, json=[1, 2]), 400)
        _shaped(http.post(chat, json={"model": "m"}), 400, "messages")
        _shaped(http.post(chat, json={"model": "m", "messages": []}), 400, "messages")
        _shaped(http.post(chat, json={"model": "m", "messages": [{"role": "robot", "content": "hi"}]}), 400)
        good = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        _shaped(http.post(chat, json={**good, "max_tokens": -1}), 400, "max_tokens")
        _shaped(http.post(chat, json={**good, "temperature": 3}), 400, "temperature")
        _shaped(http.post(chat, json={**good, "n": 2}), 400, "n")
        _shaped(http.post(chat, json={**good, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
        _shaped(http.post("/v1/completions", json={"model": "m"}), 400, "prompt")
        _shaped(http.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]}), 400, "prompt")
        assert _shaped(http.post(chat, json=good), 503)["code"] == "no_route"  # nobody at 127.0.0.1:9
        assert _shaped(http.get("/v1/nothing"), 404)["type"] == "not_found_error"
        swarm = http.get("/v1/swarm").json()
        assert swarm["models"] == {} and "127.0.0.1:9" in swarm["unreachable"]
        metrics = http.get("/metrics").text
        assert 'moemesh_api_errors_total{type="invalid_request_error"} 11.0' in metrics
        assert "moemesh_api_recoveries_total 0.0" in metrics
        assert "<title>moemesh swarm</title>" in http.get("/").text


def test_a_server_without_tokenizer_says_so(tiny_models: dict[str, Path]) -> None:
    from starlette.testclient import TestClient

    from node.api import ApiConfig, Relay, SwarmView, build_app

    client = Client(["127.0.0.1:9"])  # no folder: the tokenizer would come from the swarm, which is not there
    with TestClient(build_app(Relay(client, ApiConfig()), SwarmView(client, (), [], 0.0))) as http:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert _shaped(http.post("/v1/chat/completions", json=body), 503)["code"] == "no_route"

    class NoTokenizer(_FailingSwarm):
        def __init__(self) -> None:
            self.recoveries, self._fail_after = [], 0

        @property  # type: ignore[override]
        def text(self) -> Any:
            from node.errors import TokenizerError

            raise TokenizerError("no tokenizer for model fake (127.0.0.1:9: NOT_FOUND: ...)")

    fake = NoTokenizer()
    with TestClient(build_app(Relay(fake, ApiConfig()), SwarmView(fake, (), [], 0.0))) as http:  # type: ignore[arg-type]
        body = {"model": "fake-name", "messages": [{"role": "user", "content": "hi"}]}
        message = _shaped(http.post("/v1/chat/completions", json=body), 500)["message"]
        assert "--model FOLDER" in message and "NOT_FOUND" in message


class _FailingSwarm:
    """Stands in for the SDK client: yields tokens 10, 11, ... then loses its route."""

    def __init__(self, text: Any, fail_after: int) -> None:
        self.text, self.recoveries, self._fail_after = text, [], fail_after

    def route(self) -> Any:
        from node.client import Hop

        return "fake", [Hop("peer", "127.0.0.1:9", 0, 4)]

    def info(self, address: str) -> Any:
        return type("Info", (), {"model_name": "fake-name"})

    def generate(self, ids: list[int], n: int, **kwargs: Any) -> Iterator[int]:
        from node.errors import RouteError

        for i in range(n):
            if i == self._fail_after:
                raise RouteError("layers 2:4 failed on 127.0.0.1:9 and no known peer serves layers 2:4 of 4")
            yield 10 + i

    def close(self) -> None:
        pass


def test_a_failure_mid_stream_is_an_error_event(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from node.api import ApiConfig, Relay, SwarmView, build_app
    from node.client.text import TextCodec

    fake = _FailingSwarm(TextCodec(with_tokenizer(tiny_models["mixtral"], tmp_path / "m")), fail_after=3)
    app = build_app(Relay(fake, ApiConfig()), SwarmView(fake, (), [], 0.0))  # type: ignore[arg-type]
    body = {"model": "fake-name", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with TestClient(app) as http:
        error = _shaped(http.post("/v1/chat/completions", json=body), 503)
        assert error["code"] == "no_route" and "layers 2:4" in error["message"]
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]" and chunks[-1]["error"]["code"] == "no_route"
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]]
        assert "".join(pieces) == fake.text.decode([10, 11, 12])  # what came before the failure
        assert _shaped(http.post("/v1/chat/completions", json={**body, "model": "x"}), 404)["param"] == "model"
        assert http.get("/v1/models").json()["data"][0] == {
            "id": "fake", "object": "model", "created": 0, "owned_by": "moemesh", "name": "fake-name"
        }  # fmt: skip


def _moemesh(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_api_and_chat_command_lines() -> None:
    assert {"api", "chat"} <= set(_moemesh("--help", timeout=60).stdout.split())
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = str(taken.getsockname()[1])
        busy = _moemesh("api", "--peers", "127.0.0.1:9", "--port", port, timeout=60)
    finally:
        taken.close()
    assert busy.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr
    bad = _moemesh("api", "--peers", "127.0.0.1:9", "--model", "/nonexistent", timeout=60)
    assert bad.returncode == 2 and "no tokenizer.json" in bad.stderr and "Traceback" not in bad.stderr
    hot = _moemesh("chat", "--peers", "127.0.0.1:9", "--temperature", "5", timeout=60)
    assert hot.returncode == 2 and "outside 0..2" in hot.stderr
    for command in ("api", "chat"):  # pinned like the other client commands
        unpinned = _moemesh(command, "--peers", "127.0.0.1:9", "--insecure-lan", "--fingerprint", "zz", timeout=60)
        assert unpinned.returncode == 2 and "not a SHA-256 fingerprint" in unpinned.stderr, unpinned.stderr


def test_sigint_stops_the_api_server_cleanly() -> None:
    api = start_api(["--peers", "127.0.0.1:9"])
    try:
        assert httpx.get(api.url + "/health").json() == {"status": "ok"}
        api.process.send_signal(signal.SIGINT)
        assert api.process.wait(30) == 130
    finally:
        api.stop()
    assert not any("Traceback" in line for line in api.log), api.log


# -- against a live swarm ---------------------------------------------------------------------


@dataclass
class ApiProcess:
    process: subprocess.Popen[str]
    url: str = ""
    log: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_api(args: list[str], timeout: float = 120.0) -> ApiProcess:
    """Start `moemesh api ARGS --port 0` and wait for its ready event; stopped on failure."""
    cmd = [sys.executable, "-m", "node", "api", "--port", "0", "--json-events", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = ApiProcess(proc)
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            api.log.append(line.rstrip("\n"))
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("moemesh api exited:\n" + "\n".join(api.log[-20:]))
            if (ready := event_of(line, "ready")) is not None:
                api.url = f"http://{ready['http_address']}"
                return api
    except BaseException:
        api.stop()
        raise


@dataclass
class Swarm:
    servers: list[str]
    model: Path
    api: ApiProcess
    model_id: str

    def openai(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.api.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def sdk(self, ids: list[int], n: int, sampling: Sampling) -> list[int]:
        with Client(self.servers, model_folder=self.model) as client:
            return list(client.generate(ids, n, sampling=sampling))

    def text(self) -> Any:
        from node.client.text import TextCodec

        return TextCodec(self.model)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(httpx.get(self.api.url + "/metrics").text):
            for sample in family.samples:
                if sample.name == name and (labels or {}).items() <= sample.labels.items():
                    return float(sample.value)
        return 0.0


@pytest.fixture(scope="module")
def swarm(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    model = with_tokenizer(tiny_models["mixtral"], tmp_path_factory.mktemp("api") / "tiny")
    with local_swarm(model, [(0, 2), (2, 4)]) as servers:
        addresses = [s.address for s in servers]
        api = start_api(["--peers", ",".join(addresses), "--model", str(model)])
        try:
            model_id = httpx.get(api.url + "/v1/models", timeout=60).json()["data"][0]["id"]
            yield Swarm(addresses, model, api, model_id)
        finally:
            api.stop()


def _chat_ids(swarm: Swarm, messages: list[dict[str, str]]) -> list[int]:
    codec = swarm.text()
    return codec.encode(codec.render_chat(messages))


def _finish(swarm: Swarm, tokens: list[int]) -> str:
    return "stop" if tokens[-1] in swarm.text().eos_token_ids else "length"


MESSAGES = [{"role": "system", "content": "you are the one"}, {"role": "user", "content": "is it you that he was"}]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampling", [Sampling(), Sampling(temperature=0.9, top_p=0.8, seed=11)], ids=["greedy", "seeded"]
)
def test_chat_completions_are_the_sdk_tokens(swarm: Swarm, sampling: Sampling) -> None:
    ids = _chat_ids(swarm, MESSAGES)
    tokens = swarm.sdk(ids, 24, sampling)
    expected = swarm.text().decode(tokens)
    ask = dict(model=swarm.model_id, messages=MESSAGES, max_tokens=24, temperature=sampling.temperature,
               top_p=sampling.top_p, seed=sampling.seed)  # fmt: skip
    openai = swarm.openai()
    answer = openai.chat.completions.create(**ask)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == _finish(swarm, tokens)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), len(tokens))
    assert answer.usage.total_tokens == len(ids) + len(tokens)

    chunks = list(openai.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # streamed, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == _finish(swarm, tokens)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(tokens)


@pytest.mark.slow
def test_completions_take_text_or_token_ids_and_stop_at_stop_strings(swarm: Swarm) -> None:
    codec = swarm.text()
    ids = codec.encode("the a of to and")
    tokens = swarm.sdk(ids, 12, Sampling())
    expected = codec.decode(tokens)
    openai = swarm.openai()
    by_text = openai.completions.create(model=swarm.model_id, prompt="the a of to and", max_tokens=12, temperature=0)
    by_ids = openai.completions.create(model=swarm.model_id, prompt=ids, max_tokens=12, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_text.usage.completion_tokens == len(tokens) and by_text.usage.prompt_tokens == len(ids)
    words = expected.split()
    assert len(words) >= 3, expected
    stop = " " + words[2]  # the third word and what follows it are cut
    cut = openai.completions.create(model=swarm.model_id, prompt=ids, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = openai.completions.create(model=swarm.model_id, prompt=ids, max_tokens=12, temperature=0,
                                         stop=stop, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


@pytest.mark.slow
def test_bad_requests_get_openai_errors(swarm: Swarm) -> None:
    import openai as sdk

    client = swarm.openai()
    with pytest.raises(sdk.BadRequestError) as bad:
        client.chat.completions.create(model=swarm.model_id, messages=[], max_tokens=4)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "messages"
    with pytest.raises(sdk.BadRequestError) as negative:
        client.chat.completions.create(model=swarm.model_id, messages=MESSAGES, max_tokens=-3)
    assert negative.value.body["param"] == "max_tokens" and negative.value.body["type"] == "invalid_request_error"
    with pytest.raises(sdk.NotFoundError) as unknown:  # OpenAI's own answer to an unknown model: 404
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=4)
    assert unknown.value.body["code"] == "model_not_found"
    raw = httpx.post(swarm.api.url + "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    _shaped(raw, 400)
    assert swarm.metric("moemesh_api_errors_total", {"type": "invalid_request_error"}) >= 3


@pytest.mark.slow
def test_eight_concurrent_streams_all_finish(swarm: Swarm) -> None:
    seeds = list(range(8))
    ids = _chat_ids(swarm, MESSAGES)
    expected = {s: swarm.text().decode(swarm.sdk(ids, 20, Sampling(0.9, 0.9, s))) for s in seeds}
    openai = swarm.openai()

    def stream(seed: int) -> str:
        chunks = openai.chat.completions.create(model=swarm.model_id, messages=MESSAGES, max_tokens=20,
                                                temperature=0.9, top_p=0.9, seed=seed, stream=True)  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(len(seeds)) as pool:
        answers = dict(zip(seeds, pool.map(stream, seeds), strict=True))
    assert answers == expected
    assert swarm.metric("moemesh_api_active_streams") == 0


def _sessions(swarm: Swarm) -> int:
    with Client(swarm.servers) as client:
        return sum(client.info(a).active_sessions for a in swarm.servers)


@pytest.mark.slow
def test_a_client_that_hangs_up_frees_its_session(swarm: Swarm) -> None:
    from tests.conftest import wait_for

    ids = swarm.text().encode("he was for on")
    assert swarm.text().eos_token_ids[0] not in swarm.sdk(ids, 480, Sampling()), "pick a prompt that runs long"
    before = swarm.metric("moemesh_api_generated_tokens_total")
    body = {"model": swarm.model_id, "prompt": ids, "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", swarm.api.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")) >= 3
        assert _sessions(swarm) == 2  # one session, open on both hops
    wait_for(lambda: _sessions(swarm) == 0, 30, "the sessions closing")
    wait_for(lambda: swarm.metric("moemesh_api_active_streams") == 0, 30, "the stream ending")
    assert swarm.metric("moemesh_api_generated_tokens_total") - before < 480
    assert swarm.metric("moemesh_api_client_disconnects_total") >= 1

    # Not streamed: the client sends the request, waits until the session is open, hangs up.
    before = swarm.metric("moemesh_api_generated_tokens_total")
    payload = json.dumps({**body, "stream": False}).encode()
    host, port = swarm.api.url.removeprefix("http://").rsplit(":", 1)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        wait_for(lambda: _sessions(swarm) == 2, 30, "the session opening")
    wait_for(lambda: _sessions(swarm) == 0, 30, "the sessions closing")
    wait_for(lambda: swarm.metric("moemesh_api_active_streams") == 0, 30, "the generation ending")
    assert swarm.metric("moemesh_api_generated_tokens_total") - before < 480
    assert swarm.metric("moemesh_api_client_disconnects_total") >= 2


@pytest.mark.slow
def test_metrics_count_requests_tokens_and_latency(swarm: Swarm) -> None:
    openai = swarm.openai()
    before = swarm.metric("moemesh_api_generated_tokens_total")
    answer = openai.chat.completions.create(model=swarm.model_id, messages=MESSAGES, max_tokens=6, temperature=0)
    assert swarm.metric("moemesh_api_generated_tokens_total") - before == answer.usage.completion_tokens
    assert swarm.metric("moemesh_api_requests_total", {"endpoint": "/v1/chat/completions", "status": "200"}) >= 1
    assert swarm.metric("moemesh_api_time_to_first_token_seconds_count") >= 1
    assert swarm.metric("moemesh_api_prompt_tokens_total") >= answer.usage.prompt_tokens
    assert swarm.metric("moemesh_api_tokens_per_second_count") >= 1


@pytest.mark.slow
def test_chat_repl_keeps_the_history_and_resets_it(swarm: Swarm) -> None:
    lines = ["is it you", "and the a", "/reset", "is it you", "/quit", "never read"]
    result = subprocess.run(
        [sys.executable, "-m", "node", "chat", "--peers", ",".join(swarm.servers), "--model", str(swarm.model),
         "--system", "be the one", "--temperature", "0", "--max-new-tokens", "8"],
        input="\n".join(lines) + "\n", cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("\n")[:-1]
    assert len(replies) == 3, result.stdout
    codec = swarm.text()
    history = [{"role": "system", "content": "be the one"}, {"role": "user", "content": "is it you"}]
    first = codec.decode(swarm.sdk(codec.encode(codec.render_chat(history)), 8, Sampling()))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "and the a"}]
    second = codec.decode(swarm.sdk(codec.encode(codec.render_chat(history)), 8, Sampling()))
    assert replies == [first, second, first]
    assert "forgotten" in result.stderr and "Traceback" not in result.stderr
    chat = [sys.executable, "-m", "node", "chat", "--peers", ",".join(swarm.servers), "--model", str(swarm.model)]
    eof = subprocess.run(chat, input="", cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert eof.returncode == 0 and eof.stdout == "", eof.stderr


# -- the dashboard, in a real browser ---------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian package `chromium`): the dashboard test needs it")
def test_the_dashboard_shows_every_peer_of_the_swarm(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Two daemons of a DHT swarm and the API through its bootstrap address; headless Chromium
    renders the page, which must list both peers (ids, spans) and full coverage."""
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    model = with_tokenizer(tiny_models["mixtral"], tmp_path / "tiny")
    common = ["--model", str(model), "--ttl", "60", "--grace", "0"]
    daemons = []
    api = None
    try:
        daemons.append(start_daemon([*common, "--layers", "0:2", "--identity", str(tmp_path / "a.key")]))
        boot = daemons[0].multiaddr
        daemons.append(
            start_daemon([*common, "--layers", "2:4", "--bootstrap", boot, "--identity", str(tmp_path / "b.key")])
        )
        api = start_api(["--bootstrap", boot, "--model", str(model)])
        openai = Swarm([d.grpc_address for d in daemons], model, api, "").openai()
        model_id = openai.models.list().data[0].id
        answer = openai.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1  # generation through the DHT route too
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            browser = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                viewport={"width": 1400, "height": 900},
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                      "--disable-component-update", "--disable-sync"],
            )  # fmt: skip
            try:
                page = browser.new_page()
                page.goto(api.url + "/")
                selector = "tr.peer[data-peer-id]"
                page.wait_for_function(f"document.querySelectorAll('{selector}').length >= 2", timeout=60_000)
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                shown = page.eval_on_selector_all(selector, "rows => rows.map(r => r.dataset.peerId)")
                text = page.inner_text("body")
                generated = page.inner_text("#generated")
                openai.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, temperature=0)
                # the page reads the swarm again by itself: the new tokens show without a reload
                page.wait_for_function(f"document.getElementById('generated').textContent !== {generated!r}")
            finally:
                browser.close()
        assert sorted(shown) == sorted(d.peer_id for d in daemons)
        for d in daemons:
            assert d.peer_id in text
        assert "0:2" in text and "2:4" in text and "full route available" in text
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        shutil.copy(tmp_path / "dashboard.png", Path(tempfile.gettempdir()) / "moemesh-dashboard.png")  # to look at
    finally:
        if api is not None:
            api.stop()
        for d in daemons:
            d.terminate()
        for d in daemons:
            d.stop()

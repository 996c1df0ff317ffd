"""The waiting queue under load, and the stop-string check's cost.

- A request's n × prompts sequences are queued all together or not at all; one that can never
  fit (more than --max-waiting) is a 400 naming `n`, and takes no place in the queue meanwhile.
- Fair share: a client flooding the queue with legal requests cannot keep another client out.
- An aborted (disconnected) request leaves the queue at once, not at the next engine step.
- Stop strings are capped in length, and the per-step stop check costs the new text, not the
  whole text (counted in executed lines, not timed).

The server tests hold the one slot with a prompt whose prefill takes a couple of long steps
(`busy_engine`): while a step runs, the engine thread reads nothing from its inbox, which is
when the old accounting went wrong.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import socket
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from helpers_model import random_state_dict, tiny_config
from helpers_server import ServerProcess, make_tiny_model
from helpers_tokenizer import build_test_tokenizer
from tnl.config import EngineConfig, ModelConfig
from tnl.engine import sampling_params as sp_module
from tnl.engine.async_engine import Job
from tnl.engine.errors import InvalidRequest, QueueFullError
from tnl.engine.output import OutputProcessor
from tnl.engine.request import Request
from tnl.engine.sampling_params import SamplingParams
from tnl.engine.scheduler import Scheduler

MAX_WAITING = 6
BUDGET = 65536          # one prefill step of this many tokens takes ~0.5-1 s on a CPU for the tiny model
BUSY_TOKENS = 3 * BUDGET


# ---- servers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    with ServerProcess(model_dir, "--max-num-seqs", "1", "--max-waiting", str(MAX_WAITING),
                       "--max-num-batched-tokens", str(BUDGET)) as s:
        yield s


def completion(srv, body: dict, client: httpx.Client | None = None, timeout: float = 60) -> httpx.Response:
    body = {"max_tokens": 2, "temperature": 0, **body}
    if client is not None:
        return client.post(srv.url + "/v1/completions", json=body, timeout=timeout)
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=timeout)


def client_at(address: str) -> httpx.Client:
    """An HTTP client whose connections come from `address` (any of 127.0.0.0/8 on loopback):
    the server tells clients apart by address when it has no --api-key."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address))


def wait_for(condition, explain=lambda: "", timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {explain()}"
        time.sleep(0.01)


_busy_prompts = itertools.count()


@contextmanager
def busy_engine(srv):
    """The only slot taken by a prompt of BUSY_TOKENS ids (three long prefill steps) until the
    block ends; meanwhile every other request waits for a slot. The block starts after the
    first step (the running gauge is as of the last step), so two remain. (Each time another
    prompt: the prompt-state cache would answer a repeated one at once.)"""
    ids = [3 + next(_busy_prompts)] + [3 + i % 390 for i in range(BUSY_TOKENS - 1)]
    result = {}
    t = threading.Thread(target=lambda: result.update(r=completion(srv, {"prompt": ids, "max_tokens": 1})))
    t.start()
    wait_for(lambda: srv.metric("tnl_num_requests_running") >= 1 or not t.is_alive())
    assert t.is_alive(), result["r"].text
    try:
        yield
    finally:
        t.join(60)
        assert result["r"].status_code == 200, result["r"].text


def in_threads(fn, n: int) -> list:
    out = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# ---- defect 1: one request floods the queue ----------------------------------------------------
def test_a_request_that_can_never_fit_is_a_400_naming_n_and_the_limit(srv):
    r = completion(srv, {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})     # 9 sequences > 6
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n"
    assert "9" in err["message"] and str(MAX_WAITING) in err["message"] and "--max-waiting" in err["message"]
    assert "retry-after" not in r.headers
    one_prompt = completion(srv, {"prompt": ["a"] * (MAX_WAITING + 1), "max_tokens": 1})
    assert one_prompt.status_code == 400 and one_prompt.json()["error"]["param"] == "prompt", one_prompt.text


def test_oversize_requests_take_no_place_from_other_requests(srv):
    """The issue's flood: a client repeating a request that can never fit. Before, each took
    the whole queue until the engine thread got round to it, and everyone else got 429."""
    stop = threading.Event()
    flood_codes = []

    def flood():
        with httpx.Client() as c:
            while not stop.is_set():
                flood_codes.append(completion(srv, {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}, c)
                                   .status_code)

    with busy_engine(srv):
        t = threading.Thread(target=flood)
        t.start()
        while len(flood_codes) < 3:
            time.sleep(0.01)
        codes = in_threads(lambda i: completion(srv, {"prompt": f"hello {i}"}).status_code, MAX_WAITING - 1)
        stop.set()
        t.join(30)
    assert codes == [200] * (MAX_WAITING - 1)
    assert set(flood_codes) == {400}


def test_a_client_flooding_the_queue_cannot_starve_another(srv):
    """The hog (127.0.0.2) keeps the queue full with legal requests from several connections;
    the second client (127.0.0.1) still gets its requests in, up to its fair share (half the
    queue while both wait): the hog's newest requests make room and get 429 instead."""
    stop = threading.Event()
    hog_codes = []

    def hog(i):
        with client_at("127.0.0.2") as c:
            while not stop.is_set():
                hog_codes.append(completion(srv, {"prompt": f"hog {i}", "n": 2, "max_tokens": 4}, c).status_code)

    with busy_engine(srv):
        hogs = [threading.Thread(target=hog, args=(i,)) for i in range(MAX_WAITING)]
        for t in hogs:
            t.start()
        wait_for(lambda: 429 in hog_codes)   # the hog holds the whole queue, its other connections are refused
        with client_at("127.0.0.1") as c:
            codes = in_threads(lambda i: completion(srv, {"prompt": f"fair {i}"}, c).status_code, MAX_WAITING // 2)
        stop.set()
        for t in hogs:
            t.join(30)
    assert codes == [200] * (MAX_WAITING // 2)
    assert 200 in hog_codes


# ---- defect 2: aborts count against the queue until the next step ------------------------------
def open_request(srv, body: dict) -> socket.socket:
    """A client that sent a whole request and waits for the answer (closing the socket is its
    disconnect)."""
    data = json.dumps({"max_tokens": 2, **body}).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def test_disconnected_clients_leave_the_queue_at_once(srv):
    with busy_engine(srv):
        waiting = [open_request(srv, {"prompt": f"gone {i}"}) for i in range(MAX_WAITING)]
        wait_for(lambda: srv.metric("tnl_num_requests_waiting") == MAX_WAITING, srv.log)
        probe = completion(srv, {"prompt": "probe"})
        assert probe.status_code == 429, probe.text           # the queue is full
        for s in waiting:                                     # those clients time out and leave
            s.close()
        time.sleep(0.05)                                      # (the server reads their disconnects)
        codes = in_threads(lambda i: completion(srv, {"prompt": f"next {i}"}).status_code, MAX_WAITING)
    assert codes == [200] * MAX_WAITING


# ---- the async front's queue rules, without HTTP -----------------------------------------------
@pytest.fixture
def front():
    """An AsyncEngine over the tiny model with one slot, held by a request that never ends, so
    the waiting queue holds exactly what the test put there."""
    from tnl.engine import AsyncEngine, LLMEngine
    from tnl.model.transnormer import TransnormerForCausalLM
    cfg = tiny_config(vocab_size=300)
    m = TransnormerForCausalLM(ModelConfig.from_dict(cfg))
    m.load_state_dict(random_state_dict(cfg, seed=3))
    eng = AsyncEngine(LLMEngine(m.eval(), None, EngineConfig(max_num_seqs=1, max_waiting=4)))
    yield eng
    eng.shutdown()


def group(rid: str, n: int, sinks: dict) -> list[Job]:
    """n one-token jobs whose outputs land in sinks[request id]."""
    return [Job([5, 6, 7], SamplingParams(max_tokens=1), f"{rid}-{k}", sinks.setdefault(f"{rid}-{k}", []).append)
            for k in range(n)]


async def hold_the_slot(eng) -> None:
    started = asyncio.Event()
    eng.submit([4, 5], SamplingParams(max_tokens=1_000_000, ignore_eos=True), "holder",
               lambda item: started.set())
    await asyncio.wait_for(started.wait(), 30)


def test_a_group_is_queued_whole_or_not_at_all(front):
    async def main():
        await hold_the_slot(front)
        sinks = {}
        with pytest.raises(InvalidRequest, match="at most 4"):
            front.submit_group(group("big", 5, sinks), client="a")
        front.submit_group(group("g1", 3, sinks), client="a")
        with pytest.raises(QueueFullError):
            front.submit_group(group("g2", 2, sinks), client="a")     # 3 + 2 > 4: none of it is queued
        front.submit_group(group("g3", 1, sinks), client="a")         # the last place is still free
        with pytest.raises(QueueFullError):
            front.submit_group(group("g4", 1, sinks), client="a")
        front.abort("g3-0")                                           # leaves at once: its place is free
        front.submit_group(group("g5", 1, sinks), client="a")
        await asyncio.sleep(0.2)
        return sinks

    sinks = asyncio.run(main())
    aborted = sinks.pop("g3-0")
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    assert all(got == [] for got in sinks.values()), sinks     # the rest wait behind the holder, or never came in
    assert front.stats()["waiting"] == 4


def test_fair_share_evicts_the_hogs_newest_group(front):
    async def main():
        await hold_the_slot(front)
        sinks = {}
        front.submit_group(group("hog1", 2, sinks), client="hog")
        front.submit_group(group("hog2", 2, sinks), client="hog")     # alone, the hog may fill the queue
        front.submit_group(group("b1", 1, sinks), client="b")         # full: the hog's newest group makes room
        with pytest.raises(QueueFullError, match="fair share"):
            front.submit_group(group("hog3", 2, sinks), client="hog")   # one place free, the hog at its share
        front.submit_group(group("b2", 1, sinks), client="b")         # a free place: anyone may take it
        with pytest.raises(QueueFullError, match="fair share"):
            front.submit_group(group("b3", 1, sinks), client="b")     # b at its share (4 // 2 clients) too
        with pytest.raises(QueueFullError, match="fair share"):
            front.submit_group(group("hog4", 1, sinks), client="hog")
        await asyncio.sleep(0.2)
        return sinks

    sinks = asyncio.run(main())
    for rid in ("hog2-0", "hog2-1"):
        assert len(sinks[rid]) == 1 and isinstance(sinks[rid][0], QueueFullError), (rid, sinks[rid])
        assert "fair share" in str(sinks[rid][0])
    for rid in ("hog1-0", "hog1-1", "b1-0", "b2-0"):
        assert sinks[rid] == [], (rid, sinks[rid])            # still waiting behind the holder
    assert front.stats()["waiting"] == 4


# ---- defect 3: stop strings ---------------------------------------------------------------------
def test_stop_strings_are_capped_in_length_and_number():
    cap = sp_module.MAX_STOP_CHARS
    assert 100 <= cap <= 4096
    SamplingParams(stop=["x" * cap] * sp_module.MAX_STOPS)
    for bad in (["x" * (cap + 1)], ["ok", "y" * 100_000], ["s"] * (sp_module.MAX_STOPS + 1)):
        with pytest.raises(InvalidRequest) as e:
            SamplingParams(stop=bad)
        assert e.value.param == "stop" and str(cap if len(bad) <= 2 else sp_module.MAX_STOPS) in e.value.message


def test_server_refuses_a_stop_string_over_the_cap(srv):
    cap = sp_module.MAX_STOP_CHARS
    for route, body in (("/v1/completions", {"prompt": "hello"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(srv.url + route, json={**body, "max_tokens": 2, "stop": ["x" * 100_000] * 16}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "stop" and str(cap) in err["message"], err
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2, "stop": ["x" * cap]},
                    timeout=30)
    assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tnl.model.tokenizer import Tokenizer
    return Tokenizer.from_dir(build_test_tokenizer(tmp_path_factory.mktemp("tok")))


def pieces_of(tokenizer, ids: list[int]) -> list[str]:
    """The text each id adds (the last one with the detokenizer's flush)."""
    from tnl.model.tokenizer import IncrementalDetokenizer
    d = IncrementalDetokenizer(tokenizer)
    out = [d.add(i) for i in ids]
    out[-1] += d.flush()
    return out


def naive_stops(pieces: list[str], stops: list[str]) -> tuple[list[str], str, str | None]:
    """The reference: after each piece, the text a stream may show (all of it but the longest
    tail that begins some stop string), the final text, and the stop string that cut it. The
    first stop string in list order that occurs ending in the new piece cuts at its first such
    occurrence."""
    text, shown = "", []
    for n, piece in enumerate(pieces):
        before = len(text)
        text += piece
        for s in stops:
            i = text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                return shown + [text[:i]], text[:i], s
        last = n == len(pieces) - 1
        hold = 0 if last else max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        shown.append(text[:len(text) - hold])
    return shown, text, None


def run_processor(tokenizer, ids: list[int], stops: list[str]) -> tuple[list[str], str, str | None]:
    """The OutputProcessor over `ids`, one token per step (the last one finishes by length), as
    the engine drives it: the text shown after each step, the final text, the stop reason."""
    proc, sched = OutputProcessor(tokenizer), Scheduler(1, 16, 1)
    req = Request("r", [1], SamplingParams(max_tokens=len(ids), stop=stops), frozenset())
    sched.add(req)
    proc.add(req)
    shown, seen = [], ""
    for n, tok in enumerate(ids):
        if req.finished:
            break
        req.output_token_ids.append(tok)
        if n == len(ids) - 1:
            sched.finish(req, "length")
        proc.update(req, sched)
        seen += proc.take_delta(req).outputs[0].text
        shown.append(seen)
    return shown, proc.final_output(req).outputs[0].text, req.stop_reason if req.finish_reason == "stop" else None


def test_stop_string_spanning_several_steps_is_held_back_then_cut(tokenizer):
    text = "the model reads a long prompt and writes an answer with numbers like 12345"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = pieces_of(tokenizer, ids)
    assert len(pieces) >= 10 and "".join(pieces) == text
    cases = [
        ["a long prompt and"],                     # spans several pieces
        ["reads a long promptX", "writes"],        # a long partial match that fails, then another stop
        ["an answer with numbers like 12345"],     # ends on the last (flushed) piece
        ["writes an", "model"],                    # list order decides, not the position
        ["aaaa", "numbers lik", "e 1"],            # no prefix of "aaaa" in the text
        ["the model reads a long prompt and writes an answer with numbers like 123456"],   # never completes
        ["12", "t"],                               # at the start
    ]
    for stops in cases:
        assert run_processor(tokenizer, ids, stops) == naive_stops(pieces, stops), stops


def test_stop_strings_match_the_reference_on_random_text(tokenizer):
    """Many overlapping partial matches (a two-letter alphabet), stops that repeat their own
    prefixes (where a suffix-prefix search is easy to get wrong)."""
    rng = random.Random(0)
    for trial in range(60):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 80)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = pieces_of(tokenizer, ids)
        full = "".join(pieces)
        stops = []
        for _ in range(rng.randint(1, 4)):
            if full and rng.random() < 0.6:
                i = rng.randrange(len(full))
                stops.append(full[i:i + rng.randint(1, 12)])
            else:
                stops.append("".join(rng.choice("ab") for _ in range(rng.randint(1, 8))))
        assert run_processor(tokenizer, ids, stops) == naive_stops(pieces, stops), (text, stops)


def lines_run_in_output_module(fn) -> int:
    """How many lines of tnl/engine/output.py `fn()` executes: work counted, not timed."""
    target = sys.modules[OutputProcessor.__module__].__file__
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename == target else None

    old = sys.gettrace()
    sys.settrace(global_)
    try:
        fn()
    finally:
        sys.settrace(old)
    return count


def test_stop_check_work_per_step_does_not_grow_with_the_text(tokenizer):
    """16 stop strings of the longest length allowed, over 4 × that much text: a step late in
    the output costs what a step early in it cost (the old hold-back scanned up to a stop's
    length of the text back, per stop, every step)."""
    cap = sp_module.MAX_STOP_CHARS
    ids = tokenizer.encode("the model reads a long prompt " * (4 * cap // 30 + 1), add_special_tokens=False)
    text = "".join(pieces_of(tokenizer, ids))
    stops = [chr(0x4e00 + j) + "x" * (cap - 1) for j in range(8)]      # never the first character
    stops += [text[:cap - 1] + "Z"] * 4 + [(text[:2 * j + 2] * cap)[:cap] for j in range(4)]   # long partial matches
    assert len(stops) == sp_module.MAX_STOPS and all(len(s) == cap for s in stops)

    proc, sched = OutputProcessor(tokenizer), Scheduler(1, 16, 1)
    req = Request("r", [1], SamplingParams(max_tokens=len(ids) + 1, stop=stops), frozenset())
    sched.add(req)
    proc.add(req)
    cost, length = [], []
    for tok in ids:
        req.output_token_ids.append(tok)

        def step():
            proc.update(req, sched)
            proc.take_delta(req)
        cost.append(lines_run_in_output_module(step))
        length.append(len(proc.text(req)))
    assert not req.finished and length[-1] >= 4 * cap
    # Work per character of new text: the same early (the text a fraction of a stop's length)
    # as late (the text several times a stop's length).
    def per_char(lo, hi):
        steps = [i for i in range(1, len(ids)) if lo <= length[i - 1] < hi]
        return sum(cost[i] for i in steps) / sum(length[i] - length[i - 1] for i in steps)
    early, late = per_char(0, cap // 8), per_char(3 * cap, 4 * cap)
    assert late < 1.5 * early, (early, late)
    # And bounded by a small constant per character per stop string (plus a fixed cost per step).
    assert sum(cost) < 12 * len(stops) * length[-1] + 200 * len(ids), (sum(cost), length[-1])

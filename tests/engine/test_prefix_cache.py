"""The prompt-state cache: the radix index on its own, then the engine with the cache on
against the same engine with it off (tokens identical, logprobs within float32 rounding), for
hits at every kind of boundary, and the server's reporting (usage, metrics, access log)."""
from __future__ import annotations

import pytest
import requests

from helpers_server import ServerProcess
from tnl import LLM, SamplingParams
from tnl.engine.prefix_cache import PrefixCache
from tnl.loading import DEMO_MODEL_DIR

LP_TOL = 1e-4
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


# ---- the index --------------------------------------------------------------------------------
def test_radix_index_longest_prefix_split_and_prune():
    c = PrefixCache(1000)
    for ids in ([1, 2, 3, 4], [1, 2], [1, 2, 5], [9]):
        c.insert(ids, tuple(ids), None, 10)
    assert c.lookup([1, 2, 3, 4, 7]).ids == (1, 2, 3, 4)
    assert c.lookup([1, 2, 3]).ids == (1, 2)          # inside an edge: the node above
    assert c.lookup([1, 2, 5, 5]).ids == (1, 2, 5)
    assert c.lookup([1, 3]) is None and c.lookup([]) is None and c.lookup([9, 9]).ids == (9,)
    assert c.lookup([1, 2, 3, 4], usable=lambda e: e.num_tokens < 4).ids == (1, 2)
    c.remove(c.get([1, 2]))
    assert c.lookup([1, 2, 3]) is None and c.lookup([1, 2, 3, 4]).ids == (1, 2, 3, 4)
    c.remove(c.get([1, 2, 5]))
    assert list(c.root.children[1].key) == [1, 2, 3, 4]   # the emptied branch merged back into one edge
    assert c.bytes == 20 and len(c.entries) == 2
    assert c.insert([1, 2, 3, 4], "again", "logits", 10).state == (1, 2, 3, 4)   # kept, logits added
    assert c.get([1, 2, 3, 4]).logits == "logits" and c.bytes == 20


def test_eviction_is_lru_by_hits_and_spares_pinned():
    c = PrefixCache(30)
    a = c.insert([1], "a", None, 10, pinned=True)
    b = c.insert([2], "b", None, 10)
    d = c.insert([3], "d", None, 10)
    c.record_query(2, b, 1)                     # a hit refreshes b: d is now the oldest unpinned
    c.insert([4], "e", None, 10)
    assert c.get([3]) is None and c.get([2]) is b and c.get([1]) is a and c.evictions == 1
    assert c.lookup([3]) is None and d not in c.entries
    assert c.insert([5], "big", None, 31) is None      # larger than the budget: not kept
    c.insert([6], "p", None, 10, pinned=True)
    assert c.insert([7], "x", None, 20) is None         # only pinned ones would be left to evict
    assert c.unpin_all() == 2


# ---- the engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llms():
    """The demo model twice: the cache on (the default) and off."""
    return LLM(device="cpu", max_num_batched_tokens=64), LLM(device="cpu", max_num_batched_tokens=64,
                                                             enable_prefix_caching=False)


def _same(got, want):
    for g, w in zip(got, want):
        go, wo = g.outputs[0], w.outputs[0]
        assert go.token_ids == wo.token_ids
        assert len(go.logprobs) == len(wo.logprobs)
        for a, b in zip(go.logprobs, wo.logprobs):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= LP_TOL for k in a)


SP = SamplingParams(max_tokens=20, temperature=0, logprobs=2, ignore_eos=True)


def test_hits_at_the_system_prompt_the_prompt_end_and_the_generation_end(llms):
    on, off = llms
    turn1 = [SYSTEM, {"role": "user", "content": "你好"}]
    a = on.chat(turn1, SP)[0]
    _same([a], off.chat(turn1, SP))
    assert a.num_cached_tokens == 0
    system_end = len(on.tokenizer.apply_chat_template([SYSTEM], add_generation_prompt=False, tokenize=True))

    other = [SYSTEM, {"role": "user", "content": "Tell me something"}]   # shares the system message
    b = on.chat(other, SP)[0]
    _same([b], off.chat(other, SP))
    assert b.num_cached_tokens == system_end

    again = on.chat(turn1, SP)[0]                 # the whole prompt: first token from the kept logits
    _same([again], [a])
    assert again.num_cached_tokens == len(a.prompt_token_ids)

    reply = on.tokenizer.decode(a.outputs[0].token_ids)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "再说一个"}]
    c = on.chat(turn2, SP)[0]
    _same([c], off.chat(turn2, SP))
    generated = len(a.prompt_token_ids) + len(a.outputs[0].token_ids) - 1   # the last token never entered
    if c.prompt_token_ids[:generated] == a.prompt_token_ids + a.outputs[0].token_ids[:-1]:
        assert c.num_cached_tokens == generated      # the reply re-tokenized to the same ids
    else:
        assert c.num_cached_tokens >= len(a.prompt_token_ids)


def test_a_boundary_inside_one_prefill_chunk(llms):
    """A snapshot point at token 37 of a 60-token prompt, which the 64-token budget would
    otherwise compute in one chunk: the chunk stops there, and a prompt sharing those 37 tokens
    continues from them with the same tokens and logprobs."""
    on, off = llms
    base = on.tokenizer.encode("子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？" * 2)[:60]
    assert len(base) == 60
    eng = on.engine
    r = eng.add_request(base, SamplingParams(max_tokens=1, temperature=0), boundaries=[37])
    while not r.finished:
        eng.step()
    eng.release(r.request_id)
    fork = base[:37] + [1400, 1401, 1402]
    got = on.generate([fork], SP)
    _same(got, off.generate([fork], SP))
    assert got[0].num_cached_tokens == 37


def test_duplicates_prefill_once_and_fork(llms):
    """Four copies of one prompt (what n = 4 sends): one computes it, three copy its state."""
    on, off = llms
    p = on.tokenizer.encode("有朋自远方来，不亦乐乎？")
    before = on.engine.stats()["prefill_tokens"]
    seeded = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, logprobs=1) for s in range(4)]
    outs = on.generate([p] * 4, seeded)
    _same(outs, off.generate([p] * 4, seeded))
    assert sorted(o.num_cached_tokens for o in outs) == [0, len(p), len(p), len(p)]
    assert on.engine.stats()["prefill_tokens"] - before == len(p)


def test_concurrent_requests_sharing_a_prefix(llms):
    on, off = llms
    shared = on.tokenizer.encode("人不知而不愠，不亦君子乎？")
    first = on.generate([shared], SP)
    prompts = [shared + on.tokenizer.encode(s) for s in ("一", "二", "三")]
    got = on.generate(prompts, SP)
    _same(got, off.generate(prompts, SP))
    assert [o.num_cached_tokens for o in got] == [len(shared)] * 3
    _same(first, off.generate([shared], SP))


def test_eviction_under_a_tiny_budget():
    llm = LLM(device="cpu", prefix_cache_gb=1e-9 * 2.5 * LLM(device="cpu").engine.core.entry_bytes())
    cache = llm.engine.core.prefix_cache
    ps = [llm.tokenizer.encode(t) for t in ("学而时习之", "不亦说乎", "有朋自远方来")]
    for p in ps:
        llm.generate([p], SamplingParams(max_tokens=2, temperature=0))
    assert len(cache.entries) == 2 and cache.evictions >= 4   # prompt and generation ends: 6 kept, 4 gone
    assert cache.bytes <= cache.budget_bytes


def test_off_means_no_lookups():
    llm = LLM(device="cpu", enable_prefix_caching=False)
    p = llm.tokenizer.encode("你好")
    outs = llm.generate([p, p], SamplingParams(max_tokens=3, temperature=0))
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert llm.engine.core.prefix_cache is None and "prefix_cache_hits" not in llm.engine.stats()


# ---- the server -------------------------------------------------------------------------------
def _metric(srv, name: str) -> float:
    return srv.metric(name)


@pytest.mark.parametrize("cache", [True, False])
def test_server_reports_cached_tokens_everywhere(tmp_path, cache):
    args = ["--max-num-seqs", "2"] + ([] if cache else ["--no-enable-prefix-caching"])
    with ServerProcess(DEMO_MODEL_DIR, *args, log_path=str(tmp_path / "server.log")) as srv:
        msgs = [SYSTEM, {"role": "user", "content": "你好"}]
        body = {"messages": msgs, "max_tokens": 8, "temperature": 0}
        first = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        n_prompt = first["usage"]["prompt_tokens"]
        second = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert second["choices"][0]["message"] == first["choices"][0]["message"]
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n_prompt if cache else 0)
        with requests.post(srv.url + "/v1/chat/completions", timeout=60, stream=True,
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = [line for line in r.iter_lines() if line.startswith(b"data: {")]
        usage = requests.models.complexjson.loads(events[-1][6:])["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == (n_prompt if cache else 0)
        if cache:
            assert _metric(srv, "tnl_prefix_cache_queries_total") == 3
            assert _metric(srv, "tnl_prefix_cache_hits_total") == 2
            assert _metric(srv, "tnl_prefix_cache_query_tokens_total") == 3 * n_prompt
            assert _metric(srv, "tnl_prefix_cache_hit_tokens_total") == 2 * n_prompt
            assert _metric(srv, "tnl_prefix_cache_entries") >= 2   # prompt end, generation end, message ends
            assert _metric(srv, "tnl_prefix_cache_bytes") > 0 and _metric(srv, "tnl_prefix_cache_evictions_total") == 0
        log = srv.log()
    assert f"cached={n_prompt if cache else 0}" in log
    assert ("prompt-state cache: 1.00 GB" in log) == cache

"""The engine on CPU: continuous batching equals one-at-a-time, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from helpers_model import random_state_dict, tiny_config
from reference import reference_logits
from tnl.config import EngineConfig, ModelConfig
from tnl.engine import LLMEngine, QueueFullError, SamplingParams
from tnl.engine.engine import COUNTERS
from tnl.engine.scheduler import Scheduler
from tnl.model.transnormer import TransnormerForCausalLM

CFG = tiny_config(vocab_size=300, linear_use_lrpe_list=[1, 0, 0])
SD = random_state_dict(CFG, seed=11, theta_scale=0.7)


ASYNC = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def async_scheduling(request):
    """Every engine test runs twice: plain steps, and with async scheduling (each decode step
    queued before the previous step's tokens are read back), which CUDA uses by default."""
    ASYNC[0] = request.param
    yield request.param
    ASYNC[0] = False


def make_engine(**kw) -> LLMEngine:
    m = TransnormerForCausalLM(ModelConfig.from_dict(CFG))
    m.load_state_dict(SD)
    m.eval()
    return LLMEngine(m, None, EngineConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 64,
                                              "async_scheduling": ASYNC[0], **kw}))


def run(engine: LLMEngine, prompts, params):
    params = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        assert steps < 10_000
    return [engine.final_output(r) for r in reqs]


def prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [1, 5, 37, 64, 65, 130, 3, 200][:n]
    return [torch.randint(3, 300, (k,), generator=g).tolist() for k in lens]


def ref_greedy(ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        t = int(reference_logits(SD, CFG, ids)[-1].argmax())
        out.append(t)
        ids.append(t)
    return out


def test_greedy_matches_float64_reference():
    eng = make_engine()
    ps = prompts(4)
    outs = run(eng, ps, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == ref_greedy(p, 6)
        assert o.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("budget,slots", [(64, 4), (7, 2), (1000, 8)])
def test_batched_equals_one_at_a_time(budget, slots):
    ps = prompts(8)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seeded = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=i, ignore_eos=True)
              for i in range(len(ps))]
    alone = [run(make_engine(), [p], greedy)[0].outputs[0].token_ids for p in ps]
    alone_s = [run(make_engine(), [p], [sp])[0].outputs[0].token_ids for p, sp in zip(ps, seeded)]
    eng = make_engine(max_num_batched_tokens=budget, max_num_seqs=slots)
    assert [o.outputs[0].token_ids for o in run(eng, ps, greedy)] == alone
    assert [o.outputs[0].token_ids for o in run(eng, ps, seeded)] == alone_s
    assert eng.stats()["slots_used"] == 0


def test_same_request_twice_same_tokens():
    """The official code leaks LRPE positions from one call into the next; tnl must not."""
    eng = make_engine()
    p = prompts(3)[2]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    a = run(eng, [p], sp)[0].outputs[0].token_ids
    b = run(eng, [p], sp)[0].outputs[0].token_ids
    assert a == b


def test_logprobs_and_prompt_logprobs_match_reference():
    eng = make_engine(max_num_batched_tokens=16)   # the prompt spans several chunks
    p = prompts(6)[5]
    o = run(eng, [p], SamplingParams(max_tokens=3, temperature=0, logprobs=5, prompt_logprobs=2,
                                     ignore_eos=True))[0]
    full = p + o.outputs[0].token_ids
    ref = torch.log_softmax(reference_logits(SD, CFG, full), dim=-1)
    assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        d = o.prompt_logprobs[i]
        assert p[i] in d and abs(d[p[i]] - ref[i - 1, p[i]].item()) < 1e-4
        top2 = ref[i - 1].topk(2).indices.tolist()
        assert set(top2) <= set(d) and len(d) <= 3
    for j, (tok, d) in enumerate(zip(o.outputs[0].token_ids, o.outputs[0].logprobs)):
        row = ref[len(p) - 1 + j]
        assert tok in d and abs(d[tok] - row[tok].item()) < 1e-4
        assert set(row.topk(5).indices.tolist()) <= set(d)


def test_scoring_with_max_tokens_zero():
    eng = make_engine()
    p = prompts(3)[2]
    o = run(eng, [p], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert o.outputs[0].token_ids == [] and o.outputs[0].finish_reason == "length"
    ref = torch.log_softmax(reference_logits(SD, CFG, p), dim=-1)
    got = [o.prompt_logprobs[i][p[i]] for i in range(1, len(p))]
    want = [ref[i - 1, p[i]].item() for i in range(1, len(p))]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert all(len(d) == 1 for d in o.prompt_logprobs[1:])


def test_stop_token_ids_and_eos():
    eng = make_engine()
    p = prompts(2)[1]
    free = run(eng, [p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    stop_at = free[3]
    o = run(eng, [p], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at]))[0].outputs[0]
    k = free.index(stop_at)
    assert o.token_ids == free[:k + 1] and o.finish_reason == "stop" and o.stop_reason == stop_at


def test_abort_frees_slot_and_queue_bound():
    eng = make_engine(max_num_seqs=1, max_waiting=3)
    sp = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    a = eng.add_request(prompts(1)[0], sp)
    eng.add_request(prompts(2)[1], sp)
    eng.add_request(prompts(3)[2], sp)
    with pytest.raises(QueueFullError):
        eng.add_request([5, 6], sp)
    for _ in range(3):
        eng.step()
    assert eng.stats() == {"running": 1, "waiting": 2, "slots_used": 1, "slots_total": 1,
                           "steps": 3, "prefill_steps": 1, "prefill_tokens": 1, "decode_tokens": 2,
                           "device_busy_s": 0.0, "prefill_step_busy_s": 0.0}
    eng.abort(a.request_id)
    eng.step()
    assert a.finish_reason == "abort"
    assert eng.stats()["running"] == 1 and eng.stats()["waiting"] == 1


@pytest.mark.parametrize("bad", [[], [300], [-1], [1, "x"], [1.5]])
def test_bad_prompts_rejected(bad):
    with pytest.raises(ValueError, match="prompt"):
        make_engine().add_request(bad, SamplingParams())


@pytest.mark.parametrize("kw,name", [
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"), ({"top_k": -5}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"logprobs": 100}, "logprobs"), ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"presence_penalty": 5}, "presence_penalty"),
])
def test_sampling_params_validation_names_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_penalties_change_distribution_and_stay_deterministic():
    eng = make_engine()
    p = prompts(2)[1]
    base = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    pen = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.8,
                         frequency_penalty=1.0, presence_penalty=0.5)
    a = run(eng, [p], base)[0].outputs[0].token_ids
    b = run(eng, [p], pen)[0].outputs[0].token_ids
    c = run(eng, [p], pen)[0].outputs[0].token_ids
    assert b == c
    assert len(set(b)) >= len(set(a))


def test_scheduler_long_prompt_does_not_stall_decode():
    """Each step has a decode token for every running stream, whatever waits to be prefilled."""
    s = Scheduler(num_slots=4, max_num_batched_tokens=16, max_waiting=10)
    from tnl.engine.request import Request
    short = Request("a", [1, 2], SamplingParams(), frozenset())
    long = Request("b", list(range(3, 100)), SamplingParams(), frozenset())
    s.add(short)
    b = s.schedule()
    short.num_computed = 2
    s.add(long)
    for _ in range(5):
        b = s.schedule()
        assert b.decode == [short] and b.num_tokens <= 16
        for r, n in b.prefill:
            r.num_computed += n


def test_state_pool_copy_and_snapshot_fork_a_sequence():
    """A slot's state copied to another slot (or saved and restored) continues exactly like the
    original: the basis for prompt caching and n > 1 sampling."""
    eng = make_engine()
    m, pool = eng.model, eng.runner.pool
    p = prompts(5)[4]
    from tnl.model.transnormer import AttnBatch

    def decode(slot, tok, pos):
        with torch.no_grad():
            b = AttnBatch.build([(slot, pos)], [], "cpu")
            return m.logits(m(torch.tensor([tok]), b, pool.layers))[0]

    with torch.no_grad():
        m(torch.tensor(p), AttnBatch.build([], [(0, 0, len(p))], "cpu"), pool.layers)
    saved = pool.snapshot(0)
    pool.copy(0, 1)
    a = decode(0, 7, len(p))
    b = decode(1, 7, len(p))
    assert torch.equal(a, b)
    pool.restore(2, saved)
    assert torch.equal(decode(2, 7, len(p)), a)
    ref = reference_logits(SD, CFG, p + [7])[-1]
    assert torch.allclose(a.double(), ref, rtol=1e-4, atol=1e-4)


def test_model_vocab_larger_than_tokenizer_never_samples_undecodable_ids(tmp_path):
    """Checkpoints may pad the embedding past the tokenizer; such ids must never be sampled
    (the detokenizer could not decode them and the request would fail)."""
    from helpers_tokenizer import build_test_tokenizer
    from tnl.model.tokenizer import Tokenizer
    cfg = tiny_config(vocab_size=460)
    m = TransnormerForCausalLM(ModelConfig.from_dict(cfg))
    sd = random_state_dict(cfg, seed=3)
    sd["model.embed_tokens.weight"][400:] *= 8     # make the padded ids the likeliest
    m.load_state_dict(sd)
    tok = Tokenizer.from_dir(build_test_tokenizer(str(tmp_path)))
    assert tok.vocab_size == 400
    eng = LLMEngine(m.eval(), tok, EngineConfig(max_num_seqs=2, async_scheduling=ASYNC[0]))
    outs = run(eng, [[1, 50, 60], [1, 70]], SamplingParams(max_tokens=30, temperature=1.5, seed=0, ignore_eos=True))
    for o in outs:
        assert len(o.outputs[0].token_ids) == 30 and max(o.outputs[0].token_ids) < 400


def test_stop_strings_without_tokenizer_are_refused():
    with pytest.raises(ValueError, match="stop strings"):
        make_engine().add_request([5, 6], SamplingParams(stop=["x"]))


def test_async_engine_refuses_a_live_duplicate_request_id():
    import asyncio
    from tnl.engine import AsyncEngine
    eng = AsyncEngine(make_engine())

    async def main():
        sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        first = eng.generate([5, 6, 7], sp, "same")
        out = await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            async for _ in eng.generate([8, 9], sp, "same"):
                pass
        toks = list(out.outputs[0].token_ids)
        async for o in first:                     # the first stream still runs to the end
            toks += o.outputs[0].token_ids
        return toks

    try:
        assert len(asyncio.run(main())) == 5
    finally:
        eng.shutdown()


def test_async_engine_sink_gets_every_delta_then_the_id_is_free():
    """submit(): the sink sees the deltas of a request in order, the last one finished, on the
    caller's loop; an abort ends with a finished 'abort' delta; then the request id can be reused."""
    import asyncio
    import threading
    from tnl.engine import AsyncEngine
    eng = AsyncEngine(make_engine())
    want = run(make_engine(), [[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]

    async def collect(rid, params, abort_after=None):
        got, done = [], asyncio.Event()
        loop_thread = threading.get_ident()

        def sink(item):
            assert threading.get_ident() == loop_thread
            got.append(item)
            if isinstance(item, BaseException) or item.finished:
                done.set()
            elif abort_after is not None and len(got) == abort_after:
                eng.abort(rid)

        eng.submit([5, 6, 7], params, rid, sink)
        await asyncio.wait_for(done.wait(), 30)
        return got

    async def main():
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        full = await collect("r", sp)
        aborted = await collect("r", SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True), 2)
        return full, aborted

    try:
        full, aborted = asyncio.run(main())
    finally:
        eng.shutdown()
    assert [t for o in full for t in o.outputs[0].token_ids] == want.outputs[0].token_ids
    assert [o.finished for o in full] == [False] * (len(full) - 1) + [True]
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    assert eng._streams == {}


def _seeded_with_new_token(p):
    """A seeded sample of 12 tokens and an index k >= 3 whose token appears there first (the
    tiny random model repeats one token when greedy)."""
    sp = SamplingParams(max_tokens=12, temperature=4.0, seed=5, ignore_eos=True)
    eng = make_engine(async_scheduling=False)
    g = run(eng, [p], sp)[0].outputs[0].token_ids
    return g, next(i for i in range(3, 12) if g[i] not in g[:i])


def _mixed_workload(eng: LLMEngine):
    """Requests with every kind of ending, half of them arriving mid-decode; returns what each
    produced and how many steps left a step in flight."""
    ps = prompts(8)
    free = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    g, k = _seeded_with_new_token(ps[1])
    kinds = [
        free,
        SamplingParams(max_tokens=12, temperature=4.0, seed=5, stop_token_ids=[g[k]]),   # stops at token k
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0.8, top_k=40, top_p=0.9, seed=3, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, presence_penalty=0.5),   # needs host tokens
        SamplingParams(max_tokens=0, prompt_logprobs=1),
        SamplingParams(max_tokens=12, temperature=1.0, seed=9, ignore_eos=True, min_p=0.05),
    ]
    reqs = [eng.add_request(p, sp) for p, sp in zip(ps[:4], kinds[:4])]
    overlapped = steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
        overlapped += eng._in_flight is not None
        if steps == 6:
            reqs += [eng.add_request(p, sp) for p, sp in zip(ps[4:], kinds[4:])]
        assert steps < 1000
    outs = [eng.final_output(r).outputs[0] for r in reqs]
    return [(o.token_ids, o.logprobs, o.finish_reason, o.stop_reason) for o in outs], overlapped, k


def test_async_scheduling_gives_the_same_outputs(async_scheduling):
    """Stops, lengths, logprobs, seeded sampling, penalties and late arrivals: the same tokens
    and logprobs whether or not each step is queued before the last one's tokens are read."""
    if not async_scheduling:
        pytest.skip("compares both modes in one run")
    ASYNC[0] = False
    want, none, k = _mixed_workload(make_engine(max_num_seqs=4, max_num_batched_tokens=40))
    ASYNC[0] = True
    eng = make_engine(max_num_seqs=4, max_num_batched_tokens=40)
    got, overlapped, _ = _mixed_workload(eng)
    assert none == 0 and overlapped > 5
    for (gt, glp, gf, gs), (wt, wlp, wf, ws) in zip(got, want):
        assert (gt, gf, gs) == (wt, wf, ws)
        if wlp is not None:
            assert len(glp) == len(wlp)
            for a, b in zip(glp, wlp):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
    assert want[1][2] == "stop" and len(want[1][0]) == k + 1
    assert eng.scheduler.stats() == {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 4}
    assert not eng.has_work


def test_async_scheduling_drops_the_token_after_a_stop(async_scheduling):
    """A sequence that stops at step k was already queued for step k+1: that token is dropped
    and its slot goes to the next request, which starts from a zero state."""
    if not async_scheduling:
        pytest.skip("async only")
    eng = make_engine(max_num_seqs=1)
    p, q = prompts(3)[1], prompts(3)[2]
    g, k = _seeded_with_new_token(p)
    a = eng.add_request(p, SamplingParams(max_tokens=50, temperature=4.0, seed=5, stop_token_ids=[g[k]]))
    b = eng.add_request(q, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while eng.has_work:
        eng.step()
    assert a.output_token_ids == g[:k + 1] and a.finish_reason == "stop"
    assert b.output_token_ids == ref_greedy(q, 4) and b.slot == a.slot


def test_warm_up_leaves_the_engine_as_new():
    """The start-up warm-up (run on CUDA before the engine reports ready) frees its slots,
    restores the token budget, and leaves no trace in later requests' outputs."""
    eng = make_engine(max_num_batched_tokens=100)
    eng._warm_up()
    assert eng.scheduler.stats() == {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 4}
    assert not eng.requests and not eng.has_work and eng.scheduler.max_num_batched_tokens == 100
    assert eng.counters == COUNTERS   # the warm-up's steps are not counted
    p = prompts(3)[2]
    out = run(eng, [p], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref_greedy(p, 5)


def test_async_scheduling_runs_no_row_past_max_tokens(async_scheduling):
    """A sequence whose token in flight is its last (max_tokens) is not run again: async
    scheduling decodes exactly as many rows as plain steps."""
    if not async_scheduling:
        pytest.skip("compares both modes in one run")
    decoded = {}
    for mode in (False, True):
        ASYNC[0] = mode
        eng = make_engine()
        rows = []
        execute = eng.runner.execute

        def counting(batch, *a, **kw):
            rows.append(len(batch.decode))
            return execute(batch, *a, **kw)

        eng.runner.execute = counting
        outs = run(eng, prompts(3), [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 1, 9)])
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 1, 9]
        decoded[mode] = sum(rows)
    assert decoded[True] == decoded[False] == 5 + 0 + 8

"""The engine on CPU: continuous batching equals one-at-a-time, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from helpers_model import random_state_dict, tiny_config
from reference import reference_logits
from tnl.config import EngineConfig, ModelConfig
from tnl.engine import LLMEngine, QueueFullError, SamplingParams
from tnl.engine.core import COUNTERS
from tnl.engine.request import Request
from tnl.engine.sampler import apply_penalties, sample
from tnl.engine.scheduler import Scheduler
from tnl.model.transnormer import TransnormerForCausalLM

CFG = tiny_config(vocab_size=300, linear_use_lrpe_list=[1, 0, 0])
SD = random_state_dict(CFG, seed=11, theta_scale=0.7)


def new_engine(async_scheduling: bool = False, **kw) -> LLMEngine:
    m = TransnormerForCausalLM(ModelConfig.from_dict(CFG))
    m.load_state_dict(SD)
    m.eval()
    return LLMEngine(m, None, EngineConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 64,
                                              "async_scheduling": async_scheduling, **kw}))


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Each test that runs an engine runs twice: plain steps, and with async scheduling (each
    decode step queued before the previous step's tokens are read back), CUDA's default."""
    return request.param


@pytest.fixture
def make_engine(async_scheduling):
    """new_engine in this test's scheduling mode."""
    return lambda **kw: new_engine(async_scheduling, **kw)


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


def ref_penalize(logits: torch.Tensor, prompt: list[int], output: list[int], repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> torch.Tensor:
    """vLLM's penalties on one row [V], an id at a time in float64. Repetition (HF / CTRL): each
    id in the prompt OR the output, once however often it occurs, a positive logit divided and
    any other multiplied. Presence and frequency (OpenAI): ids of the OUTPUT only,
    logit -= frequency * count + presence * (count > 0)."""
    out = logits.double().clone()
    for t in set(prompt) | set(output):
        x = out[t].item()
        out[t] = x / repetition_penalty if x > 0 else x * repetition_penalty
    for t in set(output):
        out[t] -= frequency_penalty * output.count(t) + presence_penalty
    return out


def ref_greedy(ids, n, **penalties):
    """n greedy tokens of the float64 reference, with `ref_penalize(**penalties)` at each step."""
    prompt, out = list(ids), []
    for _ in range(n):
        logits = reference_logits(SD, CFG, prompt + out)[-1]
        out.append(int(ref_penalize(logits, prompt, out, **penalties).argmax()))
    return out


def test_greedy_matches_float64_reference(make_engine):
    eng = make_engine()
    ps = prompts(4)
    outs = run(eng, ps, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == ref_greedy(p, 6)
        assert o.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("budget,slots", [(64, 4), (7, 2), (1000, 8)])
def test_batched_equals_one_at_a_time(budget, slots, make_engine):
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


def test_same_request_twice_same_tokens(make_engine):
    """A request in a slot used before starts from a zero state: the official code leaks LRPE
    positions from one call into the next, and a slot not zeroed would carry the last
    request's state. The prompt logprobs show it; the tiny model's greedy tokens are too peaked
    to (they did not change when the slot was left unzeroed)."""
    eng = make_engine(max_num_seqs=1)    # the second request gets the first one's slot
    p = prompts(3)[2]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=0)
    a, b = (run(eng, [p], sp)[0] for _ in range(2))
    ref = torch.log_softmax(reference_logits(SD, CFG, p), dim=-1)
    want = [ref[i - 1, p[i]].item() for i in range(1, len(p))]
    for o in (a, b):
        assert o.outputs[0].token_ids == ref_greedy(p, 12)
        got = [o.prompt_logprobs[i][p[i]] for i in range(1, len(p))]
        assert max(abs(x - y) for x, y in zip(got, want)) < 1e-4


def test_logprobs_and_prompt_logprobs_match_reference(make_engine):
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


def test_scoring_with_max_tokens_zero(make_engine):
    eng = make_engine()
    p = prompts(3)[2]
    o = run(eng, [p], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert o.outputs[0].token_ids == [] and o.outputs[0].finish_reason == "length"
    ref = torch.log_softmax(reference_logits(SD, CFG, p), dim=-1)
    got = [o.prompt_logprobs[i][p[i]] for i in range(1, len(p))]
    want = [ref[i - 1, p[i]].item() for i in range(1, len(p))]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert all(len(d) == 1 for d in o.prompt_logprobs[1:])


def test_stop_token_ids_and_eos(make_engine, async_scheduling):
    """A stop token id, and the model's eos id unless ignore_eos, end the request at its first
    occurrence (k >= 3, not the first token: the greedy stream repeats one token), included."""
    p = prompts(2)[1]
    g, k = _seeded_with_new_token(p)
    sp = {"max_tokens": 12, "temperature": 4.0, "seed": 5}
    o = run(make_engine(), [p], SamplingParams(**sp, stop_token_ids=[g[k]], ignore_eos=True))[0].outputs[0]
    assert o.token_ids == g[:k + 1] and o.finish_reason == "stop" and o.stop_reason == g[k]

    m = TransnormerForCausalLM(ModelConfig.from_dict({**CFG, "eos_token_id": g[k]}))
    m.load_state_dict(SD)
    eng = LLMEngine(m.eval(), None, EngineConfig(max_num_seqs=2, async_scheduling=async_scheduling))
    stopped, ignored = run(eng, [p, p], [SamplingParams(**sp), SamplingParams(**sp, ignore_eos=True)])
    assert stopped.outputs[0].token_ids == g[:k + 1] and stopped.outputs[0].finish_reason == "stop"
    assert ignored.outputs[0].token_ids == g and ignored.outputs[0].finish_reason == "length"


def test_abort_frees_slot_and_queue_bound(make_engine):
    eng = make_engine(max_num_seqs=1, max_waiting=3)
    sp = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    a = eng.add_request(prompts(1)[0], sp)
    eng.add_request(prompts(2)[1], sp)
    eng.add_request(prompts(3)[2], sp)
    with pytest.raises(QueueFullError):
        eng.add_request([5, 6], sp)
    for _ in range(3):
        eng.step()
    assert {k: v for k, v in eng.stats().items() if not k.startswith("prefix_cache")} == {
        "running": 1, "waiting": 2, "slots_used": 1, "slots_total": 1, "steps": 3, "prefill_steps": 1,
        "prefill_tokens": 1, "decode_tokens": 2, "device_busy_s": 0.0, "prefill_step_busy_s": 0.0}
    eng.abort(a.request_id)
    eng.step()
    assert a.finish_reason == "abort"
    assert eng.stats()["running"] == 1 and eng.stats()["waiting"] == 1


@pytest.mark.parametrize("bad", [[], [300], [-1], [1, "x"], [1.5]])
def test_bad_prompts_rejected(bad, make_engine):
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


PENALTIES = {
    "repetition": {"repetition_penalty": 1.7},
    "repetition_below_1": {"repetition_penalty": 0.6},      # < 1 makes seen ids likelier
    "presence": {"presence_penalty": 1.3},
    "frequency": {"frequency_penalty": 0.7},
    "negative": {"presence_penalty": -0.8, "frequency_penalty": -0.3},
    "combined": {"repetition_penalty": 1.4, "presence_penalty": 0.5, "frequency_penalty": 0.9},
}


def _request(prompt: list[int], output: list[int], **params) -> Request:
    r = Request("r", list(prompt), SamplingParams(**{"temperature": 0, **params}), frozenset())
    r.output_token_ids = list(output)
    return r


@pytest.mark.parametrize("output", [[49, 7, 5, 7, 7, 0], []], ids=["output", "first_token"])
@pytest.mark.parametrize("kind", list(PENALTIES))
def test_apply_penalties_matches_reference(kind, output):
    """Every id of one row against `ref_penalize`: 9 only in the prompt (repetition only), 7 only
    in the output (3 times), 5, 0 and 49 (the vocabulary's edges) in both, with either sign."""
    V = 50
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    logits[[0, 5, 7, 9, 49]] = torch.tensor([2.0, 0.7, 1.1, -2.2, -1.5])
    prompt = [0, 5, 5, 9, 49]
    got = logits.clone()
    apply_penalties(got, _request(prompt, output, **PENALTIES[kind]))
    want = ref_penalize(logits, prompt, output, **PENALTIES[kind])
    assert (got.double() - want).abs().max() < 1e-5
    # Presence and frequency before the first output token: the row is left exactly as it was.
    assert torch.equal(got, logits) == (not output and "repetition_penalty" not in PENALTIES[kind])


def test_sample_applies_each_rows_own_penalties():
    """One sample() call over rows with and without penalties: each row's token is the argmax of
    its own row under `ref_penalize`, and the designed rows are exactly those where the penalty
    moves the argmax. Logprobs stay those of the raw logits (vLLM's default)."""
    V = 50
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, V, generator=g) * 0.5
    logits[4] = -2 - torch.rand(V, generator=g)        # a row of negative logits only
    rows = [  # (prompt, output, params, {id: logit}, the penalty moves the argmax)
        # No penalties: its top id is seen three times and stays on top.
        ([49], [49, 49], {}, {49: 4.0, 3: 3.9}, False),
        # Repetition over the prompt: 4.0 / 2 falls below 3.5.
        ([0, 11], [], {"repetition_penalty": 2.0}, {0: 4.0, 1: 3.5}, True),
        # Presence over the output only: 13 (output) drops, 12 (prompt only) does not.
        ([12], [13], {"presence_penalty": 1.0, "logprobs": 2}, {12: 4.0, 13: 4.5}, True),
        # Frequency counts: 3 x 0.2 moves 14 below 15, one occurrence would not.
        ([2], [14, 14, 14], {"frequency_penalty": 0.2}, {14: 4.3, 15: 4.0}, True),
        # A negative logit is multiplied (divided, it would rise and stay on top).
        ([16], [], {"repetition_penalty": 3.0}, {16: -0.5, 17: -0.9}, True),
        # Sampled (top_k 1), all three: 49 -> 4.0 / 1.5, 0 -> 3.8 / 1.5 - 0.5 - 0.5, so 20 wins.
        ([49], [0], {"temperature": 1.0, "top_k": 1, "repetition_penalty": 1.5, "presence_penalty": 0.5,
                     "frequency_penalty": 0.5}, {49: 4.0, 0: 3.8, 20: 2.9}, True),
    ]
    reqs = []
    for i, (prompt, output, params, values, _) in enumerate(rows):
        logits[i, list(values)] = torch.tensor(list(values.values()))
        reqs.append(_request(prompt, output, **params))
    want = [ref_penalize(logits[i], prompt, output, **{k: v for k, v in params.items() if "penalty" in k})
            for i, (prompt, output, params, _, _) in enumerate(rows)]
    assert [bool(w.argmax() != l.argmax()) for w, l in zip(want, logits)] == [r[4] for r in rows]
    res = sample(logits.clone(), reqs).resolve()
    assert res.token_ids == [int(w.argmax()) for w in want]
    raw = torch.log_softmax(logits[2].double(), dim=-1)
    assert res.token_ids[2] == 12 and abs(res.sampled_logprob[2] - raw[12].item()) < 1e-5
    assert res.logprobs[2].keys() == {12, 13} and abs(res.logprobs[2][13] - raw[13].item()) < 1e-5


# A prompt whose greedy continuation repeats its own last token (26), with 180 close behind:
# each penalty changes the tokens at a different step, which shows what it counts.
PENALTY_PROMPT = [62, 99, 60, 26]
E2E_PENALTIES = [
    {},
    {"repetition_penalty": 1.5},      # the prompt's 26 counts: 180 from the first token
    {"presence_penalty": 2.0},        # only the output counts: 26 first, then 180
    {"frequency_penalty": 1.0},       # 26 until three of them outweigh the gap
    {"repetition_penalty": 1.2, "presence_penalty": 0.2, "frequency_penalty": 1.5},
]


def test_penalties_in_one_batch_match_the_penalized_reference(make_engine):
    """Greedy generation with each penalty, all in one batch beside an unpenalized row: exactly
    the tokens of the float64 reference model with `ref_penalize` applied at each step."""
    eng = make_engine(max_num_seqs=len(E2E_PENALTIES))
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **p) for p in E2E_PENALTIES]
    got = [o.outputs[0].token_ids for o in run(eng, [PENALTY_PROMPT] * len(params), params)]
    want = [ref_greedy(PENALTY_PROMPT, 12, **p) for p in E2E_PENALTIES]
    assert got == want
    assert want[0] == [26] * 12 and all(w != want[0] for w in want[1:])
    assert len({tuple(w) for w in want}) == len(want)


def test_scheduler_long_prompt_does_not_stall_decode():
    """Each step has a decode token for every running stream, and the long prompt's chunks fill
    the rest of the budget (it is not starved either) until it decodes too."""
    s = Scheduler(num_slots=4, max_num_batched_tokens=16, max_waiting=10)
    short = Request("a", [1, 2], SamplingParams(), frozenset())
    long = Request("b", list(range(3, 100)), SamplingParams(), frozenset())
    s.add(short)
    s.schedule()
    short.num_computed = 2
    s.add(long)
    chunks = []
    while not long.prefill_done:
        b = s.schedule()
        assert b.decode == [short] and [r for r, _ in b.prefill] == [long]
        chunks.append(b.prefill[0][1])
        long.num_computed += chunks[-1]
    assert chunks == [15] * 6 + [7]     # 97 prompt tokens; one of each step's 16 goes to `short`
    assert s.schedule().decode == [short, long]


def test_state_pool_copy_and_snapshot_fork_a_sequence(make_engine):
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


def test_model_vocab_larger_than_tokenizer_never_samples_undecodable_ids(tmp_path, async_scheduling):
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
    eng = LLMEngine(m.eval(), tok, EngineConfig(max_num_seqs=2, async_scheduling=async_scheduling))
    outs = run(eng, [[1, 50, 60], [1, 70]], SamplingParams(max_tokens=30, temperature=1.5, seed=0, ignore_eos=True))
    for o in outs:
        assert len(o.outputs[0].token_ids) == 30 and max(o.outputs[0].token_ids) < 400


def test_stop_strings_without_tokenizer_are_refused(make_engine):
    with pytest.raises(ValueError, match="stop strings"):
        make_engine().add_request([5, 6], SamplingParams(stop=["x"]))


def test_async_engine_refuses_a_live_duplicate_request_id(make_engine):
    """The first request asks for far more tokens than the test reads, so it surely still runs
    when the duplicate comes (with 5 tokens the engine thread could finish it first, and the
    duplicate was rightly accepted: the test failed now and then). It goes on unharmed."""
    import asyncio
    from tnl.engine import AsyncEngine
    eng = AsyncEngine(make_engine())
    want = ref_greedy([5, 6, 7], 8)

    async def main():
        first = eng.generate([5, 6, 7], SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True), "same")
        toks = list((await first.__anext__()).outputs[0].token_ids)
        with pytest.raises(ValueError, match="already in use"):
            async for _ in eng.generate([8, 9], SamplingParams(max_tokens=5), "same"):
                pass
        async for o in first:                     # the first stream goes on
            toks += o.outputs[0].token_ids
            if len(toks) >= len(want):
                break
        await first.aclose()                      # aborts it
        return toks

    try:
        assert asyncio.run(main())[:len(want)] == want
    finally:
        eng.shutdown()


def test_async_engine_sink_gets_every_delta_then_the_id_is_free(make_engine):
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
    eng = new_engine(async_scheduling=False)
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
        overlapped += eng.core._in_flight is not None
        if steps == 6:
            reqs += [eng.add_request(p, sp) for p, sp in zip(ps[4:], kinds[4:])]
        assert steps < 1000
    outs = [eng.final_output(r).outputs[0] for r in reqs]
    return [(o.token_ids, o.logprobs, o.finish_reason, o.stop_reason) for o in outs], overlapped, k


def test_async_scheduling_gives_the_same_outputs():
    """Stops, lengths, logprobs, seeded sampling, penalties and late arrivals: the same tokens
    and logprobs whether or not each step is queued before the last one's tokens are read."""
    want, none, k = _mixed_workload(new_engine(False, max_num_seqs=4, max_num_batched_tokens=40))
    eng = new_engine(True, max_num_seqs=4, max_num_batched_tokens=40)
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


def test_async_scheduling_drops_the_token_after_a_stop():
    """A sequence that stops at step k was already queued for step k+1: that token is dropped
    and its slot goes to the next request, which starts from a zero state."""
    eng = new_engine(True, max_num_seqs=1)
    p, q = prompts(3)[1], prompts(3)[2]
    g, k = _seeded_with_new_token(p)
    a = eng.add_request(p, SamplingParams(max_tokens=50, temperature=4.0, seed=5, stop_token_ids=[g[k]]))
    b = eng.add_request(q, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while eng.has_work:
        eng.step()
    assert a.output_token_ids == g[:k + 1] and a.finish_reason == "stop"
    assert b.output_token_ids == ref_greedy(q, 4) and b.slot == a.slot


def test_warm_up_leaves_the_engine_as_new(make_engine):
    """The start-up warm-up (run on CUDA before the engine reports ready) frees its slots,
    restores the token budget, and leaves no trace in later requests' outputs."""
    eng = make_engine(max_num_batched_tokens=100)
    eng.core.warm_up()
    assert eng.scheduler.stats() == {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 4}
    assert not eng.requests and not eng.has_work and eng.scheduler.max_num_batched_tokens == 100
    assert eng.core.counters == COUNTERS   # the warm-up's steps are not counted
    p = prompts(3)[2]
    out = run(eng, [p], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref_greedy(p, 5)


def test_async_scheduling_runs_no_row_past_max_tokens():
    """A sequence whose token in flight is its last (max_tokens) is not run again: async
    scheduling decodes exactly as many rows as plain steps (the engine's decode-row counter)."""
    decoded = {}
    for mode in (False, True):
        eng = new_engine(mode)
        outs = run(eng, prompts(3), [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 1, 9)])
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 1, 9]
        decoded[mode] = eng.stats()["decode_tokens"]
    assert decoded[True] == decoded[False] == 5 + 0 + 8


def test_guard_shows_memory_a_function_left_unwritten():
    """tests/conftest.py poisons torch.empty: an op that writes half of its output shows NaN in
    the other half, so its comparison with a reference fails (fresh memory is often zeros, or
    an earlier tensor's values, which can pass)."""
    def half_written(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        out[:len(x) // 2] = x[:len(x) // 2] * 2
        return out

    x = torch.arange(8.0)
    y = half_written(x)
    assert torch.equal(y[:4], x[:4] * 2) and torch.isnan(y[4:]).all()
    assert not torch.allclose(y, x * 2)
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(x.new_empty(2, 2)).all()
    assert (torch.empty(3, dtype=torch.long) == torch.iinfo(torch.long).max).all()   # no valid index
    with torch.device("meta"):    # device contexts still place the patched constructors
        assert torch.empty(2).device.type == "meta"

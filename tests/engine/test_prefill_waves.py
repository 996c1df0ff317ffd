"""Prompts admitted in waves while sequences decode (Scheduler.prefill_wave_s): a prompt waits
for a wave that fills the free slots or the token budget, or until the oldest waited long
enough; an idle engine admits at once; 0 turns waves off. And the engine's default per device."""
from __future__ import annotations

import pytest

from tnl.config import EngineConfig
from tnl.engine.request import Request
from tnl.engine.sampling_params import SamplingParams
from tnl.engine.scheduler import Scheduler


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def request(name: str, n: int, clock: Clock) -> Request:
    r = Request(name, list(range(3, 3 + n)), SamplingParams(max_tokens=100), frozenset())
    r.metrics.arrival_time = clock()
    return r


def decoding(s: Scheduler, clock: Clock, n: int = 2) -> list[Request]:
    """n sequences admitted and past their prompts (decoding from the next step)."""
    rs = [request(f"d{i}", 4, clock) for i in range(n)]
    for r in rs:
        s.add(r)
    out = s.schedule()
    assert [r for r, _ in out.prefill] == rs      # idle: admitted at once, whatever the wave
    for r, k in out.prefill:
        r.num_computed += k
    return rs


def admitted(out) -> list[str]:
    return [r.request_id for r, _ in out.prefill]


def test_a_lone_prompt_waits_for_the_wave_time_beside_decoding_rows():
    clock = Clock()
    s = Scheduler(num_slots=8, max_num_batched_tokens=512, max_waiting=10, prefill_wave_s=0.02, clock=clock)
    running = decoding(s, clock)
    s.add(request("new", 16, clock))
    out = s.schedule()
    assert out.decode == running and admitted(out) == [] and s.waves_deferred == 1
    clock.t += 0.015
    assert admitted(s.schedule()) == []
    s.add(request("new2", 16, clock))                 # a second one joins the wave
    clock.t += 0.006                                  # the oldest has now waited 21 ms
    out = s.schedule()
    assert admitted(out) == ["new", "new2"] and out.decode == running


def test_a_wave_that_fills_the_free_slots_or_the_budget_goes_at_once():
    clock = Clock()
    s = Scheduler(num_slots=4, max_num_batched_tokens=40, max_waiting=10, prefill_wave_s=1.0, clock=clock)
    decoding(s, clock)                                # 2 of 4 slots used
    s.add(request("a", 5, clock))
    assert admitted(s.schedule()) == []
    s.add(request("b", 5, clock))                     # 2 waiting = 2 free slots
    assert admitted(s.schedule()) == ["a", "b"]

    clock2 = Clock()
    s = Scheduler(num_slots=8, max_num_batched_tokens=40, max_waiting=10, prefill_wave_s=1.0, clock=clock2)
    decoding(s, clock2)
    s.add(request("long", 38, clock2))                # 38 + 2 decode tokens: the budget is full
    assert admitted(s.schedule()) == ["long"]


def test_waves_off_and_idle_engines_admit_at_once():
    clock = Clock()
    s = Scheduler(num_slots=8, max_num_batched_tokens=512, max_waiting=10, prefill_wave_s=0.0, clock=clock)
    decoding(s, clock)
    s.add(request("new", 16, clock))
    assert admitted(s.schedule()) == ["new"] and s.waves_deferred == 0


def test_a_prompt_in_progress_keeps_its_chunks_while_newcomers_wait():
    clock = Clock()
    s = Scheduler(num_slots=8, max_num_batched_tokens=20, max_waiting=10, prefill_wave_s=1.0, clock=clock)
    running = decoding(s, clock)
    long = request("long", 30, clock)
    s.add(long)
    clock.t += 1.0
    out = s.schedule()
    assert admitted(out) == ["long"] and out.prefill[0][1] == 18
    long.num_computed += 18
    s.add(request("new", 4, clock))
    out = s.schedule()                                # long's last 12 tokens go on; "new" waits
    assert admitted(out) == ["long"] and out.prefill[0][1] == 12 and out.decode == running


def test_bad_wave_values():
    assert EngineConfig().prefill_wave_ms is None and EngineConfig(prefill_wave_ms=0).prefill_wave_ms == 0
    for bad in (-1, 1e9, True, "20"):
        with pytest.raises(ValueError, match="prefill_wave_ms"):
            EngineConfig(prefill_wave_ms=bad)


def test_engine_with_waves_gives_the_same_tokens_and_defers():
    """An engine whose waves never time out (10 s): prompts arriving beside decoding rows wait
    for a wave (the slots filling up, or the decoders finishing) and the tokens are those of
    an engine that admits at once. A CPU engine's default is no waves."""
    from test_engine import new_engine, prompts
    assert new_engine().core.scheduler.prefill_wave_s == 0.0
    ps = prompts(6)
    outs = {}
    for wave in (0, 10_000):
        eng = new_engine(prefill_wave_ms=wave)
        assert eng.core.scheduler.prefill_wave_s == wave / 1000
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        reqs = [eng.add_request(p, greedy) for p in ps[:2]]
        eng.step()
        eng.step()
        reqs.append(eng.add_request(ps[2], greedy))    # 1 waiting < 2 free slots: it waits
        eng.step()
        eng.step()
        reqs.append(eng.add_request(ps[3], greedy))    # 2 waiting = 2 free: the wave goes
        while eng.has_work:
            eng.step()
        outs[wave] = [eng.final_output(r).outputs[0].token_ids for r in reqs]
        assert (eng.core.scheduler.waves_deferred > 0) == (wave > 0)
    assert outs[0] == outs[10_000]

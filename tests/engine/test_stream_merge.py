"""A reader slower than the engine gets merged deltas (bigger pieces), never a different answer."""
from __future__ import annotations

import asyncio

from starlette.requests import Request as HTTPRequest

from helpers_server import make_tiny_model
from tnl.config import EngineConfig
from tnl.engine import AsyncEngine, SamplingParams
from tnl.loading import build_engine
from tnl.server.config import ServerConfig
from tnl.server.metrics import ServerMetrics
from tnl.server.serving import Generation, ServerState


def test_slow_reader_gets_merged_deltas_with_the_same_tokens_text_and_logprobs(tmp_path):
    model_dir = make_tiny_model(tmp_path / "tiny")
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    ids = [1, 57, 99, 203, 18]
    plain = build_engine(model_dir, device="cpu", engine_config=EngineConfig(max_num_seqs=2), progress=False)
    want = plain.add_request(ids, sp)
    while plain.has_work:
        plain.step()
    want_text = plain.final_output(want).outputs[0].text

    engine = AsyncEngine(build_engine(model_dir, device="cpu", engine_config=EngineConfig(max_num_seqs=2),
                                      progress=False))
    state = ServerState(config=ServerConfig(), metrics=ServerMetrics(lambda: None), engine=engine)

    async def never_disconnects():
        await asyncio.Event().wait()

    async def read_slowly():
        http = HTTPRequest({"type": "http", "method": "POST", "path": "/", "headers": []}, never_disconnects)
        gen = Generation(state, http, [ids], [sp], "slow")
        await gen.start(watch_disconnect=False)
        pieces = []
        async for _, out in gen.outputs():
            pieces.append(out)
            await asyncio.sleep(0.03)   # a busy reader: the engine runs ahead meanwhile
        return pieces

    try:
        pieces = asyncio.run(read_slowly())
    finally:
        engine.shutdown()
    outs = [p.outputs[0] for p in pieces]
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == want.output_token_ids
    assert "".join(o.text for o in outs) == want_text
    assert [lp for o in outs for lp in o.logprobs] == want.output_logprobs
    assert pieces[-1].finished and outs[-1].finish_reason == "length"
    assert not any(p.finished for p in pieces[:-1])
    assert len(pieces) < len(tokens) // 2, "deltas were not merged"

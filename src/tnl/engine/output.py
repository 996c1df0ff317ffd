"""The output processor: token ids -> text. Incremental detokenization, stop strings, the
hold-back of a tail that could begin one, and the deltas handed to callers (vLLM v1 keeps
these outside the engine core too). Torch-free.

The core appends tokens; after each step `update` turns a request's new tokens into text and
may finish the request on a stop string (through the scheduler, so its slot is freed like any
other). `take_delta` is what a stream sends next, `final_output` the whole result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tnl.engine.request import CompletionOutput, Request, RequestOutput


@dataclass
class _Text:
    detok: object | None          # IncrementalDetokenizer (None: the model has no tokenizer)
    text: str = ""                # detokenized output so far (stop strings cut)
    emitted: int = 0              # len(text) already handed to the caller
    num_tokens: int = 0           # output tokens already turned into text
    sent_tokens: int = 0          # output tokens already handed to the caller
    first: bool = field(default=True)   # the next delta is the first (it carries prompt logprobs)


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._texts: dict[str, _Text] = {}

    def add(self, req: Request) -> None:
        detok = None
        if self.tokenizer is not None:
            from tnl.model.tokenizer import IncrementalDetokenizer
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=req.prompt_token_ids,
                                           skip_special_tokens=req.params.skip_special_tokens)
        self._texts[req.request_id] = _Text(detok)

    def release(self, request_id: str) -> None:
        self._texts.pop(request_id, None)

    def text(self, req: Request) -> str:
        return self._texts[req.request_id].text

    def update(self, req: Request, scheduler) -> None:
        """Detokenize the tokens the core appended since the last call; a stop string cuts the
        text there and finishes the request (scheduler.finish)."""
        t = self._texts[req.request_id]
        if t.detok is None:
            t.num_tokens = len(req.output_token_ids)
            return
        stops = req.params.stop
        while t.num_tokens < len(req.output_token_ids):
            tok = req.output_token_ids[t.num_tokens]
            t.num_tokens += 1
            last = t.num_tokens == len(req.output_token_ids)
            before = len(t.text)
            if not (last and req.finished and req.stop_reason == tok and tok in req.stop_ids):
                t.text += t.detok.add(tok)   # a stop token ends the output without showing in the text
            if last and req.finished:
                t.text += t.detok.flush()
            for s in stops:
                i = t.text.find(s, max(0, before - len(s) + 1))
                if i >= 0:
                    t.text = t.text[:i]
                    scheduler.finish(req, "stop", s)
                    t.num_tokens = len(req.output_token_ids)
                    return

    def _safe_text_end(self, req: Request, t: _Text) -> int:
        """How much of the text may be shown: hold back a tail that could begin a stop string."""
        if req.finished or not req.params.stop:
            return len(t.text)
        hold = 0
        for s in req.params.stop:
            for k in range(min(len(s) - 1, len(t.text)), hold, -1):
                if t.text.endswith(s[:k]):
                    hold = k
                    break
        return len(t.text) - hold

    def take_delta(self, req: Request) -> RequestOutput:
        """The output since the last delta: new text (minus a held-back tail), token ids and
        logprobs, and the finish reason once finished. The first delta carries the prompt's
        logprobs."""
        t = self._texts[req.request_id]
        end = self._safe_text_end(req, t)
        text = t.text[t.emitted:end]
        t.emitted = max(t.emitted, end)
        sent, t.sent_tokens = t.sent_tokens, len(req.output_token_ids)
        first, t.first = t.first, False
        lps = req.output_logprobs[sent:] if req.output_logprobs is not None else None
        out = CompletionOutput(0, text, req.output_token_ids[sent:], lps,
                               req.finish_reason if req.finished else None,
                               req.reported_cumulative_logprob, req.stop_reason)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             req.prompt_logprobs if first else None, [out], req.finished, req.metrics,
                             req.num_prompt, len(req.output_token_ids), req.num_cached)

    def final_output(self, req: Request) -> RequestOutput:
        out = CompletionOutput(0, self._texts[req.request_id].text, list(req.output_token_ids), req.output_logprobs,
                               req.finish_reason, req.reported_cumulative_logprob, req.stop_reason)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.prompt_logprobs, [out], True,
                             req.metrics, req.num_prompt, len(req.output_token_ids), req.num_cached)


def merge_deltas(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one sequence as one (a slow reader gets bigger pieces)."""
    oa, ob = a.outputs[0], b.outputs[0]
    lps = None if oa.logprobs is None and ob.logprobs is None else (oa.logprobs or []) + (ob.logprobs or [])
    out = CompletionOutput(ob.index, oa.text + ob.text, oa.token_ids + ob.token_ids, lps, ob.finish_reason,
                           ob.cumulative_logprob, ob.stop_reason)
    return RequestOutput(b.request_id, b.prompt, b.prompt_token_ids,
                         a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
                         [out], b.finished, b.metrics, b.num_prompt_tokens, b.num_generated_tokens,
                         b.num_cached_tokens)

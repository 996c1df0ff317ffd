"""The output processor: token ids -> text. Incremental detokenization, stop strings, the
hold-back of a tail that could begin one, and the deltas handed to callers (vLLM v1 keeps
these outside the engine core too). Torch-free.

The core appends tokens; after each step `update` turns a request's new tokens into text and
may finish the request on a stop string (through the scheduler, so its slot is freed like any
other). `take_delta` is what a stream sends next, `final_output` the whole result.

Stop strings cost each step the new text, not the whole text: each stop string is a KMP
automaton fed only the new characters (`_StopMatcher`), whose state is also how much of the
text's tail must be held back. A step does O(new characters × stop strings) work, at most one
stop string's length more when a long partial match breaks (sampling_params caps both).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tnl.engine.request import CompletionOutput, Request, RequestOutput


class _StopMatcher:
    """One stop string as a Knuth-Morris-Pratt automaton over the text, fed as the text grows.
    `state` is the length of the longest tail of the text so far that is a prefix of the stop
    string: a match when it reaches the whole string, else what a stream must hold back."""

    __slots__ = ("stop", "fail", "state")

    def __init__(self, stop: str):
        self.stop = stop
        self.fail = [0] * len(stop)   # fail[i]: the longest proper prefix of stop[:i+1] that also ends it
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k
        self.state = 0

    def feed(self, text: str) -> int:
        """Advance over `text`: the index in it just past the first match, or -1."""
        s, fail, k, n = self.stop, self.fail, self.state, len(self.stop)
        j, end = 0, len(text)
        while j < end:
            if k == 0:   # no partial match: skip to where one could begin (str.find, at C speed)
                j = text.find(s[0], j)
                if j < 0:
                    break
            c = text[j]
            while k and s[k] != c:
                k = fail[k - 1]
            if s[k] == c:
                k += 1
                if k == n:
                    self.state = k
                    return j + 1
            j += 1
        self.state = k
        return -1


@dataclass
class _Text:
    detok: object | None          # IncrementalDetokenizer (None: the model has no tokenizer)
    stops: list[_StopMatcher]     # one per stop string, in the request's order
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
        detok, stops = None, []
        if self.tokenizer is not None:
            from tnl.model.tokenizer import IncrementalDetokenizer
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=req.prompt_token_ids,
                                           skip_special_tokens=req.params.skip_special_tokens)
            stops = [_StopMatcher(s) for s in req.params.stop]   # (without a tokenizer stop strings are refused)
        self._texts[req.request_id] = _Text(detok, stops)

    def release(self, request_id: str) -> None:
        self._texts.pop(request_id, None)

    def text(self, req: Request) -> str:
        return self._texts[req.request_id].text

    def update(self, req: Request, scheduler) -> None:
        """Detokenize the tokens the core appended since the last call; a stop string cuts the
        text there and finishes the request (scheduler.finish). Of the stop strings that end in
        a token's text, the first in the request's list wins, at its first occurrence."""
        t = self._texts[req.request_id]
        if t.detok is None:
            t.num_tokens = len(req.output_token_ids)
            return
        while t.num_tokens < len(req.output_token_ids):
            tok = req.output_token_ids[t.num_tokens]
            t.num_tokens += 1
            last = t.num_tokens == len(req.output_token_ids)
            piece = ""
            if not (last and req.finished and req.stop_reason == tok and tok in req.stop_ids):
                piece = t.detok.add(tok)   # a stop token ends the output without showing in the text
            if last and req.finished:
                piece += t.detok.flush()
            before = len(t.text)
            t.text += piece
            for m in t.stops:
                end = m.feed(piece)
                if end >= 0:
                    t.text = t.text[:before + end - len(m.stop)]
                    scheduler.finish(req, "stop", m.stop)
                    t.num_tokens = len(req.output_token_ids)
                    return

    def _safe_text_end(self, req: Request, t: _Text) -> int:
        """How much of the text may be shown: hold back a tail that could begin a stop string."""
        if req.finished or not t.stops:
            return len(t.text)
        return len(t.text) - max(m.state for m in t.stops)

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

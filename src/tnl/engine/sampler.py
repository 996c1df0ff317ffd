"""Batched sampling on the device: penalties, temperature, top-k / top-p / min-p, logprobs.

Sampling uses the exponential-race form (argmax of p / E with E ~ Exp(1)), which needs no
cumulative sums and lets a seeded request draw its noise from its own generator, so its
tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tnl.engine.request import Request
from tnl.model.transnormer import to_device as _to_device


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]   # per row: top-k logprobs incl. the sampled token
    sampled_logprob: list[float | None]      # None for rows that asked for no logprobs


def _logprob_dicts(chosen: list[int], chosen_lp: list[float], vals: list[list[float]] | None,
                   ids: list[list[int]] | None, ks: list[int]) -> list[dict[int, float]]:
    """Per row {id: logprob}: the chosen id first, then the top ks[i] ids."""
    out = []
    for i, (c, clp) in enumerate(zip(chosen, chosen_lp)):
        row = {c: clp}
        for j in range(ks[i]):
            row.setdefault(ids[i][j], vals[i][j])
        out.append(row)
    return out


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[dict[int, float]]:
    """logprobs [N, V], chosen [N] -> per row {id: logprob} for the top k plus the chosen id."""
    chosen_lp = logprobs.gather(1, chosen.view(-1, 1)).squeeze(1).tolist()
    vals = ids = None
    if k > 0:
        v, i = logprobs.topk(k, dim=-1)
        vals, ids = v.tolist(), i.tolist()
    return _logprob_dicts(chosen.tolist(), chosen_lp, vals, ids, [k] * len(chosen_lp))


class PendingSample:
    """Sampled tokens still on the device. `start_copy()` queues their copy to the host behind
    the work already on the stream and returns at once; `resolve()` waits for that copy only.
    Between the two the engine can launch the next step (whose input ids are `token_ids`)."""

    def __init__(self, token_ids: torch.Tensor, sampled_lp: torch.Tensor | None,
                 top: tuple[list[int], list[int], torch.Tensor | None, torch.Tensor | None] | None):
        """top: (rows wanting logprobs, their k, top-k values [R, kmax], ids [R, kmax]); the
        tensors are None when every k is 0 (only the sampled token's logprob is wanted)."""
        self.token_ids = token_ids          # [N] long, on the device
        self._dev = [token_ids] + ([sampled_lp] if sampled_lp is not None else []) \
            + ([top[2], top[3]] if top is not None and top[2] is not None else [])
        self._rows_ks = (top[0], top[1]) if top is not None else None
        self._host: list[torch.Tensor] | None = None
        self._event = None

    def start_copy(self) -> "PendingSample":
        if self.token_ids.is_cuda:
            self._host = [t.to("cpu", non_blocking=True) for t in self._dev]
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self.token_ids.device))   # where the copies run
        else:
            self._host = self._dev
        return self

    def resolve(self) -> SampleResult:
        if self._host is None:
            self.start_copy()
        if self._event is not None:
            self._event.synchronize()
        host = [t.tolist() for t in self._host]
        chosen = host[0]
        sampled_lp = host[1] if len(host) > 1 else [None] * len(chosen)
        lps: list[dict[int, float] | None] = [None] * len(chosen)
        if self._rows_ks is not None:
            rows, ks = self._rows_ks
            dicts = _logprob_dicts([chosen[i] for i in rows], [sampled_lp[i] for i in rows],
                                   host[2] if len(host) > 2 else None, host[3] if len(host) > 2 else None, ks)
            for i, d in zip(rows, dicts):
                lps[i] = d
        return SampleResult(chosen, lps, sampled_lp)


def apply_penalties(logits: torch.Tensor, req: Request) -> None:
    """In place on one row [V]. Repetition (HF): over prompt and output tokens; presence and
    frequency (OpenAI): over output tokens."""
    p = req.params
    V = logits.shape[-1]
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), device=logits.device)
        seen = seen[seen < V]
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
        counts = torch.bincount(torch.tensor(req.output_token_ids, device=logits.device), minlength=V)[:V]
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def sample(logits: torch.Tensor, reqs: list[Request]) -> PendingSample:
    """logits [N, V] float32, one row per request (its next-token distribution). Nothing here
    waits for the device: the result stays there until `resolve()`."""
    N, V = logits.shape
    dev = logits.device
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    # logprobs are of the raw distribution, before penalties; computed only when asked for
    lse = torch.logsumexp(logits, dim=-1) if rows else None
    raw = logits.clone() if rows and any(r.params.needs_penalties for r in reqs) else logits
    for i, r in enumerate(reqs):
        if r.params.needs_penalties:
            apply_penalties(logits[i], r)

    chosen = logits.argmax(dim=-1)
    if not all(r.params.greedy for r in reqs):
        temps = _to_device([r.params.temperature for r in reqs], torch.float32, dev)
        greedy = temps == 0
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).view(-1, 1)
        if any(r.params.top_k > 0 for r in reqs):
            ks = _to_device([min(r.params.top_k, V) if r.params.top_k > 0 else V for r in reqs], torch.long, dev)
            kth = scaled.sort(dim=-1, descending=True).values.gather(1, (ks - 1).view(-1, 1))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(r.params.top_p < 1 for r in reqs):
            tp = _to_device([r.params.top_p for r in reqs], torch.float32, dev).view(-1, 1)
            sp, order = probs.sort(dim=-1, descending=True)
            before = sp.cumsum(dim=-1) - sp               # mass strictly above each token
            sp = sp.masked_fill(before >= tp, 0.0)        # keeps at least the top token
            probs = torch.zeros_like(probs).scatter_(1, order, sp)
        if any(r.params.min_p > 0 for r in reqs):
            mp = _to_device([r.params.min_p for r in reqs], torch.float32, dev).view(-1, 1)
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        noise.exponential_()
        for i, r in enumerate(reqs):
            if r.generator is not None and not r.params.greedy:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, sampled)

    if not rows:
        return PendingSample(chosen, None, None)
    chosen_lp = raw.gather(1, chosen.view(-1, 1)).squeeze(1) - lse
    ks = [reqs[i].params.logprobs for i in rows]
    sub = raw if len(rows) == N else raw[_to_device(rows, torch.long, dev)]
    vals = ids = None
    if max(ks) > 0:
        vals, ids = torch.log_softmax(sub, dim=-1).topk(max(ks), dim=-1)
    return PendingSample(chosen, chosen_lp, (rows, ks, vals, ids))

"""Batched sampling on the device: penalties, temperature, top-k / top-p / min-p, logprobs.

Sampling uses the exponential-race form (argmax of p / E with E ~ Exp(1)), which needs no
cumulative sums and lets a seeded request draw its noise from its own generator, so its
tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tnl.engine.request import Request


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]   # per row: top-k logprobs incl. the sampled token
    sampled_logprob: list[float]


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: torch.Tensor | int) -> list[dict[int, float]]:
    """logprobs [N, V], chosen [N] -> per row {id: logprob} for the top k plus the chosen id.
    One device->host copy for the whole batch."""
    kmax = int(k) if isinstance(k, int) else int(k.max())
    chosen_lp = logprobs.gather(1, chosen.view(-1, 1)).squeeze(1)
    if kmax > 0:
        vals, ids = logprobs.topk(kmax, dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
    ks = [kmax] * len(chosen) if isinstance(k, int) else k.tolist()
    out = []
    for i, (c, clp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist())):
        row = {c: clp}
        if kmax > 0:
            for j in range(ks[i]):
                row.setdefault(ids[i][j], vals[i][j])
        out.append(row)
    return out


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


def sample(logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
    """logits [N, V] float32, one row per request (its next-token distribution)."""
    N, V = logits.shape
    dev = logits.device
    lse = torch.logsumexp(logits, dim=-1)          # raw distribution, before penalties
    raw = logits.clone() if any(r.params.needs_penalties for r in reqs) else logits
    for i, r in enumerate(reqs):
        if r.params.needs_penalties:
            apply_penalties(logits[i], r)

    temps = torch.tensor([r.params.temperature for r in reqs], device=dev, dtype=torch.float32)
    greedy = temps == 0
    chosen = logits.argmax(dim=-1)
    if not bool(all(r.params.greedy for r in reqs)):
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).view(-1, 1)
        if any(r.params.top_k > 0 for r in reqs):
            ks = torch.tensor([r.params.top_k if r.params.top_k > 0 else V for r in reqs], device=dev)
            kth = scaled.sort(dim=-1, descending=True).values.gather(1, (ks.clamp(max=V) - 1).view(-1, 1))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(r.params.top_p < 1 for r in reqs):
            tp = torch.tensor([r.params.top_p for r in reqs], device=dev).view(-1, 1)
            sp, order = probs.sort(dim=-1, descending=True)
            before = sp.cumsum(dim=-1) - sp               # mass strictly above each token
            sp = sp.masked_fill(before >= tp, 0.0)        # keeps at least the top token
            probs = torch.zeros_like(probs).scatter_(1, order, sp)
        if any(r.params.min_p > 0 for r in reqs):
            mp = torch.tensor([r.params.min_p for r in reqs], device=dev).view(-1, 1)
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        noise.exponential_()
        for i, r in enumerate(reqs):
            if r.generator is not None and not r.params.greedy:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, sampled)

    chosen_lp = raw.gather(1, chosen.view(-1, 1)).squeeze(1) - lse
    want = [r.params.logprobs for r in reqs]
    lps: list[dict[int, float] | None] = [None] * N
    rows = [i for i, k in enumerate(want) if k is not None]
    if rows:
        idx = torch.tensor(rows, device=dev)
        ks = torch.tensor([want[i] for i in rows], device=dev)
        for i, d in zip(rows, top_logprobs(torch.log_softmax(raw[idx], dim=-1), chosen[idx], ks)):
            lps[i] = d
    return SampleResult(chosen.tolist(), lps, chosen_lp.tolist())

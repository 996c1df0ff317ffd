"""State-affine routing of tnl's replicas on Ray Serve: a request goes to the replica that holds
the longest prefix of its prompt, as a prompt-state cache snapshot. Ray-free (tnl.ray_router is
the Ray Serve request router that uses it).

The router (a Ray Serve custom request router: `ray.serve.request_router.RequestRouter`,
configured on the replica deployment through `ray.serve.config.RequestRouterConfig`; tnl.ray_app
sets it up) runs inside the process that calls the replicas through a DeploymentHandle (tnl's
ingress), so it sees each call's arguments. Every call carries a `Route` keyword:

* `chain`: the prompt cut into segments (chat messages; blocks of text or token ids for
  completions), each segment's hash covering all the segments before it (`route_for`), so two
  prompts share their first k hashes exactly when they share their first k segments.
* The router remembers which replica was sent which chains (`PrefixIndex`, bounded, least
  recently used first out) and sends a request to the replica that was sent its longest prefix.
  That view can be stale (the replica evicted the snapshot, or restarted): the request is then a
  cache miss on that replica, computed in full; the answer is the same, since only tnl's own cache
  decides what is reused.
* A prefix every replica was sent (a system prompt that all conversations share) is no reason to
  prefer one; then, and for new conversations, the least loaded replica wins.
* The holder is passed over when it is saturated (its ongoing requests fill its state slots, as
  its routing stats report them) or more than `imbalance` requests busier than the least loaded
  replica. The request then carries `holder`: the chosen replica may pull the state from it
  (tnl.ray_app, when that is cheaper than computing it again).

The router writes back into the caller's `Route` (the same object: the router runs in the
caller's process): `replica`, the replica chosen, which the ingress needs to retry elsewhere
after a replica failed; and, when asked (`list_replicas`), the replicas it knows, for fan-outs
such as GET /metrics. `target` pins a call to one replica (state moves, fan-outs), `avoid` keeps
a call off replicas (the retry after a failure).

Hashes are blake2b, not Python's hash(): two ingress replicas (processes) compute the same chains.
"""
from __future__ import annotations

import hashlib
import json
import random
import struct
from collections import OrderedDict
from dataclasses import dataclass, field


TEXT_BLOCK_CHARS = 128    # a completion prompt's text is cut into blocks of this many characters
IDS_BLOCK = 32            # ... and a prompt of token ids into blocks of this many ids
MAX_SEGMENTS = 4096       # past this many segments a prompt's rest does not count (512k characters)
DEFAULT_IMBALANCE = 8     # requests a holder may have beyond the least loaded replica and still be chosen
DEFAULT_INDEX_ENTRIES = 1_000_000   # chain hashes remembered (~150 MB at most)
ROUTED_PATHS = ("/", "/v1/chat/completions", "/v1/completions", "/v1/state/export")


@dataclass
class Route:
    """What the router knows about one call to the replicas, and what it tells the caller.

    Set by the caller: chain (the prompt's segment hashes, `route_for`), target (this replica
    only), avoid (not these replicas), list_replicas (fill `replicas`).
    Set by the router: replica (the one chosen), holder (the replica with the request's longest
    prefix, when it was passed over), replicas ([(replica id, routing stats)] of every replica,
    when list_replicas)."""

    chain: tuple[int, ...] = ()
    target: str | None = None
    avoid: set[str] = field(default_factory=set)
    list_replicas: bool = False
    replica: str | None = None
    holder: str | None = None
    replicas: list[tuple[str, dict]] = field(default_factory=list)


# ---- chains ----------------------------------------------------------------------------------

def _chain(segments) -> tuple[int, ...]:
    out, h = [], b""
    for seg in segments:
        if len(out) == MAX_SEGMENTS:
            break
        h = hashlib.blake2b(h + seg, digest_size=8).digest()
        out.append(int.from_bytes(h, "little"))
    return tuple(out)


def _text(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def message_chain(messages: list[dict]) -> tuple[int, ...]:
    """One segment per chat message ({'role', 'content'} as the chat template sees them)."""
    return _chain(_text(m["role"]) + b"\0" + _text(m["content"]) for m in messages)


def text_chain(text: str) -> tuple[int, ...]:
    """Blocks of TEXT_BLOCK_CHARS characters; the last, shorter one too (so a repeated prompt matches whole)."""
    return _chain(_text(text[i:i + TEXT_BLOCK_CHARS]) for i in range(0, len(text), TEXT_BLOCK_CHARS))


def ids_chain(ids: list[int]) -> tuple[int, ...]:
    def blocks():
        for i in range(0, len(ids), IDS_BLOCK):
            block = ids[i:i + IDS_BLOCK]
            yield struct.pack(f"<{len(block)}q", *block)
    return _chain(blocks())


def chat_messages(raw: dict) -> list[dict] | None:
    """A chat body's messages as the chat template sees them (tnl.server.protocol's own
    normalization), or None when they are not valid (the replica answers that with a 400)."""
    from pydantic import ValidationError

    from tnl.server.protocol import ChatMessage

    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    try:
        return [ChatMessage.model_validate(m).as_template_message() for m in messages]
    except (ValidationError, TypeError, ValueError):
        return None


def seed_messages(raw: dict) -> list[dict] | None:
    """POST /'s {"prompt", "history"} as the chat it stands for (the system prompt included)."""
    from pydantic import ValidationError

    from tnl.server.protocol import SeedRequest

    try:
        return SeedRequest.model_validate(raw).messages()
    except (ValidationError, TypeError, ValueError):
        return None


def completion_prompt(raw: dict) -> str | list[int] | None:
    """The (first) prompt of a completions body: text or token ids; None if it is neither."""
    p = raw.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        p = p[0]   # a batch of prompts: they all go to one replica, routed by the first
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(type(t) is int for t in p):
        return p
    return None


def route_for(method: str, path: str, body: bytes) -> Route:
    """The Route of an HTTP request to tnl: its prompt's chain when it is a generation (or a
    state export) with a body tnl would accept; an empty chain (routed by load) otherwise."""
    if method != "POST" or path not in ROUTED_PATHS or not body:
        return Route()
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):
        return Route()
    if not isinstance(raw, dict):
        return Route()
    if path == "/":
        messages = seed_messages(raw)
        return Route(message_chain(messages)) if messages else Route()
    if raw.get("messages") is not None:     # chat, or a state export of a chat
        messages = chat_messages(raw)
        return Route(message_chain(messages)) if messages else Route()
    prompt = raw.get("token_ids") if path == "/v1/state/export" and raw.get("token_ids") else completion_prompt(raw)
    if isinstance(prompt, str):
        return Route(text_chain(prompt))
    if isinstance(prompt, list):
        return Route(ids_chain(prompt))
    return Route()


# ---- the index -------------------------------------------------------------------------------

class PrefixIndex:
    """Which replicas were sent which chain hashes: hash -> {replica id}, least recently
    inserted or matched first out once `max_entries` hashes are kept."""

    def __init__(self, max_entries: int = DEFAULT_INDEX_ENTRIES):
        self.max_entries = max_entries
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def insert(self, chain: tuple[int, ...], replica: str) -> None:
        for h in chain:
            holders = self._holders.get(h)
            if holders is None:
                self._holders[h] = {replica}
            else:
                holders.add(replica)
                self._holders.move_to_end(h)
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)

    def depths(self, chain: tuple[int, ...], replicas: set[str]) -> dict[str, int]:
        """For each of `replicas`, how many leading segments of `chain` it was sent (0: none)."""
        out = dict.fromkeys(replicas, 0)
        left = set(replicas)
        for depth in range(len(chain), 0, -1):   # deepest first: each replica's first hit is its depth
            if not left:
                break
            holders = self._holders.get(chain[depth - 1])
            if not holders:
                continue
            found = holders & left
            if found:
                self._holders.move_to_end(chain[depth - 1])
                for r in found:
                    out[r] = depth
                left -= found
        return out

    def drop(self, replica: str) -> None:
        """Forget a replica (it died: its successor starts with an empty cache)."""
        for h in [h for h, holders in self._holders.items() if replica in holders]:
            holders = self._holders[h]
            holders.discard(replica)
            if not holders:
                del self._holders[h]


def choose(chain: tuple[int, ...], loads: dict[str, int], slots: dict[str, int | None], index: PrefixIndex,
           imbalance: int = DEFAULT_IMBALANCE) -> tuple[list[list[str]], str | None]:
    """The replicas to try, best first, as ranks (Ray tries the least loaded of each rank that
    accepts the request), and the holder passed over (None when it was chosen, or there is none).

    loads: each candidate's ongoing requests; slots: its state slots (None: unknown)."""
    ids = list(loads)
    random.shuffle(ids)   # ties between equally loaded replicas go either way
    if not chain or len(ids) == 1:
        return [ids], None
    depth = index.depths(chain, set(ids))
    best, shared = max(depth.values()), min(depth.values())
    if best == shared:   # no replica holds more of this prompt than any other: by load
        return [ids], None
    least = min(loads.values())

    def takes(r: str) -> bool:
        full = slots.get(r) is not None and loads[r] >= slots[r]
        return not full and loads[r] <= least + imbalance

    holders = [r for r in ids if depth[r] == best]
    willing = [r for r in holders if takes(r)]
    others = sorted((r for r in ids if r not in willing), key=lambda r: -depth[r])
    if willing:
        return [willing, others], None
    # every holder is saturated: the others by load, the holders last (if the others refuse too)
    rest = [r for r in ids if r not in holders]
    return [rest, holders], min(holders, key=lambda r: loads[r])

"""Train tnl's bundled demo model: a SentencePiece tokenizer, then a tiny TransNormerLLM.

    apt-get install -y fortunes fortunes-min fortunes-zh
    python demo/prepare_data.py && python demo/train.py --device cuda      # about 3.5 minutes on one H100
    python demo/train.py --device cpu --steps 20                           # smoke run

On CUDA the number of steps is, unless --steps is given, as many as fit in --minutes (2.5) of
training, measured before training starts, capped at --max-steps (4000); the card records the
number, and `--steps N` repeats the run exactly.

Reads demo/data/ (written by prepare_data.py) and writes into --out (default src/tnl/demo/):
config.json, model.safetensors (bf16, official parameter names, head tied to the embedding),
tokenizer.model, tokenizer_config.json (ChatML chat template), generation_config.json (stop on
</s> or <|im_end|>) and MODEL_CARD.md with this run's numbers. The run's metrics (loss curve,
perplexities, samples) also go to --metrics as JSON.

The model is tnl's own (`tnl.model.transnormer.TransnormerForCausalLM`), trained through its
`forward_train`; this script only feeds it. Each training row starts at a document start (a
fortune, or one ChatML exchange: "<s>" + the rendered chat + "</s>") so the model sees, as in
serving, a conversation that begins from zero state at position 0.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import shlex
import sys
import time

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
try:
    import tnl  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(REPO, "src"))
from tnl.config import ModelConfig  # noqa: E402
from tnl.model.transnormer import TransnormerForCausalLM, expected_tensors  # noqa: E402

from prepare_data import SYSTEM_PROMPT, cjk_share, read_records_file  # noqa: E402  (demo/ is sys.path[0])

log = logging.getLogger("demo.train")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The ChatML template transformers fell back to for checkpoints without one (what the seed
# deployment's apply_chat_template produced); render_chat below is the same in Python.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EVAL_PROMPTS = [  # (prompt, expected language); the last two are not among the training prompts
    ("你好", "zh"), ("Tell me something", "en"), ("早安", "zh"), ("Tell me something nice", "en"),
]


def render_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """CHAT_TEMPLATE without Jinja: the training text and the prompt the engine will build."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def chat_messages(prompt: str, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


# ---- data ---------------------------------------------------------------------------------

def load_data(data_dir: str) -> tuple[list[str], list[str], list[dict], dict]:
    def need(name):
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: run 'python demo/prepare_data.py' first")
        return path

    train = read_records_file(need("train.txt"))
    valid = read_records_file(need("valid.txt"))
    with open(need("chat_train.jsonl"), encoding="utf-8") as f:
        chats = [json.loads(line) for line in f if line.strip()]
    stats = {}
    if os.path.exists(os.path.join(data_dir, "stats.json")):
        with open(os.path.join(data_dir, "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
    return train, valid, chats, stats


def chat_text(pair: dict) -> str:
    msgs = chat_messages(pair["prompt"], pair.get("system"))
    return render_chat(msgs + [{"role": "assistant", "content": pair["answer"]}], add_generation_prompt=False)


def train_tokenizer(train: list[str], chats: list[dict], vocab_size: int, path: str) -> spm.SentencePieceProcessor:
    """BPE with byte fallback, <unk>=0 <s>=1 </s>=2, the ChatML markers as single pieces.

    SentencePiece reads one sentence per line, so newlines never end up inside a piece: "\\n" is
    the byte piece <0x0A>, and a prompt's tokens are always a prefix of prompt+answer's tokens.
    No normalisation and no dummy prefix, so decode(encode(s)) == s for the fortunes' spacing.
    """
    lines = [line for rec in train for line in rec.split("\n") if line.strip()]
    lines += [line for pair in chats[:2000] for line in chat_text(pair).split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may give fewer pieces; the model takes what it gets
        byte_fallback=True, character_coverage=0.9995, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=[IM_START, IM_END],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, max_sentence_length=16384, num_threads=2, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return spm.SentencePieceProcessor(model_file=path)


def pack_rows(docs: list[list[int]], seq_len: int, rng: random.Random) -> torch.Tensor:
    """One epoch of training rows [R, seq_len + 1]: documents shuffled and laid end to end.

    Every row starts at a document start; the document that overflows a row fills it with its
    beginning and the rest of it is skipped this epoch (the next epoch reshuffles).
    """
    order = list(range(len(docs)))
    rng.shuffle(order)
    rows, row = [], []
    for i in order:
        row.extend(docs[i][: seq_len + 1 - len(row)])
        if len(row) == seq_len + 1:
            rows.append(row)
            row = []
    if not rows:
        raise SystemExit(f"not enough tokens for one row of {seq_len + 1}: lower --seq-len")
    return torch.tensor(rows, dtype=torch.long)


def batches(docs: list[list[int]], batch_size: int, seq_len: int, seed: int):
    """Endless [B, seq_len + 1] batches, epoch after epoch."""
    rng = random.Random(seed)
    while True:
        rows = pack_rows(docs, seq_len, rng)
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[i: i + batch_size]
        if len(rows) < batch_size:
            yield rows[torch.randint(len(rows), (batch_size,))]


# ---- evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def doc_nll(model, docs: list[list[int]], device: str, batch_size: int = 32) -> list[tuple[float, int]]:
    """Per document: (summed negative log-likelihood in nats, tokens scored). Each document is
    scored on its own from zero state: all tokens after the leading <s>."""
    model.eval()
    out: list[tuple[float, int] | None] = [None] * len(docs)
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        n = max(len(docs[i]) for i in idx)
        ids = torch.zeros(len(idx), n, dtype=torch.long)
        mask = torch.zeros(len(idx), n - 1, dtype=torch.bool)
        for r, i in enumerate(idx):
            ids[r, : len(docs[i])] = torch.tensor(docs[i])
            mask[r, : len(docs[i]) - 1] = True
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device):
            logits = model.forward_train(ids[:, :-1])  # right padding never reaches a real token
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none") * mask
        for r, i in enumerate(idx):
            out[i] = (nll[r].sum().item(), int(mask[r].sum().item()))
    model.train()
    return out


def unigram_nll(train_docs: list[list[int]], valid_docs: list[list[int]], vocab: int) -> list[tuple[float, int]]:
    """The baseline: p(token) = (count + 1) / (N + V) from the training documents' scored tokens,
    applied to the same validation tokens the model is scored on."""
    counts = [0] * vocab
    for d in train_docs:
        for t in d[1:]:
            counts[t] += 1
    total = sum(counts) + vocab
    logp = [math.log((c + 1) / total) for c in counts]
    return [(-sum(logp[t] for t in d[1:]), len(d) - 1) for d in valid_docs]


def perplexity(pairs: list[tuple[float, int]]) -> float:
    nll, n = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return math.exp(nll / max(n, 1))


@torch.no_grad()
def generate(model, prompt_ids: list[int], n: int, max_new: int, stop: set[int], temperature: float,
             top_k: int, gen: torch.Generator, device: str) -> list[list[int]]:
    """n continuations of one prompt (greedy when temperature is 0); each stops after a stop id.
    Recomputes the whole sequence each step through forward_train: slow, but only the model's
    training path is needed here."""
    model.eval()
    x = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    outs: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new):
        with autocast(device):
            logits = model.forward_train(x)[:, -1].float().cpu()  # [n, V]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            vals, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            probs = torch.softmax(vals / temperature, dim=-1)
            nxt = idx.gather(-1, torch.multinomial(probs, 1, generator=gen)).squeeze(-1)
        for i in range(n):
            if not done[i]:
                outs[i].append(int(nxt[i]))
                done[i] = int(nxt[i]) in stop
        if all(done):
            break
        x = torch.cat([x, nxt.to(device).view(n, 1)], dim=1)
    model.train()
    return outs


def judge_answer(ids: list[int], sp: spm.SentencePieceProcessor, lang: str) -> dict:
    """Did the model answer as the demo needs: stop with <|im_end|>, no template debris, right language."""
    im_start, im_end = sp.piece_to_id(IM_START), sp.piece_to_id(IM_END)
    ended = bool(ids) and ids[-1] == im_end
    body = ids[:-1] if ended else ids
    text = sp.decode(body)
    debris = im_start in body or im_end in body or text.lstrip().startswith(("system", "user", "assistant"))
    letters = [c for c in text if c.isalpha()]
    if lang == "zh":
        right = cjk_share(text) >= 0.5
    else:
        right = bool(letters) and cjk_share(text) == 0
    return {"text": text, "ended": ended, "clean": not debris, "lang_ok": right}


def chat_check(model, sp, device: str, n: int, max_new: int, seed: int) -> dict:
    """For each EVAL_PROMPT: one greedy answer and n sampled ones, judged by judge_answer."""
    gen = torch.Generator().manual_seed(seed)
    stop = {sp.eos_id(), sp.piece_to_id(IM_END)}
    report = {}
    for prompt, lang in EVAL_PROMPTS:
        ids = [sp.bos_id()] + sp.encode(render_chat(chat_messages(prompt), add_generation_prompt=True))
        greedy = judge_answer(generate(model, ids, 1, max_new, stop, 0.0, 1, gen, device)[0], sp, lang)
        sampled = [judge_answer(o, sp, lang)
                   for o in generate(model, ids, n, max_new, stop, 0.8, 40, gen, device)] if n else []
        report[prompt] = {
            "lang": lang, "greedy": greedy,
            "samples": [s["text"] for s in sampled[:4]],
            "ok": sum(s["ended"] and s["clean"] and s["lang_ok"] for s in sampled), "n": len(sampled),
        }
    return report


# ---- training -----------------------------------------------------------------------------

def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def lr_at(progress: float, base: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction, then cosine down to base/10."""
    if progress < warmup:
        return base * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def calibrate_steps(model, V: int, batch: torch.Tensor, minutes: float, max_steps: int) -> int:
    """How many training steps fit in `minutes`: times forward + backward on a random batch (no
    optimizer step, gradients dropped, no draw from the data stream, so training is unchanged). The run is then fixed-length and
    deterministic given that number; the card records it so `--steps N` repeats the run exactly."""
    times = []
    for _ in range(4):
        if batch.is_cuda:
            torch.cuda.synchronize()
        t = time.time()
        with autocast(batch.device.type):
            logits = model.forward_train(batch[:, :-1])
        F.cross_entropy(logits.float().reshape(-1, V), batch[:, 1:].reshape(-1)).backward()
        if batch.is_cuda:
            torch.cuda.synchronize()
        times.append(time.time() - t)
    model.zero_grad(set_to_none=True)
    per_step = min(times[1:]) * 1.1  # + optimizer step and logging
    steps = max(1, min(max_steps, int(minutes * 60 / per_step)))
    log.info("calibration: %.0f ms per step -> %d steps for %.1f minutes (cap %d)", per_step * 1000, steps,
             minutes, max_steps)
    return steps


def round_theta_to_bf16(model) -> None:
    """Keep LRPE theta on the bf16 grid: the shipped bf16 file then holds exactly the angles
    training used (a rounded theta would shift the phase by up to t * theta * 2^-9 at position t)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lrpe.theta"):
                p.copy_(p.to(torch.bfloat16).float())


def save_model(model, cfg: ModelConfig, out: str) -> dict[str, torch.Tensor]:
    """model.safetensors in bf16 with the official names (no lm_head.weight when tied)."""
    tensors = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    expected = expected_tensors(cfg)
    if set(tensors) != set(expected):
        raise RuntimeError(f"state dict names differ from the official ones: extra {sorted(set(tensors) - set(expected))}, "
                           f"missing {sorted(set(expected) - set(tensors))}")
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return tensors


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--out", default=os.path.join(REPO, "src", "tnl", "demo"))
    ap.add_argument("--metrics", default=None, help="run metrics JSON (default: DATA/train_metrics.json)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps; default on cuda: as many as fit in --minutes (at most --max-steps), "
                         "measured on a few untimed warm-up passes before training; on cpu: 20")
    ap.add_argument("--minutes", type=float, default=2.5, help="training-loop budget for the default --steps")
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=6144)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--glu", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the run")
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--chat-samples", type=int, default=None, help="sampled answers per eval prompt (16 cuda, 4 cpu)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    chat_samples = args.chat_samples if args.chat_samples is not None else (16 if device == "cuda" else 4)
    metrics_path = args.metrics or os.path.join(args.data, "train_metrics.json")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    # -- tokenizer and tokens
    train, valid, chats, data_stats = load_data(args.data)
    sp = train_tokenizer(train, chats, args.vocab, os.path.join(args.out, "tokenizer.model"))
    V = sp.get_piece_size()
    bos, eos = sp.bos_id(), sp.eos_id()
    im_end = sp.piece_to_id(IM_END)
    assert (sp.unk_id(), bos, eos) == (0, 1, 2) and sp.piece_to_id(IM_START) != sp.unk_id() != im_end
    train_docs = [[bos] + ids + [eos] for ids in sp.encode(train)]
    valid_docs = [[bos] + ids + [eos] for ids in sp.encode(valid)]
    chat_docs = [[bos] + ids + [eos] for ids in sp.encode([chat_text(p) for p in chats])]
    for p, d in zip(chats[:50], chat_docs):  # the serving prompt must tokenize as the training prefix
        prompt = sp.encode(render_chat(chat_messages(p["prompt"], p.get("system")), add_generation_prompt=True))
        assert d[1: 1 + len(prompt)] == prompt, "prompt tokens are not a prefix of the chat's tokens"
    n_tokens = {"train": sum(map(len, train_docs)), "chat": sum(map(len, chat_docs)), "valid": sum(map(len, valid_docs))}
    log.info("tokenizer: %d pieces; tokens: %s", V, n_tokens)

    # -- model
    cfg = ModelConfig.from_dict({
        "vocab_size": V, "decoder_embed_dim": args.d_model, "decoder_layers": args.layers,
        "decoder_attention_heads": args.heads, "hidden_dim": args.d_model, "glu_dim": args.glu,
        "linear_use_lrpe_list": [1] + [0] * (args.layers - 1), "no_scale_embedding": False,
        "bias": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    })
    model = TransnormerForCausalLM(cfg).init_random(std=0.02, seed=args.seed)  # theta: the official init
    round_theta_to_bf16(model)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device == "cuda")
    log.info("model: %.2fM parameters (%.2f MB in bf16), device %s", cfg.num_params() / 1e6,
             cfg.num_params() * 2 / 1e6, torch.cuda.get_device_name() if device == "cuda" else "cpu")

    # -- train
    # A record longer than a row is cut into row-sized pieces rather than lost.
    row = args.seq_len + 1
    pieces = [d[i: i + row] for d in train_docs + chat_docs for i in range(0, len(d), row)]
    data = batches(pieces, args.batch, args.seq_len, args.seed)
    steps = args.steps
    if steps is None:
        probe = torch.randint(V, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
        steps = 20 if device == "cpu" else calibrate_steps(model, V, probe.to(device), args.minutes, args.max_steps)
    log_every = args.log_every or max(1, steps // 20)
    losses: list[tuple[int, float]] = []
    window: list[float] = []
    tokens_seen = 0
    t0 = time.time()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step / steps, args.lr, args.warmup)
        batch = next(data).to(device, non_blocking=True)
        with autocast(device):
            logits = model.forward_train(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, V), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        round_theta_to_bf16(model)
        tokens_seen += batch[:, 1:].numel()
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            losses.append((step, sum(window) / len(window)))
            window = []
            dt = time.time() - t0
            log.info("step %5d/%d  loss %.3f  lr %.2e  %.0f tok/s  %.0fs", step, steps, losses[-1][1],
                     opt.param_groups[0]["lr"], tokens_seen / dt, dt)
    train_seconds = time.time() - t0

    # -- evaluate
    t_eval = time.time()
    model_nll = doc_nll(model, valid_docs, device)
    uni_nll = unigram_nll(train_docs, valid_docs, V)
    is_zh = [cjk_share(t) >= 0.3 for t in valid]
    ppl = {"model": perplexity(model_nll), "unigram": perplexity(uni_nll)}
    for lang, flag in (("en", False), ("zh", True)):
        ppl[f"model_{lang}"] = perplexity([x for x, z in zip(model_nll, is_zh) if z == flag])
        ppl[f"unigram_{lang}"] = perplexity([x for x, z in zip(uni_nll, is_zh) if z == flag])
    log.info("held-out perplexity: model %.2f, unigram %.2f (en %.2f vs %.2f, zh %.2f vs %.2f)",
             ppl["model"], ppl["unigram"], ppl["model_en"], ppl["unigram_en"], ppl["model_zh"], ppl["unigram_zh"])
    t_chat = time.time()
    chat = chat_check(model, sp, device, chat_samples, args.max_new_tokens, args.seed)
    log.info("evaluation took %.0fs (perplexity %.0fs, chat %.0fs)", time.time() - t_eval, t_chat - t_eval,
             time.time() - t_chat)
    for prompt, r in chat.items():
        log.info("%r -> greedy %r (im_end: %s) | %d/%d sampled answers ok", prompt, r["greedy"]["text"],
                 r["greedy"]["ended"], r["ok"], r["n"])
        for s in r["samples"]:
            log.info("      sampled: %r", s)

    # -- save
    tensors = save_model(model, cfg, args.out)
    write_json(os.path.join(args.out, "config.json"), cfg.to_dict())
    write_json(os.path.join(args.out, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE})
    write_json(os.path.join(args.out, "generation_config.json"),
               {"bos_token_id": bos, "eos_token_id": [eos, im_end], "pad_token_id": cfg.pad_token_id})
    run = {
        "command": "python demo/prepare_data.py && python " + shlex.join(["demo/train.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "steps": steps, "steps_chosen_by": "--steps" if args.steps else "calibration", "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup": args.warmup, "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "train_tokens_seen": tokens_seen, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9)),
        "total_seconds": round(time.time() - t_start, 1),
        "epochs": round(tokens_seen / (n_tokens["train"] + n_tokens["chat"]), 2),
    }
    metrics = {
        "config": cfg.to_dict(), "params": cfg.num_params(),
        "weights_bytes": os.path.getsize(os.path.join(args.out, "model.safetensors")),
        "tokenizer": {"pieces": V, "im_start_id": sp.piece_to_id(IM_START), "im_end_id": im_end},
        "tokens": n_tokens, "run": run, "loss": losses, "perplexity": ppl, "chat": chat, "data": data_stats,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
    write_json(metrics_path, metrics)
    with open(os.path.join(args.out, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(model_card(metrics))
    log.info("wrote %s (weights %.2f MB) and %s in %.0fs", args.out, metrics["weights_bytes"] / 1e6,
             metrics_path, time.time() - t_start)
    return metrics


# ---- the model card -----------------------------------------------------------------------

LICENCES = """\
| package | files used | licence (from /usr/share/doc/PKG/copyright) |
|---|---|---|
| `fortunes` | English fortune cookies (files listed below) | BSD: the 4.4BSD licence of the Regents of the University of California with the advertising clause deleted; collected by Ken Arnold, Amy A. Lewis, Karl Lehenbauer (cookie) and others |
| `fortunes-min` | `fortunes`, `literature`, `riddles` | the same BSD licence (same copyright file) |
| `fortunes-zh` | `tang300` (300 Tang poems), `song100` (Song ci), `chinese` (sayings, Analects, Daodejing, poems, quotes) | GPL-3.0-or-later (the compilation, by Yu Guanghui, Mo Zhou, xiao sheng wen); the classical poems themselves are centuries old |

The weights and the tokenizer are derived from these texts. Whoever redistributes them should
treat them as covered by those licences too: BSD for the English part and GPL-3.0-or-later for the
Chinese compilation."""


def model_card(m: dict) -> str:
    c, run, ppl, data = m["config"], m["run"], m["perplexity"], m["data"]
    files = data.get("files", {})
    used = sorted(f for f, s in files.items() if "excluded" not in s)
    reasons: dict[str, list[str]] = {}
    for f, s in sorted(files.items()):
        if "excluded" in s:
            reasons.setdefault(s["excluded"], []).append(f"`{f}`")
    excluded = "; ".join(f"{', '.join(fs)} ({why})" for why, fs in reasons.items())
    pkgs = ", ".join(f"{k} {v}" for k, v in data.get("packages", {}).items()) or "(versions not recorded)"
    rec, chars = data.get("records", {}), data.get("chars", {})

    def n(split, lang, what=rec):
        return what.get(split, {}).get(lang, 0)

    def cell(text: str) -> str:  # a table cell: pipes escaped (GitHub splits cells on them, even in code)
        return text.replace("|", "\\|")

    chat_rows = "\n".join(
        f"| {cell(repr(p))} | {cell(repr(r['greedy']['text']))} | {'yes' if r['greedy']['ended'] else 'no'} "
        f"| {r['ok']}/{r['n']} |" for p, r in m["chat"].items())
    samples = "\n".join(f"- {p!r} → {s!r}" for p, r in m["chat"].items() for s in r["samples"][:2])
    loss = m["loss"]
    return f"""# tnl demo model: a tiny TransNormerLLM trained on Debian's fortunes

A {m['params'] / 1e6:.1f}M-parameter TransNormerLLM with the official architecture and file layout,
bundled with tnl so that `tnl serve`, `tnl generate`, `tnl chat` and the tests run without
downloading anything. It writes English fortune cookies and Chinese classical poem lines and
sayings, and answers a ChatML chat turn with one of them. It knows nothing else: a toy for
exercising the engine, not an assistant.

## Files
| file | what |
|---|---|
| `config.json` | official TransNormerLLM keys (`model_type` "transnormer") |
| `model.safetensors` | {m['weights_bytes'] / 1e6:.2f} MB, bf16, official parameter names; no `lm_head.weight` (tied to `model.embed_tokens.weight`, `tie_word_embeddings` true) |
| `tokenizer.model` | SentencePiece BPE, {m['tokenizer']['pieces']} pieces, byte fallback; `<unk>`=0 `<s>`=1 `</s>`=2, `<\\|im_start\\|>`={m['tokenizer']['im_start_id']} `<\\|im_end\\|>`={m['tokenizer']['im_end_id']} (single pieces) |
| `tokenizer_config.json` | `add_bos_token` true, `add_eos_token` false, the ChatML `chat_template` |
| `generation_config.json` | `eos_token_id` [2, {m['tokenizer']['im_end_id']}]: generation stops at `</s>` or `<\\|im_end\\|>` |

## Architecture
| d_model | layers | heads | hidden_dim | glu_dim | vocab | LRPE | embedding scale | head |
|---|---|---|---|---|---|---|---|---|
| {c['decoder_embed_dim']} | {c['decoder_layers']} | {c['decoder_attention_heads']} | {c['hidden_dim']} | {c['glu_dim']} | {c['vocab_size']} | layer 0 only | sqrt(d) | tied |

Initialisation as the official code: normal(0, 0.02) weights, LRPE
`theta = 10000 ** (-2 / D * arange(D)).reshape(H, 1, D // H)` with D = hidden_dim (theta is then
trained, kept on the bf16 grid so the bf16 file holds exactly the angles training used).

## Data
Installed with `apt-get install -y fortunes fortunes-min fortunes-zh` (Debian {pkgs}) and
prepared by `demo/prepare_data.py` (seed {data.get('seed', '?')}): records split on the `%` lines,
terminal colour codes and backspace overstrikes removed, exact duplicates dropped.

{LICENCES}

- English files used: {', '.join(f'`{f}`' for f in used if files[f].get('lang') == 'en')}.
- Left out: anything under `off/` (Debian's offensive section); {excluded}; from `chinese`
  the excerpts of the Debian Reference manual and records that are mostly not Chinese.
- Train: {n('train', 'en')} English records ({n('train', 'en', chars) / 1e6:.2f}M characters) and
  {n('train', 'zh')} Chinese ({n('train', 'zh', chars) / 1e6:.2f}M characters);
  held out: {n('valid', 'en')} English and {n('valid', 'zh')} Chinese records ({data.get('valid_fraction', 0):.0%} of each, by seed).
- Chat: {sum(data.get('chat_pairs', {}).values())} ChatML exchanges built from the training records: a greeting or
  request ("你好", "给我一句诗", "Tell me something", "Say something wise", …) answered by a
  random short fortune of the same language (English ≤ 200 characters, whole or its first 1–2
  lines; Chinese one poem line or saying); one in five without the system turn.
- Tokens: {m['tokens']['train']} (text) + {m['tokens']['chat']} (chat) for training, {m['tokens']['valid']} held out.

## Training
```
{run['command']}
```
{run['steps']} steps (chosen by {run['steps_chosen_by']}; `--steps {run['steps']}` repeats the run) of {run['batch']} rows × {run['seq_len']} tokens ({run['train_tokens_seen'] / 1e6:.1f}M tokens,
{run['epochs']} epochs), AdamW (betas 0.9/0.95, weight decay {run['weight_decay']} on matrices), peak lr {run['lr']},
{run['warmup']:.0%} linear warm-up then cosine to lr/10, gradient clip 1.0, bf16 autocast on CUDA, seed {run['seed']}.
Device: {run['device']}, torch {run['torch']}; training loop {run['train_seconds']:.0f} s
({run['tokens_per_second']} tokens/s), whole script {run['total_seconds']:.0f} s.
Loss: {loss[0][1]:.3f} (step {loss[0][0]}) → {loss[-1][1]:.3f} (step {loss[-1][0]}).

## Results
Held-out perplexity per token (each record scored alone from `<s>`, over the same tokens; the
unigram baseline is add-one smoothed on the training text's tokens):

| | all | English | Chinese |
|---|---|---|---|
| model | {ppl['model']:.2f} | {ppl['model_en']:.2f} | {ppl['model_zh']:.2f} |
| unigram | {ppl['unigram']:.2f} | {ppl['unigram_en']:.2f} | {ppl['unigram_zh']:.2f} |

Chat, with the system prompt "{SYSTEM_PROMPT}" (the last two prompts are not in the training
set). "ok" counts sampled answers (temperature 0.8, top-k 40, at most {run['max_new_tokens']} tokens) that end with
`<|im_end|>`, hold no template debris and are in the prompt's language:

| prompt | greedy answer | ends with `<\\|im_end\\|>` | sampled ok |
|---|---|---|---|
{chat_rows}

Sampled answers:
{samples}

## Limitations
Trained for minutes on a few megabytes of text: it recites and recombines fortunes and poem
lines, often garbled, and follows no instructions beyond "answer with one fortune". The fortunes
carry the attitudes of their time; files nearest to Debian's offensive criteria were left out,
but not every record was read.
"""


if __name__ == "__main__":
    main()

"""The `tnl` command: serve | generate | chat | download | bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from tnl.args import add_chat_args, add_model_args
from tnl.kernels.config import add_kernel_args

DESCRIPTION = """\
tnl serves TransNormerLLM, a linear-attention LLM whose per-sequence memory is a fixed-size
recurrent state. With no --model, every command uses the small bundled demo model.

examples:
  tnl serve                                   # demo model on http://127.0.0.1:6006
  tnl serve --model OpenNLPLab/TransNormerLLM-7B --host 0.0.0.0
  tnl generate --model ./TransNormerLLM-7B "你好" --max-tokens 64
  tnl chat
  tnl download OpenNLPLab/TransNormerLLM-7B --source huggingface
  tnl bench --model random-7b
"""


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _sampling_params(a):
    from tnl.engine import SamplingParams
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                          seed=a.seed, stop=a.stop or [], ignore_eos=a.ignore_eos)


def _engine(a, max_num_seqs: int = 4):
    from tnl.config import engine_config
    from tnl.kernels.config import kernel_config_from_args
    from tnl.loading import build_engine
    return build_engine(a.model, a.device, a.dtype, engine_config(max_num_seqs=max_num_seqs, state_dtype=a.state_dtype),
                        a.chat_template, a.source, a.cache_dir, a.revision, progress=sys.stderr.isatty(),
                        threads=a.threads, kernel_config=kernel_config_from_args(a), quantization=a.quantization)


def _system(a) -> list[dict]:
    return [{"role": "system", "content": a.system}] if a.system else []


def _stream(engine, ids: list[int], params, on_text) -> object:
    """Run one request to the end, calling on_text with each new piece; returns the final output."""
    req = engine.add_request(ids, params)
    try:
        while not req.finished:
            engine.step()
            delta = engine.take_delta(req)
            if delta.outputs[0].text:
                on_text(delta.outputs[0].text)
        tail = engine.take_delta(req).outputs[0].text
        if tail:
            on_text(tail)
        return engine.final_output(req)
    finally:
        if not req.finished:
            engine.abort(req.request_id)
            while engine.has_work:
                engine.step()
        engine.release(req.request_id)


def cmd_generate(a) -> int:
    params = _sampling_params(a)
    engine = _engine(a)
    tok = engine.tokenizer
    if a.prompt_ids is not None:
        ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
    elif tok is None:
        raise ValueError("this checkpoint has no tokenizer.model: pass --prompt-ids 1,2,3")
    elif a.chat:
        ids = tok.apply_chat_template(_system(a) + [{"role": "user", "content": a.prompt}],
                                      add_generation_prompt=True, tokenize=True)
    else:
        ids = tok.encode(a.prompt)
    if a.json:
        out = _stream(engine, ids, params, lambda s: None)
        o = out.outputs[0]
        print(json.dumps({"prompt": a.prompt, "prompt_token_ids": out.prompt_token_ids, "text": o.text,
                          "token_ids": o.token_ids, "finish_reason": o.finish_reason}, ensure_ascii=False))
    else:
        def write(s):
            sys.stdout.write(s)
            sys.stdout.flush()
        _stream(engine, ids, params, write)
        sys.stdout.write("\n")
    return 0


def cmd_chat(a) -> int:
    params = _sampling_params(a)
    engine = _engine(a)
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("chat needs a tokenizer, and this checkpoint has no tokenizer.model")
    history: list[dict] = _system(a)
    print("tnl chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        try:
            out = _stream(engine, ids, params, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": out.outputs[0].text})


def cmd_download(a) -> int:
    from tnl.hub import download
    print(download(a.model_id, source=a.source, cache_dir=a.cache_dir, revision=a.revision))
    return 0


def cmd_serve(a) -> int:
    from tnl.server.config import ServerConfig
    if a.ray:   # only here is Ray imported (pip install "tnl[ray]")
        try:
            from tnl.ray_app import RayOptions, serve_ray
        except ImportError as e:
            raise RuntimeError(f"--ray needs Ray Serve ({e}): pip install \"tnl[ray]\"") from None
        return serve_ray(ServerConfig.from_args(a), RayOptions.from_args(a))
    from tnl.server import serve
    return serve(ServerConfig.from_args(a)) or 0


def cmd_bench(a) -> int:
    from tnl.bench import main
    return main(a)


def cmd_tune(a) -> int:
    from tnl.tune import main
    return main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tnl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from tnl import __version__
    p.add_argument("--version", action="version", version=f"tnl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    from tnl.server.config import add_server_args
    s = sub.add_parser("serve", help="serve a model over HTTP (tutorial POST /, OpenAI API, web chat)",
                       description="Serve a model over HTTP: the tutorial's POST /, an OpenAI-compatible API "
                                   "under /v1, a web chat page at /, /health and /metrics.")
    add_server_args(s)
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout",
                       description="Generate a continuation of PROMPT and stream it to stdout.")
    add_model_args(g)
    add_chat_args(g)
    add_kernel_args(g)
    g.add_argument("prompt", nargs="?", default="", help="the prompt text")
    g.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message (after --system) in the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _sampling_args(g, 128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal",
                       description="Chat in the terminal with streaming replies; the history is kept.")
    add_model_args(c)
    add_chat_args(c)
    add_kernel_args(c)
    _sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("download", help="download a checkpoint and print its local path",
                       description="Download a checkpoint from ModelScope (default) or Hugging Face and "
                                   "print the local directory.")
    d.add_argument("model_id", help="hub id, e.g. OpenNLPLab/TransNormerLLM-7B")
    from tnl.hub import DEFAULT_SOURCE, SOURCES
    d.add_argument("--source", default=DEFAULT_SOURCE, choices=list(SOURCES))
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--revision", default=None, help="branch, tag or commit (ModelScope default: master)")
    d.set_defaults(func=cmd_download)

    from tnl.bench import add_bench_args
    b = sub.add_parser("bench", help="measure offline engine speed against the card's ceilings",
                       description="Offline engine benchmark: decode tok/s per batch size, prefill, constant "
                                   "time at long context, each next to a ceiling measured in the same run.")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    from tnl.tune import add_tune_args
    t = sub.add_parser("tune", help="measure this card's kernel table (skinny GEMM, fla configs) for tnl to use",
                       description="Measure the skinny-GEMM and fla prompt-kernel configs on this GPU and write "
                                   "the table that tnl then uses on it ($TNL_CACHE_DIR/tuned/<card>.json).")
    add_tune_args(t)
    t.set_defaults(func=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    # generate and chat print only the answer (and errors); -v shows the engine's log
    quiet = getattr(a, "command", None) in ("generate", "chat")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    if a.command == "generate" and not a.prompt and a.prompt_ids is None:
        parser.error("generate needs a PROMPT (or --prompt-ids)")
    try:
        return a.func(a)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError, MemoryError) as e:   # a user's mistake, or the machine's
        if a.verbose:
            logging.getLogger("tnl").exception("tnl %s failed", a.command)
        print(f"tnl {a.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

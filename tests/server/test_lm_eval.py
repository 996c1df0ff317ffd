"""lm-evaluation-harness against a real `tnl serve`: its `local-completions` model, with the
remote tokenizer it finds at GET /tokenizer_info, over a tiny local task (a JSONL file and a task
YAML in tmp_path), run as the README's command in a subprocess that cannot reach the internet.

What lm-eval 0.4.x sends (lm_eval/models/api_models.py, openai_completions.py, utils.py):
- GET /tokenizer_info (it needs `eos_token`), then POST /tokenize {"prompt": text,
  "add_special_tokens": false} for every context, context + continuation, and the eos / bos
  strings (their ids are the first id of their encoding); POST /detokenize only in string mode.
- per loglikelihood request, POST /v1/completions {"prompt": [token ids], "max_tokens": 1,
  "echo": true, "logprobs": 1, "temperature": 0, "seed": 1234}; it sums
  token_logprobs[ctxlen:-1] (the -1 drops the generated token).
Its remote tokenizer never adds BOS (`add_bos_token` only reaches the Hugging Face backend), so
the ids come without one; the server scores such ids after BOS, as their text is scored. The
reference is tnl's offline API on the text: prompt logprobs of tokenizer.encode(context +
continuation), BOS included.
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import requests

from helpers_server import ServerProcess
from tnl import LLM, SamplingParams
from tnl.loading import DEMO_MODEL_DIR

LM_EVAL_TIMEOUT_S = 300

# (context, choices, label). No context ends in a space (lm-eval would move it into the
# continuation) and each context's ids are a prefix of context + choice's, which the reference
# asserts rather than repeating lm-eval's split.
MC_DOCS = [
    ("The capital of France is", [" Paris", " London", " a dragon"], 0),
    ("Once upon a time", [" there was a king", " the end", " 42"], 0),
    ("Question: what is two plus two?\nAnswer:", [" four", " blue", " seven cats"], 0),
    ("你好，今天", ["天气很好", "我们", "模型"], 1),
]
ROLLING_DOCS = ["Once upon a time there was a king who lived in a castle.",
                "线性注意力的模型在常数内存里读一个很长的提示。"]


def recipe_model_args(base_url: str, model: str) -> str:
    """The README's --model_args for `--model local-completions`."""
    return f"model={model},base_url={base_url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(DEMO_MODEL_DIR, "--max-num-seqs", "4",
                        log_path=str(tmp_path_factory.mktemp("lm-eval-server") / "server.log"))
    srv.start()
    srv.model_name = requests.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def llm():
    return LLM(DEMO_MODEL_DIR, device="cpu", progress=False)


def offline_scores(llm, ids_list: list[list[int]], starts: list[int]) -> list[float]:
    """Sum of the prompt logprobs of ids[start:] for each prompt."""
    outs = llm.generate(ids_list, SamplingParams(max_tokens=0, prompt_logprobs=0))
    return [sum(o.prompt_logprobs[i][ids[i]] for i in range(start, len(ids)))
            for o, ids, start in zip(outs, ids_list, starts)]


def offline_loglikelihoods(llm, pairs: list[tuple[str, str]]) -> list[float]:
    """log p(continuation | BOS + context) from the offline API, on the text."""
    tok = llm.tokenizer
    ids_list, starts = [], []
    for context, continuation in pairs:
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        assert whole[:len(ctx)] == ctx and len(whole) > len(ctx), (context, continuation)
        ids_list.append(whole)
        starts.append(len(ctx))
    return offline_scores(llm, ids_list, starts)


def write_tasks(directory) -> None:
    """tiny_mc (multiple_choice, acc) and tiny_roll (loglikelihood_rolling) over local JSONL files:
    `dataset_path: json` with `data_files` loads them through datasets' packaged json builder."""
    os.makedirs(directory, exist_ok=True)
    mc, roll = os.path.join(directory, "mc.jsonl"), os.path.join(directory, "roll.jsonl")
    with open(mc, "w", encoding="utf-8") as f:
        for context, choices, label in MC_DOCS:
            f.write(json.dumps({"context": context, "choices": choices, "label": label}, ensure_ascii=False) + "\n")
    with open(roll, "w", encoding="utf-8") as f:
        for text in ROLLING_DOCS:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    common = "test_split: test\nmetadata:\n  version: 1.0\n"
    with open(os.path.join(directory, "tiny_mc.yaml"), "w", encoding="utf-8") as f:
        f.write(f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(mc)}\n"
                f"{common}output_type: multiple_choice\ndoc_to_text: \"{{{{context}}}}\"\n"
                f"doc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
                f"metric_list:\n  - metric: acc\n")
    with open(os.path.join(directory, "tiny_roll.yaml"), "w", encoding="utf-8") as f:
        f.write(f"task: tiny_roll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(roll)}\n"
                f"{common}output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{{{text}}}}\"\n"
                f"metric_list:\n  - metric: word_perplexity\n")


def offline_env(tmp_path) -> dict[str, str]:
    """No hub, no dataset downloads, and any non-loopback HTTP(S) goes to a closed loopback port."""
    dead = "http://127.0.0.1:9"
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
                HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead,
                NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run_lm_eval(server, tmp_path, tasks: str) -> tuple[dict[str, list[dict]], dict]:
    """The README's command. Returns the logged samples of each task (in doc order) and the
    results table (task -> {"acc,none": ...})."""
    task_dir, out_dir = tmp_path / "tasks", tmp_path / "out"
    write_tasks(task_dir)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", recipe_model_args(server.url, server.model_name),
           "--tasks", tasks, "--include_path", str(task_dir), "--batch_size", "4",
           "--log_samples", "--output_path", str(out_dir)]
    r = subprocess.run(cmd, env=offline_env(tmp_path), capture_output=True, text=True, timeout=LM_EVAL_TIMEOUT_S)
    assert r.returncode == 0, \
        f"lm_eval failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}\nserver log:\n{server.log()[-4000:]}"
    samples = {}
    for task in tasks.split(","):
        (path,) = glob.glob(str(out_dir / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(path, encoding="utf-8") as f:
            samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    (path,) = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    with open(path, encoding="utf-8") as f:
        return samples, json.load(f)["results"]


def test_tokenizer_info_is_what_lm_eval_reads(server, llm):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    tok = llm.tokenizer
    info = requests.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info == {"tokenizer_class": "Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "pad_token": tok.id_to_piece(tok.pad_token_id), "add_bos_token": True, "add_eos_token": False,
                    "chat_template": tok.chat_template}
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    # lm-eval's own client: auto-detection, and the ids it derives from the token strings
    base_url = server.url + "/v1/completions"
    assert check_remote_tokenizer_support(base_url)
    remote = RemoteTokenizer(base_url)
    assert (remote.bos_token_id, remote.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    text = "Question: what is two plus two?\nAnswer: four. 你好"
    assert remote.encode(text) == tok.encode(text, add_special_tokens=False)
    assert remote.decode(remote.encode(text)) == text
    assert remote.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_scoring_token_ids_without_bos_scores_them_after_bos(server, llm):
    """What lm-eval sends: ids without BOS, echo, logprobs 1, max_tokens 1. Every id sent gets
    its logprob after BOS; ids that start with BOS, and generation without echo, are used as given."""
    tok = llm.tokenizer
    text = "The capital of France is Paris"
    with_bos = tok.encode(text)
    ids = with_bos[1:]
    assert with_bos[0] == tok.bos_token_id and ids == tok.encode(text, add_special_tokens=False)
    body = {"model": server.model_name, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    out = llm.generate([with_bos], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    ref = [out.prompt_logprobs[i][with_bos[i]] for i in range(1, len(with_bos))]
    lp = requests.post(server.url + "/v1/completions", json={**body, "prompt": ids}, timeout=60).json()
    lp = lp["choices"][0]["logprobs"]
    assert lp["tokens"][:-1] == [tok.token_text(t) for t in ids]
    assert lp["token_logprobs"][:-1] == pytest.approx(ref, abs=1e-4)
    # ids that start with BOS: unchanged, the BOS has nothing before it
    lp = requests.post(server.url + "/v1/completions", json={**body, "prompt": with_bos}, timeout=60).json()
    lp = lp["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:-1] == pytest.approx(ref, abs=1e-4)
    # without BOS the scores differ by far more than the tolerance (what this change is for)
    no_bos = offline_scores(llm, [ids], [1])[0]   # ids[1:] after ids[0] alone
    assert abs(no_bos - sum(ref[1:])) > 0.5
    # generation without echo: the ids exactly as given (usage counts them, no BOS added)
    r = requests.post(server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 3, "temperature": 0,
                                                           "ignore_eos": True}, timeout=60).json()
    expected = llm.generate([ids], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert r["choices"][0]["text"] == expected.outputs[0].text and r["usage"]["prompt_tokens"] == len(ids)


def test_lm_eval_loglikelihoods_equal_offline(server, llm, tmp_path):
    samples, results = run_lm_eval(server, tmp_path, "tiny_mc,tiny_roll")

    mc = samples["tiny_mc"]
    assert [s["doc_id"] for s in mc] == list(range(len(MC_DOCS)))
    pairs = [(context, choice) for context, choices, _ in MC_DOCS for choice in choices]
    expected = offline_loglikelihoods(llm, pairs)
    got, logged_pairs = [], []
    for s in mc:
        args = [s["arguments"][f"gen_args_{j}"] for j in range(len(s["resps"]))]
        logged_pairs += [(a["arg_0"], a["arg_1"]) for a in args]
        got += [float(r[0][0]) for r in s["resps"]]
    assert logged_pairs == pairs
    assert got == pytest.approx(expected, abs=1e-4)
    # accuracy: a doc counts when its label has the highest offline loglikelihood
    implied, k = [], 0
    for _, choices, label in MC_DOCS:
        lls = expected[k:k + len(choices)]
        k += len(choices)
        implied.append(float(lls.index(max(lls)) == label))
    assert [s["acc"] for s in mc] == implied
    assert results["tiny_mc"]["acc,none"] == pytest.approx(sum(implied) / len(implied))

    # rolling: the whole text after BOS (lm-eval's prefix token); these ids start with BOS, unchanged
    tok = llm.tokenizer
    roll_ids = [tok.encode(t) for t in ROLLING_DOCS]
    expected_roll = offline_scores(llm, roll_ids, [1] * len(roll_ids))
    got_roll = [float(s["resps"][0][0]) for s in samples["tiny_roll"]]
    assert got_roll == pytest.approx(expected_roll, abs=1e-4)
    assert all(math.isfinite(x) for x in got + got_roll)

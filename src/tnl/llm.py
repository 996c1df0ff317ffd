"""The offline API, in vLLM's shape: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from tnl.config import engine_config
from tnl.engine.request import RequestOutput
from tnl.engine.sampling_params import SamplingParams
from tnl.kernels.config import KernelConfig
from tnl.loading import build_engine


class LLM:
    """Offline generation over the same engine the server uses.

    >>> llm = LLM("path/or/hub-id", device="auto", dtype="auto")
    >>> outs = llm.generate(["你好", "Hello"], SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    >>> outs[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 max_num_seqs: int | None = None, max_num_batched_tokens: int = 2048,
                 chat_template: str | None = None, source: str = "modelscope", cache_dir: str | None = None,
                 revision: str | None = None, cuda_graphs: bool = True, progress: bool = True,
                 threads: int | None = None, kernel_config: KernelConfig | None = None):
        ec = engine_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           max_waiting=1 << 30, cuda_graphs=cuda_graphs)
        self.engine = build_engine(model, device, dtype, ec, chat_template, source, cache_dir, revision, progress,
                                   threads=threads, kernel_config=kernel_config)
        self.tokenizer = self.engine.tokenizer

    def _encode(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, (list, tuple)):
            return list(prompt), None
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. Returns one RequestOutput
        per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        eng = self.engine
        reqs = []
        try:
            for p, sp in zip(prompts, plist):
                ids, text = self._encode(p)
                reqs.append(eng.add_request(ids, sp, prompt=text))
            while any(not r.finished for r in reqs):
                eng.step()
            return [eng.final_output(r) for r in reqs]
        except BaseException:
            for r in reqs:
                eng.abort(r.request_id)
            while eng.has_work:   # free the slots before handing the error on
                eng.step()
            raise
        finally:
            for r in reqs:
                eng.release(r.request_id)

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of them."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this checkpoint has no tokenizer.model")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in convs]
        ids = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True) for c in convs]
        outs = self.generate(ids, sampling_params)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

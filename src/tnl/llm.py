"""The offline API, in vLLM's shape: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from tnl.config import engine_config
from tnl.engine import state_file
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
                 threads: int | None = None, kernel_config: KernelConfig | None = None,
                 enable_prefix_caching: bool = True, prefix_cache_gb: float | None = None,
                 prefix_cache_dir: str | None = None, prefix_cache_dir_gb: float | None = None,
                 quantization: str = "none", state_dtype: str = "float32"):
        """quantization: "none", "int8" or "fp8" (8-bit layer matrices, tnl.kernels.quant; fp8 needs a
        GPU of compute capability 8.9+); state_dtype: "float32", "bfloat16" or "float16" (how the
        recurrent state is stored). A value this device cannot run is a ValueError."""
        ec = engine_config(state_dtype=state_dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           max_waiting=1 << 30, cuda_graphs=cuda_graphs, enable_prefix_caching=enable_prefix_caching,
                           prefix_cache_gb=prefix_cache_gb, prefix_cache_dir=prefix_cache_dir,
                           prefix_cache_dir_gb=prefix_cache_dir_gb)
        self.engine = build_engine(model, device, dtype, ec, chat_template, source, cache_dir, revision, progress,
                                   threads=threads, kernel_config=kernel_config, quantization=quantization)
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
        return self._run([self._encode(p) for p in prompts], sampling_params)

    def _run(self, prompts: list[tuple[list[int], str | None]], sampling_params, boundaries=None) -> list[RequestOutput]:
        """(ids, text) prompts through the engine; boundaries: per prompt, its chat message ends."""
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        eng = self.engine
        eng.prepare(plist)   # the structured-output grammars, compiled all at once in the engine's pool
        reqs = []
        try:
            for (ids, text), sp, b in zip(prompts, plist, boundaries or [None] * len(prompts)):
                reqs.append(eng.add_request(ids, sp, prompt=text, boundaries=b))
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
        boundaries = [tok.chat_boundaries(c, i) for c, i in zip(convs, ids)]
        outs = self._run([(i, None) for i in ids], sampling_params, boundaries)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

    # ---- state files (tnl.engine.state_file) -----------------------------------------------------
    def export_state(self, prompt: str | None = None, token_ids: list[int] | None = None,
                     messages: list[dict] | None = None, add_generation_prompt: bool = False) -> bytes:
        """The state file (safetensors bytes) of the model's state after a prefix: exactly one of
        `prompt` (text, encoded with BOS as `generate` does), `token_ids`, or `messages` (a chat,
        through the chat template; add_generation_prompt as in `chat`, off by default so that the
        next turn's prompt starts with these tokens). Computed through the prompt-state cache:
        from its longest cached prefix, or not at all when the cache holds the whole prefix."""
        if sum(x is not None for x in (prompt, token_ids, messages)) != 1:
            raise ValueError("give exactly one of prompt, token_ids or messages")
        if messages is not None:
            if self.tokenizer is None:
                raise ValueError("messages need a tokenizer, and this checkpoint has no tokenizer.model")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True)
        else:
            ids = self._encode(prompt if prompt is not None else token_ids)[0]
        if not ids:
            raise ValueError("the prefix is empty: a state comes after at least one token")
        # one greedy token: the request then keeps the state at its prompt's end with the logits
        # after it (max_tokens=0 requests score prompts and skip the cache)
        self.generate(ids, SamplingParams(max_tokens=1, temperature=0))
        core = self.engine.core
        return state_file.dumps(core.state_entry(ids), core.fingerprint, core.model_config)

    def import_state(self, data: bytes) -> dict:
        """Check a state file (export_state's, or a server's POST /v1/state/export) and pin its
        state in the prompt-state cache: from now on every prompt that starts with its tokens
        continues from it. Returns {"tokens": n, "fingerprint": the model's}. Raises
        state_file.StateFileError (WrongModelState: computed by another model) or StateCacheError."""
        core = self.engine.core
        ids, state, logits = state_file.loads(data, core.fingerprint, core.model_config)
        core.import_state(ids, state, logits)
        return {"tokens": len(ids), "fingerprint": core.fingerprint}

    def unpin_states(self) -> int:
        """Unpin the imported states (the cache may evict them again). Returns how many were pinned."""
        return self.engine.core.unpin_states()

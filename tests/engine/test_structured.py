"""Structured output in the engine (tnl.engine.structured over xgrammar), offline on the bundled
demo model: JSON Schemas, choices, regexes and grammars hold for greedy and sampled outputs; a
constraint changes nothing for the unconstrained rows of its batch; max_tokens still cuts.

The demo model writes no JSON of its own accord (its greedy answer to "Give me JSON" is prose),
so every valid output below is the mask's doing.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

import tnl
from tnl import SamplingParams, StructuredOutputs
from tnl.engine import InvalidRequest

xgr = pytest.importorskip("xgrammar")

PROMPTS = ["Give me a JSON object:", "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n",
           "The answer is"]

# 22 schemas: nested objects, arrays with bounds, enums, numbers with bounds, patterns, optional
# fields, $ref, anyOf, nullable types. Strings and arrays are bounded, so that each output ends
# well within MAX_TOKENS (the model fills whatever room a schema leaves).
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"address": {"type": "object", "properties": {
        "street": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "zip"]}}, "required": ["address"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"t": {"type": "number", "minimum": -1.5, "maximum": 2.5}}, "required": ["t"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z][a-z]{2,5}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "b": {"type": "boolean"}, "c": {"type": "string", "maxLength": 4}},
     "required": ["a"], "additionalProperties": False},
    {"type": "boolean"},
    {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99}, "tag": {"enum": ["x", "y"]}},
        "required": ["id", "tag"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"l1": {"type": "object", "properties": {"l2": {"type": "object", "properties": {
        "l3": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["l3"]}}, "required": ["l2"]}},
     "required": ["l1"]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -10,
                                                                        "maximum": 10}},
     "required": ["kind", "x"]},
    {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 100, "maximum": 999}]},
    {"type": "object", "properties": {"nick": {"type": ["string", "null"], "maxLength": 6}}, "required": ["nick"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["x", "y"]}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 6}},
     "required": ["word"]},
    {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
     "minItems": 2, "maxItems": 2},
    {"enum": [1, "two", None, True]},
    {"type": "object", "properties": {"lo": {"type": "integer", "minimum": -20, "maximum": -10},
                                      "hi": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 13}},
     "required": ["lo", "hi"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "maxItems": 3}, "note": {"type": "string", "maxLength": 8}},
     "required": ["tags"]},
    {"type": "integer", "minimum": 1000, "maximum": 1005},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 50}, "roles": {"type": "array", "items": {
            "enum": ["admin", "dev"]}, "minItems": 1, "maxItems": 2}}, "required": ["id", "roles"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    {"type": "string", "pattern": "^(yes|no)-[0-9]$"},
]
MAX_TOKENS = 120          # compact JSON (disable_any_whitespace): the longest output here is ~70 tokens
MAX_TOKENS_SPACED = 450   # with JSON's free whitespace (up to 20 characters a gap): ~350


@pytest.fixture(scope="module")
def llm():
    return tnl.LLM("demo", device="cpu", progress=False, max_num_seqs=16)


def texts(outs) -> list[str]:
    return [o.outputs[0].text for o in outs]


def test_schemas_hold_greedy_and_sampled(llm):
    """Each schema, greedy (with JSON's free whitespace, and without) and sampled (two seeds,
    compact): every output parses and validates, and ends on the model's EOS where the grammar
    lets it."""
    assert len(SCHEMAS) >= 20
    params, cases = [], []
    for i, schema in enumerate(SCHEMAS):
        jsonschema.Draft202012Validator.check_schema(schema)
        for mode, kw in (("greedy", dict(temperature=0)), ("greedy-compact", dict(temperature=0)),
                         ("sampled", dict(temperature=1.0, seed=i)), ("sampled", dict(temperature=1.0, seed=100 + i))):
            so = StructuredOutputs(json=schema, disable_any_whitespace=mode != "greedy")
            params.append(SamplingParams(max_tokens=MAX_TOKENS_SPACED if mode == "greedy" else MAX_TOKENS,
                                         structured_outputs=so, **kw))
            cases.append((i, mode))
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(len(params))]
    outs = llm.generate(prompts, params)
    for (i, mode), out in zip(cases, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (i, mode, o.text, o.finish_reason)
        value = json.loads(o.text)
        jsonschema.validate(value, SCHEMAS[i])
        if mode != "greedy":   # compact: xgrammar's fixed separators ", " and ": ", no other whitespace
            outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', o.text)
            assert re.fullmatch(r"(?:[^\s]|(?<=[,:]) (?! ))*", outside), (i, o.text)
    unconstrained = texts(llm.generate(prompts[:3], SamplingParams(max_tokens=40, temperature=0)))
    assert not any(_is_json(t) for t in unconstrained), unconstrained   # the mask did it


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_choice_regex_and_grammar(llm):
    choices = ["yes", "no", "maybe later", "数据"]
    regex = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
    grammar = 'root ::= item ("," item){0,3}\nitem ::= [a-c]{1,3} | "(" [0-9] ")"'
    grammar_re = r"(?:[a-c]{1,3}|\([0-9]\))(?:,(?:[a-c]{1,3}|\([0-9]\))){0,3}"   # the same language
    kinds = [("choice", StructuredOutputs(choice=choices)), ("regex", StructuredOutputs(regex=regex)),
             ("grammar", StructuredOutputs(grammar=grammar))]
    params, which = [], []
    for kind, so in kinds:
        for seed in range(6):
            kw = dict(temperature=0) if seed == 0 else dict(temperature=1.5, seed=seed)
            params.append(SamplingParams(max_tokens=60, structured_outputs=so, **kw))
            which.append(kind)
    outs = llm.generate([PROMPTS[k % 3] for k in range(len(params))], params)
    got = {"choice": set(), "regex": set(), "grammar": set()}
    compiled = llm.engine.structured.compile(kinds[2][1])
    for kind, out in zip(which, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (kind, o.text)
        got[kind].add(o.text)
        if kind == "choice":
            assert o.text in choices
        elif kind == "regex":
            assert re.fullmatch(regex, o.text), o.text
        else:
            assert re.fullmatch(grammar_re, o.text), o.text
            m = xgr.GrammarMatcher(compiled)   # the grammar itself accepts it, to its end
            assert m.accept_string(o.text) and m.is_completed(), o.text
    assert all(len(v) >= 2 for v in got.values()), got   # sampling explored each language


def test_unconstrained_rows_unchanged_by_constrained_neighbours(llm):
    """Greedy unconstrained requests batched with constrained ones (JSON, choice, regex) give the
    tokens they give alone: the masks touch only their own rows."""
    plain = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain)]
    mixed_params = [plain, SamplingParams(max_tokens=30, temperature=0, structured_outputs=StructuredOutputs(
        json=SCHEMAS[0])), plain, SamplingParams(max_tokens=30, temperature=0.8, seed=1,
                                                  structured_outputs=StructuredOutputs(choice=["a", "b"])),
        plain, SamplingParams(max_tokens=30, temperature=0, structured_outputs=StructuredOutputs(regex="[0-9]{20}"))]
    mixed = llm.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[2]], mixed_params)
    assert [mixed[k].outputs[0].token_ids for k in (0, 2, 4)] == alone
    assert mixed[3].outputs[0].text in ("a", "b") and re.fullmatch("[0-9]{20}", mixed[5].outputs[0].text)


def test_async_scheduling_gives_the_same_constrained_outputs():
    """With async scheduling (CUDA's default; forced here on the CPU) a constrained step waits for
    the step in flight before it fills its masks: the outputs are those of plain steps."""
    params = [SamplingParams(max_tokens=MAX_TOKENS_SPACED, temperature=0, structured_outputs=StructuredOutputs(json=s))
              for s in SCHEMAS[:6]] + [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)]
    prompts = [PROMPTS[k % 3] for k in range(len(params))]
    runs = []
    for async_scheduling in (False, True):
        llm = tnl.LLM("demo", device="cpu", progress=False, max_num_seqs=8)
        llm.engine.core.async_scheduling = async_scheduling
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]
    for ids, schema in zip(runs[1], SCHEMAS[:6]):
        jsonschema.validate(json.loads(llm.tokenizer.decode(ids)), schema)


def test_max_tokens_cuts_with_length_and_eos_waits_for_the_grammar(llm):
    """A constraint cut by max_tokens ends "length" with its prefix; a choice of one long
    answer is written whole even under ignore_eos (the grammar still needs an end)."""
    so = StructuredOutputs(json=SCHEMAS[1])
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0, structured_outputs=so))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4 and out.text.startswith("{")
    whole = "a long answer that the model would never write"
    for kw in (dict(), dict(ignore_eos=True)):
        o = llm.generate(PROMPTS[2], SamplingParams(max_tokens=60, temperature=0, structured_outputs=StructuredOutputs(
            choice=[whole]), **kw))[0].outputs[0]
        assert (o.text, o.finish_reason) == (whole, "stop")


def test_prompt_cache_hit_and_repeat_are_constrained(llm):
    """The second run of a prompt starts from the prompt-state cache (a whole-prompt hit takes
    its first token from cached logits): the mask holds there too, and the output repeats."""
    p = SamplingParams(max_tokens=MAX_TOKENS_SPACED, temperature=0, structured_outputs=StructuredOutputs(
        json=SCHEMAS[3]))
    prompt = "A fresh prompt for the cache test:"
    first, second = llm.generate(prompt, p)[0], llm.generate(prompt, p)[0]
    assert second.num_cached_tokens > 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    jsonschema.validate(json.loads(second.outputs[0].text), SCHEMAS[3])


def test_compile_cache_and_errors(llm):
    """A constraint compiles once (equal constraints share the cached grammar); what cannot
    compile is an InvalidRequest naming the field, with xgrammar's reason; a bad shape is
    refused when the StructuredOutputs is made."""
    mgr = llm.engine.structured
    a, b = StructuredOutputs(json={"type": "integer"}), StructuredOutputs(json='{"type": "integer"}')
    assert mgr.compile(a) is mgr.compile(b)
    bad = [(dict(json={"type": "object", "properties": {"x": {"$ref": "#/nope"}}}), "structured_outputs.json", "nope"),
           (dict(regex="[a-"), "structured_outputs.regex", "Unclosed"),
           (dict(grammar='root ::= "a" | '), "structured_outputs.grammar", "line 1"),
           (dict(grammar='root ::= undefined_rule'), "structured_outputs.grammar", "undefined_rule")]
    for kw, param, reason in bad:
        with pytest.raises(InvalidRequest) as e:
            llm.generate("x", SamplingParams(structured_outputs=StructuredOutputs(**kw)))
        assert e.value.param == param and reason in e.value.message, e.value.message
    for kw, param in ((dict(choice=[]), "structured_outputs.choice"), (dict(regex="a", choice=["a"]),
                                                                       "structured_outputs"),
                      (dict(), "structured_outputs"), (dict(json="{not json"), "structured_outputs.json"),
                      (dict(json=[1]), "structured_outputs.json")):
        with pytest.raises(InvalidRequest) as e:
            StructuredOutputs(**kw)
        assert e.value.param == param, (kw, e.value.message)
    # the engine still serves after the refusals
    assert llm.generate("x", SamplingParams(max_tokens=5, structured_outputs=StructuredOutputs(
        choice=["ok"])))[0].outputs[0].text == "ok"


def test_checkpoint_without_tokenizer_refuses_a_constraint():
    """A constraint is on text: an engine without a tokenizer says so (the field named), and
    runs other requests as before."""
    from helpers_model import random_state_dict, tiny_config
    from tnl.config import EngineConfig, ModelConfig
    from tnl.engine import LLMEngine
    from tnl.model.transnormer import TransnormerForCausalLM

    cfg = tiny_config(vocab_size=300)
    m = TransnormerForCausalLM(ModelConfig.from_dict(cfg))
    m.load_state_dict(random_state_dict(cfg, seed=1))
    eng = LLMEngine(m.eval(), None, EngineConfig(max_num_seqs=2))
    so = SamplingParams(max_tokens=3, structured_outputs=StructuredOutputs(choice=["a"]))
    for call in (lambda: eng.prepare([so]), lambda: eng.add_request([5, 6], so)):
        with pytest.raises(InvalidRequest) as e:
            call()
        assert e.value.param == "structured_outputs" and "tokenizer" in e.value.message
    req = eng.add_request([5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    while eng.has_work:
        eng.step()
    assert len(req.output_token_ids) == 3

"""The bundled demo model: loads with no model named, answers the tutorial's prompts sensibly."""
from __future__ import annotations

import os
import re

from tnl import LLM, SamplingParams
from tnl.loading import DEMO_MODEL_DIR


def test_demo_files_are_small_and_complete():
    names = set(os.listdir(DEMO_MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json", "MODEL_CARD.md"} <= names
    assert os.path.getsize(os.path.join(DEMO_MODEL_DIR, "model.safetensors")) <= 12 * 1024 * 1024


def test_demo_answers_in_the_prompts_language():
    llm = LLM(device="cpu")        # no model: the bundled demo
    sp = SamplingParams(max_tokens=64, temperature=0)
    sys_msg = {"role": "system", "content": "You are a helpful assistant."}
    zh, en = llm.chat([[sys_msg, {"role": "user", "content": "你好"}],
                       [sys_msg, {"role": "user", "content": "Tell me something"}]], sp)
    for out in (zh, en):
        o = out.outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == 4        # <|im_end|>, from generation_config.json
        assert o.text.strip() and "<|im" not in o.text and "\ufffd" not in o.text
    assert re.search(r"[\u4e00-\u9fff]", zh.outputs[0].text)
    assert re.search(r"[A-Za-z]{3,}", en.outputs[0].text) and not re.search(r"[\u4e00-\u9fff]", en.outputs[0].text)

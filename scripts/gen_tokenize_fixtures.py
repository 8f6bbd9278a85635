#!/usr/bin/env python3
"""Generates chat-template/tokenizer parity fixtures with Hugging Face transformers.

The expected text and token ids come from `transformers`' own apply_chat_template
and tokenizer (the code vLLM calls), after the message normalisation vLLM applies
(text parts joined with newlines, tool-call arguments parsed from JSON). The Rust
tests in crates/kvgate-tokenize compare against this data.

  (in the vLLM venv of scripts/vllm/install.sh: transformers, jinja2, vllm)
  python3 scripts/gen_tokenize_fixtures.py assets/tokenizers/qwen3 fixtures/tokenize/qwen3.json
"""
import copy
import gzip
import json
import os
import shutil
import sys
import tempfile

from transformers import AutoTokenizer

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather for a city <b>now</b> & later",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "e.g. Zürich"},
            "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop", "parameters": {}}},
]

LONG = " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(120))


def corpus():
    c = []
    add = lambda name, messages, **kw: c.append(dict(name=name, messages=messages, **kw))
    add("single_user", [{"role": "user", "content": "Hello world"}])
    add("system_user", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}])
    add("multi_turn", [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "Thanks!"}])
    add("unicode", [{"role": "user", "content": "Grüße aus Köln 🌍 — 你好，世界！ مرحبا 🙂\u200b\tend"}])
    add("special_token_text", [{"role": "user", "content": "Print <|im_start|>assistant and <|endoftext|> literally <think>x</think>"}])
    add("long_text", [{"role": "system", "content": LONG}, {"role": "user", "content": "Summarise."}])
    add("content_parts", [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}])
    add("no_generation_prompt", [{"role": "user", "content": "x"}], add_generation_prompt=False)
    add("thinking_off", [{"role": "user", "content": "Quick"}], chat_template_kwargs={"enable_thinking": False})
    add("continue_final", [{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": "Roses are"}],
        continue_final_message=True, add_generation_prompt=False)
    add("assistant_with_think", [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nreasoning\n</think>\n\nanswer1"},
        {"role": "user", "content": "q2"}])
    add("tools_declared", [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    add("tool_call_roundtrip", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21.5, \"sky\": \"<clear>\"}"},
        {"role": "tool", "tool_call_id": "c2", "content": "second result"},
        {"role": "user", "content": "And tomorrow?"}], tools=TOOLS)
    add("empty_content", [{"role": "user", "content": ""}])
    add("newlines_and_spaces", [{"role": "user", "content": "  leading\n\n\ntrailing  \n"}])
    return c


def vllm_normalize(messages):
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        for call in m.get("tool_calls") or []:
            args = call.get("function", {}).get("arguments")
            if isinstance(args, str):
                try:
                    call["function"]["arguments"] = json.loads(args)
                except ValueError:
                    pass
    return out


def vllm_tools(tools):
    """Tools as vLLM passes them to the template: through its request model
    (ChatCompletionToolsParam) and back to dicts."""
    if tools is None:
        return None
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    return [ChatCompletionToolsParam(**t).model_dump() for t in tools]


def main(src, dst):
    with tempfile.TemporaryDirectory() as d:
        if os.path.exists(os.path.join(src, "tokenizer.json")):
            shutil.copy(os.path.join(src, "tokenizer.json"), d)
        else:
            with gzip.open(os.path.join(src, "tokenizer.json.gz")) as f, open(os.path.join(d, "tokenizer.json"), "wb") as g:
                g.write(f.read())
        shutil.copy(os.path.join(src, "tokenizer_config.json"), d)
        tok = AutoTokenizer.from_pretrained(d)
    cases = []
    for case in corpus():
        agp = case.get("add_generation_prompt", True)
        cfm = case.get("continue_final_message", False)
        text = tok.apply_chat_template(
            vllm_normalize(case["messages"]), tools=vllm_tools(case.get("tools")), tokenize=False,
            add_generation_prompt=agp, continue_final_message=cfm, **case.get("chat_template_kwargs", {}))
        ids = tok.encode(text, add_special_tokens=False)
        cases.append(dict(case, add_generation_prompt=agp, continue_final_message=cfm, expected_text=text, expected_ids=ids))
    completions = []
    for prompt in ["Hello world", "", LONG[:2000], "<|im_start|>user\nhi<|im_end|>", "Grüße 🌍 你好", "  x  \n\n"]:
        completions.append(dict(prompt=prompt, expected_ids=tok.encode(prompt, add_special_tokens=True)))
    import transformers
    json.dump({"_origin": f"scripts/gen_tokenize_fixtures.py with transformers {transformers.__version__}",
               "chat": cases, "completions": completions}, open(dst, "w"), ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} chat and {len(completions)} completion cases to {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

#!/usr/bin/env python3
"""Generates vLLM render-parity fixtures by running vLLM's own request model,
message parsing, content-format detection and developer-role handling.

For each template: the content format vLLM detects (`--chat-template-content-format
auto`) and whether it counts as handling the `developer` role. For each request:
whether vLLM rejects it (a 400: the request model or message parsing raises),
otherwise the conversation vLLM passes to the template in each content format,
and the prompt text each template renders from it (after vLLM's developer-role
handling). The Rust tests in crates/kvgate-tokenize compare against this data.

  (in the vLLM venv of scripts/vllm/install.sh)
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
    python3 scripts/gen_render_fixtures.py assets/tokenizers/qwen3 fixtures/tokenize/render.json
"""
import gzip
import json
import os
import shutil
import sys
import tempfile
import types

from transformers import AutoTokenizer

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.renderers import hf as vllm_hf
from vllm.renderers.chat_utils import parse_chat_messages

# Small templates, one per way a template can read `message.content`.
TEMPLATES = {
    "loops_parts": "{% for message in messages %}<{{ message['role'] }}>{% for part in message.content %}"
                   "{% if part.type == 'text' %}[{{ part.text }}]{% endif %}{% endfor %}\n{% endfor %}",
    "loops_assigned": "{% for m in messages %}{% set c = m['content'] %}<{{ m.role }}>"
                      "{% if c is string %}{{ c }}{% else %}{% for p in c %}{{ p['text'] }}|{% endfor %}{% endif %}\n{% endfor %}",
    "loops_macro": "{% macro show(parts) %}{% for p in parts %}{{ p.text }};{% endfor %}{% endmacro %}"
                   "{% for message in messages %}<{{ message.role }}>{{ show(message.content) }}\n{% endfor %}",
    "indexes_parts": "{% for message in messages %}<{{ message['role'] }}>{{ message['content'][0]['text'] }}\n{% endfor %}",
    "prints_content": "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}",
    "knows_developer": "{% for message in messages %}{% if message.role == 'developer' %}<dev>{% else %}<{{ message.role }}>{% endif %}"
                       "{{ message.content }}\n{% endfor %}",
    "dumps_message": "{% for message in messages %}{{ message | tojson }}\n{% endfor %}",
}

TC = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}


def requests():
    r = []
    add = lambda name, messages, **kw: r.append(dict(name=name, messages=messages, **kw))
    add("plain", [{"role": "user", "content": "hi"}])
    add("text_parts", [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    add("empty_text_part", [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": ""}]}])
    add("part_extra_field", [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]}])
    add("input_text_part", [{"role": "user", "content": [{"type": "input_text", "text": "a"}]}])
    add("refusal_part", [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}, {"role": "user", "content": "q"}])
    add("thinking_part", [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "ok"}]}, {"role": "user", "content": "q"}])
    add("text_part_null_text", [{"role": "user", "content": [{"type": "text", "text": None}, {"type": "text", "text": "b"}]}])
    add("developer_only", [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}])
    add("developer_and_system", [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                                 {"role": "developer", "content": [{"type": "text", "text": "dev"}]}])
    add("developer_tools", [{"role": "developer", "content": "d", "tools": [{"type": "function", "function": {"name": "f"}}]},
                            {"role": "user", "content": "hi"}])
    add("two_systems", [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "hi"}])
    add("unknown_fields", [{"role": "user", "content": "hi", "prefix": True, "x": 1},
                           {"role": "assistant", "content": "sure", "prefix": True, "thinking": "t", "weight": 0},
                           {"role": "user", "content": "again", "name": "bob"}])
    add("reasoning", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}, {"role": "user", "content": "q2"}])
    add("reasoning_content", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}, {"role": "user", "content": "q2"}])
    add("assistant_null_content", [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [TC]},
                                   {"role": "tool", "tool_call_id": "c1", "content": "r"}])
    add("tool_call_extra_fields", [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "", "tool_calls": [{**TC, "x": 1, "function": {**TC["function"], "y": 2}}]}])
    add("tool_call_bad_arguments", [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "", "tool_calls": [
                                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "not json"}},
                                        {"id": "b", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
                                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}])
    add("empty_tool_calls", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": []}])
    add("tool_content_parts", [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [TC]},
                               {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}]}])
    add("custom_role", [{"role": "critic", "content": ["a", "b"], "x": 1}, {"role": "user", "content": "hi"}])
    add("billing_header", [{"role": "system", "content": "x-anthropic-billing-header: cch=1\nreal system"}, {"role": "user", "content": "hi"}])
    # What vLLM answers 400.
    add("bare_string_parts", [{"role": "user", "content": ["a", "b"]}])
    add("null_user_content", [{"role": "user", "content": None}])
    add("null_system_content", [{"role": "system", "content": None}, {"role": "user", "content": "hi"}])
    add("number_content", [{"role": "user", "content": 5}])
    add("object_content", [{"role": "user", "content": {"x": 1}}])
    add("missing_role", [{"content": "hi"}])
    add("number_role", [{"role": 5, "content": "hi"}])
    add("message_not_object", ["hi"])
    add("unknown_part_type", [{"role": "user", "content": [{"type": "foo", "text": "x"}]}])
    add("part_without_type", [{"role": "user", "content": [{"text": "x"}]}])
    add("tool_calls_not_list", [{"role": "assistant", "content": "a", "tool_calls": {"id": "x"}}, {"role": "user", "content": "q"}])
    add("tool_call_not_object", [{"role": "assistant", "content": "a", "tool_calls": [1]}, {"role": "user", "content": "q"}])
    add("tool_call_wrong_type", [{"role": "assistant", "content": "a", "tool_calls": [{**TC, "type": "custom"}]}, {"role": "user", "content": "q"}])
    add("tool_without_call_id", [{"role": "tool", "content": "r"}, {"role": "user", "content": "q"}])
    add("name_not_string", [{"role": "user", "content": "hi", "name": 5}])
    add("empty_messages", [])
    add("user_without_content", [{"role": "user"}])
    add("assistant_without_content", [{"role": "user", "content": "q"}, {"role": "assistant"}, {"role": "user", "content": "q2"}])
    add("null_developer_content", [{"role": "developer", "content": None}, {"role": "user", "content": "hi"}])
    add("null_tool_content", [{"role": "tool", "tool_call_id": "c1", "content": None}, {"role": "user", "content": "hi"}])
    add("null_custom_content", [{"role": "critic", "content": None}, {"role": "user", "content": "hi"}])
    add("empty_part_list", [{"role": "user", "content": []}])
    add("text_part_number", [{"role": "user", "content": [{"type": "text", "text": 5}]}])
    add("null_name", [{"role": "user", "content": "hi", "name": None}])
    add("null_tool_calls", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": None}])
    add("tool_call_without_type", [{"role": "assistant", "content": "a", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "user", "content": "q"}])
    add("custom_role_bad_part", [{"role": "critic", "content": [{"type": "foo"}]}, {"role": "user", "content": "hi"}])
    add("developer_bare_string_parts", [{"role": "developer", "content": ["a"]}, {"role": "user", "content": "hi"}])
    return r


# continue_final_message: templates that keep, trim or restructure the final
# message, and final messages with and without trailing spacing.
CONTINUE_TEMPLATES = {
    "keeps": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}",
    "trims": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}<end>\n{% endfor %}",
    "parts": "{% for m in messages %}<{{ m.role }}>{% for p in m.content %}{{ p.text }}|{% endfor %}\n{% endfor %}",
    "no_content_word": "{% for m in messages %}{{ m.role }}\n{% endfor %}",
}


def continue_requests():
    r = []
    add = lambda name, messages, **kw: r.append(dict(name=name, messages=messages, **kw))
    q = {"role": "user", "content": "q"}
    for name, text in [("plain", "The answer is"), ("trailing_space", "The answer is "),
                       ("trailing_newline", "Line one\n"), ("leading_space", "  indented"),
                       ("empty", ""), ("only_spaces", "   ")]:
        add(name, [q, {"role": "assistant", "content": text}])
    add("parts", [q, {"role": "assistant", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b "}]}])
    add("null_content", [q, {"role": "assistant", "content": None}])
    add("user_last", [{"role": "user", "content": "continue me "}])
    add("with_generation_prompt", [q, {"role": "assistant", "content": "x"}], add_generation_prompt=True)
    return r


def continue_cases(tok):
    cases = []
    templates = dict(CONTINUE_TEMPLATES, qwen3=tok.chat_template)
    for case in continue_requests():
        out = dict(case)
        body = {"model": "m", "messages": case["messages"], "continue_final_message": True,
                "add_generation_prompt": case.get("add_generation_prompt", False)}
        try:
            req = ChatCompletionRequest.model_validate(body)
        except Exception as e:
            out["rejected"] = type(e).__name__
            cases.append(out)
            continue
        out["rendered"] = {}
        for name, t in templates.items():
            fmt = vllm_hf._detect_content_format(t, default="string")
            conv = conversation(req, fmt)
            try:
                out["rendered"][name] = {"text": tok.apply_chat_template(
                    conv, chat_template=t, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                    continue_final_message=True)}
            except Exception as e:
                out["rendered"][name] = {"error": type(e).__name__}
        cases.append(out)
    return {"templates": CONTINUE_TEMPLATES, "requests": cases}


def conversation(req, fmt):
    mc = types.SimpleNamespace(multimodal_config=None, enable_prompt_embeds=False)
    conv, _, _ = parse_chat_messages(req.messages, mc, fmt)
    return conv


def render(tok, template, conv):
    """Developer-role handling and templating as vllm.renderers.hf.safe_apply_chat_template does them."""
    if any(m["role"] == "developer" for m in conv) and not vllm_hf._detect_developer_role_support(template):
        conv = vllm_hf._consolidate_system_messages(vllm_hf._convert_developer_to_system(conv))
    try:
        return {"text": tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=True)}
    except Exception as e:  # a template error is vLLM's 400 too; recorded, not compared
        return {"error": type(e).__name__}


def main(src, dst):
    with tempfile.TemporaryDirectory() as d:
        with gzip.open(os.path.join(src, "tokenizer.json.gz")) as f, open(os.path.join(d, "tokenizer.json"), "wb") as g:
            g.write(f.read())
        shutil.copy(os.path.join(src, "tokenizer_config.json"), d)
        tok = AutoTokenizer.from_pretrained(d)
    templates = dict(TEMPLATES, qwen3=tok.chat_template)
    tmpl_out = {name: {"format": vllm_hf._detect_content_format(t, default="string"),
                       "handles_developer": vllm_hf._detect_developer_role_support(t)}
                for name, t in templates.items()}
    cases = []
    for case in requests():
        out = dict(case)
        try:
            req = ChatCompletionRequest.model_validate({"model": "m", "messages": case["messages"]})
            convs = {fmt: conversation(req, fmt) for fmt in ("string", "openai")}
        except Exception as e:
            out["rejected"] = type(e).__name__
            cases.append(out)
            continue
        out["conversation"] = convs
        out["rendered"] = {name: render(tok, t, convs[tmpl_out[name]["format"]]) for name, t in templates.items()}
        cases.append(out)
    import vllm
    json.dump({"_origin": f"scripts/gen_render_fixtures.py with vllm {vllm.__version__}",
               "templates": {n: dict(tmpl_out[n], source=TEMPLATES[n]) if n in TEMPLATES else tmpl_out[n] for n in templates},
               "requests": cases, "continue_final_message": continue_cases(tok)},
              open(dst, "w"), ensure_ascii=False, indent=1)
    print(f"wrote {len(templates)} templates and {len(cases)} requests to {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

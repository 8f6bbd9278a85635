#!/usr/bin/env python3
"""Generates the tokenizer-class fixtures: how vLLM (through transformers 5.x)
loads a tokenizer directory, by running vLLM's own loader.

transformers 5 picks a tokenizer class from `tokenizer_class` in
tokenizer_config.json and the model's `model_type` in config.json, and for
some classes rebuilds the normalizer, pre-tokenizer and BPE options from the
class's own rules instead of using tokenizer.json as written. This script
writes two files:

- crates/kvgate-tokenize/data/transformers_classes.json: the facts kvgate's
  class resolution needs (model_type -> registered class, the model types
  whose hub class transformers overrides, and for every class name whether it
  resolves to a class that rebuilds the tokenizer);
- fixtures/tokenize/classes.json: for two small base tokenizers trained
  here (a byte-level BPE split like Llama 3's and DeepSeek's, digits in
  threes, `ignore_merges`; a SentencePiece-style BPE) under many
  (tokenizer_class, model_type) pairs, the class vLLM ends up with and the
  ids it computes for tricky texts, with and without special tokens.

  (in the vLLM venv of scripts/vllm/install.sh)
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
    python3 scripts/gen_tokenizer_class_fixtures.py
"""
import json
import os
import shutil
import sys
import tempfile

import transformers
import vllm
from transformers.models.auto import tokenization_auto as ta
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from vllm.tokenizers.hf import CachedHfTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPM_DIR = os.path.join(ROOT, "fixtures/tokenize/spm_bpe")
BYTE_DIR = os.path.join(ROOT, "fixtures/tokenize/byte_bpe")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "Hello world",
    "I can't believe it's 2026, they'll say we'd've done it.",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "para one\n\npara two\n\n\n  indented\tand\ttabs",
    "windows\r\nline\r\nendings\r\n",
    "中文，标点！还有“引号”。日本語の文、そして…",
    "  leading spaces and trailing  ",
    " one leading space",
    "<|im_start|>user\nhi<|im_end|> <s> </s> <unk> <|endoftext|>",
    "emoji 👩‍👩‍👧‍👦 and combining e\u0301 and ﬁ ligature",
    "fn main() {\n    let x = vec![1, 2, 3];\n}\n",
    "ALLCAPS MixedCase camelCaseWord snake_case_word",
    "",
    "\n",
    "a  b   c    d",
]

# (tokenizer_class in tokenizer_config.json, model_type in config.json or None)
CLASS_CASES = [
    (None, None),
    ("PreTrainedTokenizerFast", None),
    ("TokenizersBackend", None),
    ("Qwen2Tokenizer", None),
    ("Qwen2TokenizerFast", "qwen2"),
    ("LlamaTokenizerFast", None),
    ("LlamaTokenizerFast", "llama"),
    ("LlamaTokenizer", "llama"),
    ("LlamaTokenizerFast", "deepseek_v3"),
    ("LlamaTokenizerFast", "qwen2"),
    ("PreTrainedTokenizerFast", "qwen2"),
    ("PreTrainedTokenizerFast", "llama"),
    ("GPT2Tokenizer", None),
    ("GPT2TokenizerFast", "llama"),
    ("GPT2Tokenizer", "phi3"),
    ("GPT2Tokenizer", "gpt2"),
    ("GemmaTokenizerFast", None),
    ("GemmaTokenizer", "gemma"),
    ("GPTNeoXTokenizerFast", None),
    ("CodeGenTokenizer", None),
    ("CohereTokenizerFast", None),
    ("BloomTokenizerFast", None),
    ("T5TokenizerFast", None),
    ("NoSuchTokenizer", None),
    (None, "llama"),
    (None, "gemma"),
]

# Config variations that change what a rebuilding class builds.
VARIANTS = [
    ("plain", {}),
    ("no_added_tokens_decoder", {"drop": ["added_tokens_decoder"]}),
    ("add_prefix_space", {"set": {"add_prefix_space": True}}),
    ("legacy", {"set": {"legacy": True}}),
]


def class_facts():
    mapping = {m: c for m, c in ta.TOKENIZER_MAPPING_NAMES.items() if c}
    names = set()
    for c in mapping.values():
        base = c.removesuffix("Fast")
        names.update([base, base + "Fast"])
    names.update(n for n, _ in CLASS_CASES if n)
    classes = {}
    for name in sorted(names):
        cls = ta.tokenizer_class_from_name(name)
        if cls is None:
            continue
        classes[name] = {
            "class": cls.__name__,
            # transformers' own test (convert_to_native_format): a class with its
            # own __init__ builds the backend from its rules, not from the file.
            "rebuilds": not (cls is TokenizersBackend or "__init__" not in cls.__dict__),
        }
    return {
        "_origin": f"transformers {transformers.__version__} (vLLM {vllm.__version__}); "
                   "scripts/gen_tokenizer_class_fixtures.py",
        "model_type_classes": mapping,
        "hub_class_overridden_for": sorted(ta.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS),
        "generic_classes": ["TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast",
                            "MistralCommonBackend"],
        "classes": classes,
    }


def train_spm_bpe():
    """A small SentencePiece-style BPE (Metaspace, byte fallback), as Llama 2,
    Mistral and Gemma ship theirs, trained on the test texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  initial_alphabet=list("▁"), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    os.makedirs(SPM_DIR, exist_ok=True)
    tok.save(os.path.join(SPM_DIR, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizerFast",
              "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True}
                                       for i, c in enumerate(["<unk>", "<s>", "</s>"])}}
    with open(os.path.join(SPM_DIR, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def corpus():
    return TEXTS * 20 + ["the quick brown fox jumps over the lazy dog " * 5,
                         "router cache prefix block engine token latency batch " * 5,
                         "numbers 1234 5678 90 and 3.14, can't won't I'm you're " * 5]


def train_byte_bpe():
    """A small byte-level BPE as Llama 3, DeepSeek and Qwen ship theirs (regex
    split, ByteLevel without its own regex, `ignore_merges`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(BYTE_DIR, exist_ok=True)
    tok.save(os.path.join(BYTE_DIR, "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False,
              "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True}
                                       for i, c in enumerate(special)}}
    with open(os.path.join(BYTE_DIR, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def bases():
    yield "byte_bpe", open(os.path.join(BYTE_DIR, "tokenizer.json"), "rb").read(), \
        json.load(open(os.path.join(BYTE_DIR, "tokenizer_config.json")))
    yield "spm_bpe", open(os.path.join(SPM_DIR, "tokenizer.json"), "rb").read(), \
        json.load(open(os.path.join(SPM_DIR, "tokenizer_config.json")))


def load(tokenizer_json, config, model_type):
    d = tempfile.mkdtemp()
    try:
        with open(os.path.join(d, "tokenizer.json"), "wb") as f:
            f.write(tokenizer_json)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        if model_type:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"model_type": model_type, "transformers_version": transformers.__version__}, f)
        tok = CachedHfTokenizer.from_pretrained(d)
        name = type(tok).__name__.removeprefix("Cached")
        return name, [tok.encode(t, add_special_tokens=False) for t in TEXTS], \
            [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    facts_out = os.path.join(ROOT, "crates/kvgate-tokenize/data/transformers_classes.json")
    os.makedirs(os.path.dirname(facts_out), exist_ok=True)
    with open(facts_out, "w") as f:
        json.dump(class_facts(), f, indent=1, sort_keys=True)
    train_spm_bpe()
    train_byte_bpe()
    cases = []
    for base, tokenizer_json, base_config in bases():
        for cls, model_type in CLASS_CASES:
            for variant, change in VARIANTS:
                if variant != "plain" and cls not in ("LlamaTokenizerFast", "GPT2Tokenizer", "Qwen2Tokenizer",
                                                     "GemmaTokenizerFast", "PreTrainedTokenizerFast"):
                    continue
                config = {k: v for k, v in base_config.items() if k not in change.get("drop", [])}
                config.pop("chat_template", None)
                config.update(change.get("set", {}))
                if cls is None:
                    config.pop("tokenizer_class", None)
                else:
                    config["tokenizer_class"] = cls
                try:
                    name, ids, ids_special = load(tokenizer_json, config, model_type)
                except Exception as e:  # a load vLLM refuses is a fact too
                    cases.append(dict(base=base, tokenizer_class=cls, model_type=model_type, variant=variant,
                                      config=change, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                cases.append(dict(base=base, tokenizer_class=cls, model_type=model_type, variant=variant,
                                  config=change, resolved_class=name, ids=ids, ids_special=ids_special))
                print(f"{base:8} {str(cls):26} {str(model_type):12} {variant:24} -> {name}", file=sys.stderr)
    out = os.path.join(ROOT, "fixtures/tokenize/classes.json")
    with open(out, "w") as f:
        json.dump({"_origin": f"vLLM {vllm.__version__}, transformers {transformers.__version__}; "
                              "scripts/gen_tokenizer_class_fixtures.py",
                   "texts": TEXTS, "cases": cases}, f, separators=(",", ":"))
    print(f"wrote {facts_out} and {out} ({len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()

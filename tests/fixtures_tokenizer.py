"""A tiny byte-level BPE tokenizer trained in well under a second with `tokenizers`, for tests.

make_tiny_tokenizer(folder) writes folder/tokenizer.json and returns the `tokenizers.Tokenizer`. The pre-tokenizer
follows one llama.cpp pre type (the `style`), written the way the original Hugging Face tokenizers of that family
write it, so that converting with `--pre <style>` must reproduce it exactly.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool>"  # a non-special added token (GGUF type 4, user-defined)
LLAMA_BOS = "<|begin_of_text|>"

# The Hugging Face spellings of these pre-tokenizers (case-insensitive contractions, as shipped by Qwen2 / Llama 3).
QWEN2_HF_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_HF_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # naive\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i * i); }",
    "Numbers: 0 1 12 123 1234 12345 3.14159 2,718 1e-5 0xFF 1000000",
    "I've been told he's there, you're sure? We'll see, they'd know. I'm here.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe \u00e0 la carte, se\u00f1or, ni\u00f1o.",
    "\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002\u6211\u60f3\u5728\u82f9\u679c\u5de5\u4f5c\u3002 \u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0437\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439\u0442\u0435",
    "Emoji: \U0001f680 \U0001f999\U0001f999 \U0001f636\u200d\U0001f32b\ufe0f \u2705 \U0001f601",
    "    indented line\n\tTabbed line\n\n\nthree newlines   trailing spaces   \n",
    "<html><body><p class=\"x\">Hello, world!</p></body></html>",
    "user: hello there\nassistant: hi! how can I help you today?\n",
]


def _pre_tokenizer(style: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if style == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if style == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if style == "qwen2":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_HF_REGEX), behavior="isolated", invert=False), byte_level]
        )
    if style == "llama-bpe":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_HF_REGEX), behavior="isolated", invert=False), byte_level]
        )
    raise ValueError(f"unknown tiny tokenizer style {style!r}")


def make_tiny_tokenizer(path: str | Path, style: str = "gpt-2", vocab_size: int = 400):
    """Train a ~`vocab_size`-token byte-level BPE (256-byte alphabet, ChatML specials, one user-defined token).

    `path` is a folder (tokenizer.json is written into it) or a path ending in .json. style: "gpt-2" (default),
    "smollm", "qwen2" or "llama-bpe" (the latter also adds <|begin_of_text|> as BOS through the post-processor
    and sets ignore_merges, like Llama 3).
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    path = Path(path)
    out = path if path.suffix == ".json" else path / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    specials = [*SPECIAL_TOKENS, LLAMA_BOS] if style == "llama-bpe" else list(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(ignore_merges=style == "llama-bpe"))
    tokenizer.pre_tokenizer = _pre_tokenizer(style)
    tokenizer.decoder = decoders.ByteLevel()
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()  # as Qwen2 ships it; llama.cpp applies no normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    tokenizer.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
    if style == "llama-bpe":
        bos_id = tokenizer.token_to_id(LLAMA_BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS}:1 $B:1", special_tokens=[(LLAMA_BOS, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out))
    return tokenizer


def write_vocab_only_gguf(path: Path, vocab, drop: tuple[str, ...] = ()) -> Path:
    """A GGUF with llama hyper-parameters and our tokenizer keys (less the `drop`ped ones) but no tensors:
    llama.cpp loads it vocab_only."""
    import gguf

    from ondevice.tokenizer import gguf_metadata_from_vocab

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(len(vocab.tokens))
    for key, value in gguf_metadata_from_vocab(vocab).items():
        if key in drop:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_same_ids_as_llama_cpp(llm, tokenizer, texts: list[str], same_text=None) -> int:
    """`tokenizer` (a tokenizers.Tokenizer) gives llama.cpp's ids for every text, with and without BOS, with and
    without special-token parsing; `same_text(ids, ours)` may check the decoded text too. Returns the case count."""
    cases = 0
    for text in texts:
        for add_bos in (False, True):
            for special in (True, False):
                tokenizer.encode_special_tokens = not special
                ours = tokenizer.encode(text, add_special_tokens=add_bos).ids
                theirs = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
                assert ours == theirs, (text, add_bos, special)
                if same_text is not None:
                    same_text(ours, tokenizer.decode(ours, skip_special_tokens=False))
                cases += 1
    tokenizer.encode_special_tokens = False
    return cases

"""The character-level tokenizer of r1lab's tiny models, as a plain Hugging Face fast tokenizer.

Tiny models learn arithmetic and countdown far faster when every digit is its own token, so the
vocabulary is one token per byte: every ASCII character (letters, digits, punctuation, space,
newline, tab) is exactly one token, and any other character is spelled as its UTF-8 bytes (two to
four tokens), so nothing is ever unknown and every text round-trips. `extra_chars` makes chosen
non-ASCII characters (e.g. "×÷√") single tokens too. Markup the recipe depends on is one token each:

  * special (skipped by `decode(..., skip_special_tokens=True)`): `<pad>`, `<eos>`, `<unk>` (kept for
    the usual API; byte coverage means it never occurs) and the role markers `<|system|>`,
    `<|user|>`, `<|assistant|>`;
  * normal added tokens (kept by that decode, because they are content the reward parser reads):
    `<think>`, `</think>`.

Ids are stable: the six special tokens are 0-5, `<think>` 6, `</think>` 7, byte b is 8 + b (so an
ASCII character c is 8 + ord(c)), and `extra_chars` follow. There is no separate BOS token:
documents are separated by `<eos>`, as in GPT-2, and models built by `r1lab.modeling.tiny` use
`<eos>` as their `bos_token_id`.

Why bytes, in the GPT-2 byte-level form: transformers 5 ignores a checkpoint's declared tokenizer
class for some model types and rebuilds the tokenizer with the model family's own pipeline (for
`qwen2`, NFC + the Qwen split regex + byte-level pre-tokenizer and decoder, BPE without `<unk>`). This
tokenizer *is* that pipeline with a one-byte-per-token vocabulary, so whichever class loads it
(`PreTrainedTokenizerFast`, `Qwen2Tokenizer`, `GPT2Tokenizer`, in transformers 4 or 5, or vLLM) the
ids are the same. The NFC normalizer means text is compared in composed form: exact round-trips hold
for all ASCII and all NFC text.

The chat template (Jinja, so `tokenizer.apply_chat_template` works in transformers and vLLM) is
compact for tiny models: system messages are dropped (the tiny training corpus fixes the format),
a user turn renders as `<|user|>{content}`, an assistant turn as `<|assistant|>{content}<eos>`, and
the generation prompt is `<|assistant|>`. The assistant part is wrapped in `{% generation %}` so
`apply_chat_template(..., return_assistant_tokens_mask=True)` yields the SFT loss mask.

    >>> tok = build_char_tokenizer()
    >>> tok.apply_chat_template([{"role": "user", "content": "2+2"}], tokenize=False, add_generation_prompt=True)
    '<|user|>2+2<|assistant|>'
    >>> tok("<think>12")["input_ids"]
    [6, 57, 58]

Save it with `r1lab.modeling.save_checkpoint` (or `tok.save_pretrained`); it loads back with
`AutoTokenizer.from_pretrained(dir)` without r1lab installed.
"""

from __future__ import annotations

from functools import cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

#: Special tokens in id order: ids 0..5 are stable, so tests and logs can rely on them.
SPECIAL_TOKENS = (PAD, EOS, UNK, SYSTEM, USER, ASSISTANT)
#: Added tokens that are content, not control: decoding keeps them.
CONTENT_TOKENS = (THINK_OPEN, THINK_CLOSE)
#: Id of byte 0; byte b has id BYTE_OFFSET + b.
BYTE_OFFSET = len(SPECIAL_TOKENS) + len(CONTENT_TOKENS)

# The pre-tokenizer split of Qwen2 (and GPT-4-style) tokenizers. With one token per byte it changes
# no ids; it is here so this pipeline is the one transformers rebuilds for `qwen2` checkpoints.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

#: `{%- -%}` trims the template's own whitespace so the rendering is exactly the markers and contents.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<eos>{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


@cache
def byte_symbols() -> tuple[str, ...]:
    """The printable stand-in of each byte 0..255 used by byte-level BPE (GPT-2's bytes_to_unicode).

    Bytes that are printable, non-space Latin-1 characters stand for themselves; the others (controls,
    space, ...) are shifted to 256 and up, so every byte is one visible vocabulary symbol.

    >>> (byte_symbols()[ord("a")], byte_symbols()[ord(" ")], byte_symbols()[ord("\\n")])
    ('a', 'Ġ', 'Ċ')
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return tuple(symbols[b] for b in range(256))


def _spelled(ch: str) -> list[str]:
    """The byte symbols of one character's UTF-8 encoding."""
    return [byte_symbols()[b] for b in ch.encode("utf-8")]


def char_vocab(extra_chars: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, BPE merges): markup, then the 256 bytes, then each multi-byte extra char.

    A multi-byte character becomes one token by merging its bytes left to right; UTF-8 lead and
    continuation bytes never line up across a character boundary, so these merges only ever fire
    inside that character.

    >>> vocab, merges = char_vocab("×")
    >>> (vocab["<pad>"], vocab["<think>"], vocab["Ġ"], len(vocab), merges)
    (0, 6, 40, 265, [('Ã', 'Ĺ')])
    """
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *CONTENT_TOKENS, *byte_symbols()):
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for ch in dict.fromkeys(extra_chars):  # distinct, in order
        parts = _spelled(ch)
        prefix = parts[0]
        for nxt in parts[1:]:
            if prefix + nxt not in vocab:
                merges.append((prefix, nxt))
                vocab[prefix + nxt] = len(vocab)
            prefix += nxt
    return vocab, merges


def build_char_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """A one-token-per-character fast tokenizer with single-token markup and the compact chat template."""
    vocab, merges = char_vocab(extra_chars)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in CONTENT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        # Cleanup would turn "1 ." into "1." and break exact round-trips of model text.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

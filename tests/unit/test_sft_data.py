"""SFT data: trace reading errors, the assistant-only mask, bucketing and packing."""

from __future__ import annotations

import json

import pytest
import torch

from r1lab.modeling import build_char_tokenizer, build_model
from r1lab.modeling.packing import pack_rows
from r1lab.sft.data import (
    TraceError,
    assistant_spans,
    bucket_micro_batches,
    collate_bucket,
    collate_pack,
    encode,
    encode_all,
    epoch_steps,
    read_conversations,
    step_micro_batches,
)

TOK = build_char_tokenizer()
CHATML = (  # Qwen-like: a default system prompt, role lines, an end token and a newline after each turn
    "{%- if messages[0]['role'] != 'system' -%}{{ '<|system|>default\\n' }}{%- endif -%}"
    "{%- for m in messages -%}{{ '<|user|>' + m['role'] + '\\n' + m['content'] + '<eos>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|user|>assistant\\n' }}{%- endif -%}"
)


def conv(q: str, a: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def write(tmp_path, lines: list[str]):
    p = tmp_path / "traces.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def targets_text(tok, messages) -> list[str]:
    ex = encode(tok, messages)
    return [tok.decode([i]) for i, t in zip(ex.ids, ex.targets, strict=True) if t]


def test_mask_is_assistant_content_and_its_eos_only():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>ok</think>2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert targets_text(TOK, msgs) == ["<think>", "o", "k", "</think>", "2", "<eos>", "4", "<eos>"]
    # the tiny template marks its assistant part with {% generation %}: transformers' own mask agrees
    ex = encode(TOK, msgs)
    ref = TOK.apply_chat_template(msgs, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    assert ref["input_ids"] == ex.ids and ref["assistant_masks"] == [int(t) for t in ex.targets]


def test_mask_with_a_template_that_adds_a_default_system_prompt_and_trailing_newlines():
    tok = build_char_tokenizer()
    tok.chat_template = CHATML
    text, spans = assistant_spans(tok, conv("hi", "yo"))
    assert text == "<|system|>default\n<|user|>user\nhi<eos>\n<|user|>assistant\nyo<eos>\n"
    assert [text[s:e] for s, e in spans] == ["yo<eos>\n"]  # content, end token, the newline after it
    assert "".join(targets_text(tok, conv("hi", "yo"))) == "yo<eos>\n"


def test_template_that_rewrites_earlier_turns_is_refused():
    tok = build_char_tokenizer()
    # drops the reasoning of every assistant turn, as DeepSeek-R1's template does
    tok.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}<|user|>{{ m['content'] }}"
        "{%- else -%}<|assistant|>{{ m['content'].split('</think>')[-1] }}<eos>{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )
    msgs = conv("q", "<think>r</think>a") + conv("q2", "<think>r2</think>a2")
    with pytest.raises(TraceError, match="rewrites assistant turn 1"):
        encode(tok, msgs)


def test_reasoning_content_is_folded_into_think(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "\\boxed{4}", "reasoning_content": "2+2"},
        ],
        "meta": {"ignored": True},
    }
    (msgs,) = read_conversations([write(tmp_path, [json.dumps(row)])])
    assert msgs[-1] == {"role": "assistant", "content": "<think>2+2</think>\\boxed{4}"}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"traces.jsonl:2: invalid JSON"),
        ("[1, 2]", r"traces.jsonl:2: expected a JSON object"),
        ('{"text": "hi"}', r"traces.jsonl:2: field 'messages': expected a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"traces.jsonl:2: field 'messages\[0\].role'"),
        ('{"messages": [{"role": "user", "content": 3}]}', r"traces.jsonl:2: field 'messages\[0\].content'"),
        (
            '{"messages": [{"role": "user", "content": "q"}]}',
            r"traces.jsonl:2: field 'messages': no assistant",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a"}]}',
            r"traces.jsonl:2: field 'messages\[0\].role'",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    good = json.dumps({"messages": conv("q", "a")})
    with pytest.raises(TraceError, match=message):
        read_conversations([write(tmp_path, [good, line])])


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TraceError, match="no such traces file"):
        read_conversations([tmp_path / "nope.jsonl"])
    with pytest.raises(TraceError, match="no conversations"):
        read_conversations([write(tmp_path, ["", "  "])])
    with pytest.raises(TraceError, match="'data'"):
        read_conversations([])


def test_too_long_conversations_are_dropped_and_counted():
    examples, dropped = encode_all(TOK, [conv("1+1", "2"), conv("x" * 50, "y")], max_seq_len=20)
    assert len(examples) == 1 and dropped == 1


def test_epoch_steps_cover_every_example_once_and_depend_on_seed_and_epoch():
    steps = epoch_steps(10, 4, seed=0, epoch=0)
    assert [len(s) for s in steps] == [4, 4, 2] and sorted(sum(steps, [])) == list(range(10))
    assert steps == epoch_steps(10, 4, seed=0, epoch=0)
    assert steps != epoch_steps(10, 4, seed=0, epoch=1)


def test_bucketed_epoch_groups_similar_lengths_and_still_covers_everything():
    lengths = [(i * 37) % 200 + 10 for i in range(640)]
    steps = epoch_steps(640, 8, seed=1, epoch=0, lengths=lengths)
    assert sorted(sum(steps, [])) == list(range(640))

    def waste(batches):  # padding a step would carry as one right-padded micro-batch
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert waste(steps) < 0.1 * waste(epoch_steps(640, 8, seed=1, epoch=0))
    assert steps == epoch_steps(640, 8, seed=1, epoch=0, lengths=lengths)


def test_bucketing_respects_the_token_budget_and_packing_the_row_length():
    lengths = [5, 30, 7, 12, 29, 3, 16, 8]
    idx = list(range(len(lengths)))
    mbs = bucket_micro_batches(lengths, idx, token_budget=40)
    assert sorted(sum(mbs, [])) == idx
    assert all(len(mb) * max(lengths[i] for i in mb) <= 40 or len(mb) == 1 for mb in mbs)
    rows = pack_rows(lengths, idx, row_len=32)
    assert sorted(sum(rows, [])) == idx
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert len(rows) == 4  # first-fit decreasing: 110 tokens in four 32-token rows


@pytest.mark.parametrize("preset", ["gpt2-1m", "qwen2-4m"])
def test_packed_rows_give_the_same_logits_as_separate_rows(preset):
    exs = [
        encode(TOK, c) for c in (conv("12+3", "15"), conv("7*8?", "<think>7*8=56</think>56"), conv("a", "b"))
    ]
    model = build_model(preset, TOK, seed=0).eval()
    packed = collate_pack([exs], row_len=64)
    padded = collate_bucket(exs, TOK.pad_token_id)
    with torch.no_grad():
        lp = model(**packed.model_inputs(), use_cache=False).logits  # [1, T, V]
        lb = model(**padded.model_inputs(), use_cache=False).logits  # [3, T', V]
    t = 0
    for b, e in enumerate(exs):
        n = len(e.ids)
        torch.testing.assert_close(lp[0, t : t + n], lb[b, :n], atol=1e-5, rtol=1e-4)
        assert packed.targets[0, t : t + n].tolist() == [False] + e.targets[1:]
        t += n
    assert packed.position_ids[0, : len(exs[0].ids) + 1].tolist() == list(range(len(exs[0].ids))) + [0]


def test_micro_batches_of_a_step_hold_its_target_tokens_either_way():
    exs = [encode(TOK, conv(str(i) * (i + 1), "ab" * i + "c")) for i in range(8)]
    want = sum(e.n_targets for e in exs)
    for how in ("bucket", "pack"):
        mbs = step_micro_batches(
            exs, list(range(8)), how, token_budget=64, row_len=64, pad_id=TOK.pad_token_id
        )
        assert sum(int(mb.targets.sum()) for mb in mbs) == want
        assert sum(mb.real_tokens for mb in mbs) == sum(len(e.ids) for e in exs)

"""r1lab.tasks: shipped loaders, generators (determinism, disjoint splits, solvability), errors, CLI."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from fractions import Fraction
from itertools import islice

import pytest

from r1lab.chat import R1_SYSTEM_PROMPT
from r1lab.config import TaskSpec
from r1lab.tasks import (
    TASKS,
    TaskError,
    arithmetic_problem,
    is_test_arithmetic,
    is_test_countdown,
    is_test_problem,
    iter_task,
    load_task,
    solve_countdown,
)
from r1lab.tasks.arithmetic import canonical as arith_key
from r1lab.tasks.countdown import SHIPPED_TEST_FILES, countdown_rows
from r1lab.tasks.files import shipped_file

# --------------------------------------------------------------------------- helpers


def eval_equation(expr: str) -> tuple[Fraction, list[int]]:
    """Value of a + - * / equation with exact fractions, and the integer literals it uses."""
    used: list[int] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            if isinstance(node.op, ast.Div):
                return a / b
            return ops[type(node.op)]
        raise AssertionError(f"unexpected syntax in {expr!r}: {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval").body), used


def brute_force_reachable(nums: list[int]) -> set[Fraction]:
    """Every value of every expression over all of `nums`, by repeatedly combining two of them."""
    start = tuple(sorted(Fraction(n) for n in nums))
    out: set[Fraction] = set()
    seen: set[tuple[Fraction, ...]] = set()

    def go(vals: tuple[Fraction, ...]) -> None:
        if vals in seen:
            return
        seen.add(vals)
        if len(vals) == 1:
            out.add(vals[0])
            return
        for i in range(len(vals)):
            for j in range(len(vals)):
                if i == j:
                    continue
                a, b = vals[i], vals[j]
                rest = [v for k, v in enumerate(vals) if k not in (i, j)]
                for r in (a + b, a - b, a * b) + ((a / b,) if b else ()):
                    go(tuple(sorted([*rest, r])))

    go(start)
    return out


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- shipped loaders


@pytest.mark.parametrize(
    "name, count, first_reference, verifier",
    [
        ("gsm8k", 1319, "18", "gsm8k"),
        ("math500", 500, r"\left( 3, \frac{\pi}{2} \right)", "math"),
        ("aime2024", 30, "204", "math"),
        ("countdown-hf", 1024, "45", "countdown"),
        ("countdown-tinyzero", 1024, "36", "countdown"),
    ],
)
def test_shipped_loaders(name, count, first_reference, verifier):
    problems = load_task(TaskSpec(name=name, split="test"))
    assert len(problems) == count
    assert problems[0].reference == first_reference
    assert problems[0].id == f"{name}/test/0"
    assert len({p.id for p in problems}) == count
    assert all(p.meta["verifier"] == verifier and p.meta["task"] == name for p in problems)
    assert all(p.question and p.reference for p in problems)
    assert all(is_test_problem(p) for p in problems[:50])


def test_gsm8k_references_are_plain_integers_with_commas_removed():
    problems = load_task(TaskSpec(name="gsm8k", split="test"))
    raw = [
        json.loads(line)["answer"]
        for line in shipped_file("gsm8k/test.jsonl").read_text("utf-8").splitlines()
    ]
    with_commas = [i for i, a in enumerate(raw) if "," in a.rpartition("####")[2]]
    assert with_commas, "the shipped file has answers with thousands commas"
    for i in with_commas:
        assert "," not in problems[i].reference
    assert all(re.fullmatch(r"-?[0-9]+", p.reference) for p in problems)  # README: always an integer
    assert problems[0].messages[0] == {"role": "system", "content": R1_SYSTEM_PROMPT}
    bare = load_task(TaskSpec(name="gsm8k", split="test", limit=2, options={"system": False}))
    assert [m["role"] for m in bare[0].messages] == ["user"]


def test_aime_leading_zeros_and_math500_meta():
    aime = load_task(TaskSpec(name="aime2024", split="test"))
    assert aime[7].meta["raw_answer"] == "025" and aime[7].reference == "25"
    assert all(p.reference.isdigit() and not (len(p.reference) > 1 and p.reference[0] == "0") for p in aime)
    math = load_task(TaskSpec(name="math500", split="test", limit=3))
    assert len(math) == 3
    assert math[0].meta["subject"] == "Precalculus" and math[0].meta["level"] == 2


def test_countdown_file_prompt_matches_generator_wording():
    p = load_task(TaskSpec(name="countdown-tinyzero", split="test", limit=1, options={"system": False}))[0]
    assert p.question == (
        "Using the numbers [79, 17, 60], create an equation that equals 36. "
        "You can use basic arithmetic operations (+, -, *, /) and each number exactly once."
    )
    assert p.meta["nums"] == [79, 17, 60] and p.meta["target"] == 36 and p.meta["split_index"] == 0


def test_shuffle_and_limit():
    first = load_task(TaskSpec(name="math500", split="test", limit=5))
    assert [p.id for p in first] == [f"math500/test/{i}" for i in range(5)]
    a = load_task(TaskSpec(name="math500", split="test", limit=5, seed=1, options={"shuffle": True}))
    b = load_task(TaskSpec(name="math500", split="test", limit=5, seed=1, options={"shuffle": True}))
    assert [p.id for p in a] == [p.id for p in b] != [p.id for p in first]


# --------------------------------------------------------------------------- generators


def test_arithmetic_is_deterministic_by_seed():
    spec = TaskSpec(name="arithmetic", split="train", limit=50, options={"ops": ["+", "-", "*"]})
    a, b = load_task(spec), load_task(spec)
    c = load_task(spec.model_copy(update={"seed": 1}))
    assert [(p.question, p.reference) for p in a] == [(p.question, p.reference) for p in b]
    assert [p.question for p in a] != [p.question for p in c]


def test_arithmetic_train_and_test_are_disjoint():
    test = load_task(TaskSpec(name="arithmetic", split="test", options={"digits": 3}))
    train = load_task(TaskSpec(name="arithmetic", split="train", limit=20_000, seed=7, options={"digits": 3}))
    assert len(test) == 500 and len(train) == 20_000
    test_keys = {arith_key(p.meta["a"], p.meta["b"], p.meta["op"]) for p in test}
    train_keys = {arith_key(p.meta["a"], p.meta["b"], p.meta["op"]) for p in train}
    assert len(test_keys) == 500  # distinct test problems
    assert not test_keys & train_keys
    assert all(is_test_problem(p) for p in test) and not any(is_test_problem(p) for p in train)
    # commutative forms share a split, so 4821+3177 in train means 3177+4821 is not in test
    assert all(is_test_arithmetic(p.meta["b"], p.meta["a"], "+") for p in test)


def test_arithmetic_problems_are_correct():
    spec = TaskSpec(
        name="arithmetic", split="train", limit=300, options={"digits": 3, "min_digits": 1, "ops": "+-*"}
    )
    problems = load_task(spec)
    assert {p.meta["op"] for p in problems} == {"+", "-", "*"}
    for p in problems:
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        assert p.messages == [{"role": "user", "content": f"{a}{op}{b}"}]
        assert int(p.reference) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert int(p.reference) >= 0 and 1 <= len(str(a)) <= 3
        assert p.meta["verifier"] == "exact"
    p = arithmetic_problem(4821, 3177, "+", system=True)
    assert (
        p.reference == "7998" and p.messages[0]["content"] == R1_SYSTEM_PROMPT and p.question == "4821+3177"
    )


def test_arithmetic_small_space_test_set_is_the_whole_bucket():
    problems = load_task(TaskSpec(name="arithmetic", split="test", options={"digits": 1}))
    expected = {arith_key(a, b, "+") for a in range(10) for b in range(10) if is_test_arithmetic(a, b, "+")}
    assert {arith_key(p.meta["a"], p.meta["b"], "+") for p in problems} == expected
    assert len(problems) == len(expected) < 500


def test_countdown_generator_instances_are_solvable_and_splits_disjoint():
    opts = {"n_numbers": 3}
    test = load_task(TaskSpec(name="countdown", split="test", limit=200, options=opts))
    train = load_task(TaskSpec(name="countdown", split="train", limit=2000, seed=3, options=opts))
    assert load_task(TaskSpec(name="countdown", split="test", limit=200, options=opts)) == test
    test_sets = {tuple(sorted(p.meta["nums"])) for p in test}
    train_sets = {tuple(sorted(p.meta["nums"])) for p in train}
    assert not test_sets & train_sets
    shipped = {
        tuple(sorted(n)) for rel in SHIPPED_TEST_FILES for _, n, _, _ in countdown_rows(shipped_file(rel))
    }
    assert not shipped & train_sets  # training never sees the numbers of a shipped test row
    assert all(is_test_countdown(p.meta["nums"]) for p in test) and not any(is_test_problem(p) for p in train)
    for p in test + train[:300]:
        value, used = eval_equation(p.meta["solution"])
        assert value == p.meta["target"] == int(p.reference)
        assert sorted(used) == sorted(p.meta["nums"])
        assert 10 <= p.meta["target"] <= 100 and all(1 <= n <= 99 for n in p.meta["nums"])


def test_countdown_four_numbers():
    problems = load_task(TaskSpec(name="countdown", split="train", limit=40, options={"n_numbers": 4}))
    for p in problems:
        value, used = eval_equation(p.meta["solution"])
        assert (
            len(p.meta["nums"]) == 4 and value == p.meta["target"] and sorted(used) == sorted(p.meta["nums"])
        )


def test_solver_on_shipped_rows_and_unsolvable_cases():
    for p in load_task(TaskSpec(name="countdown-hf", split="test", limit=60)):
        eq = solve_countdown(p.meta["nums"], p.meta["target"])
        assert eq is not None, p.meta
        value, used = eval_equation(eq)
        assert value == p.meta["target"] and sorted(used) == sorted(p.meta["nums"])
    assert solve_countdown([2, 2], 5) is None
    assert solve_countdown([1, 1, 1], 100) is None
    assert solve_countdown([3, 3, 8, 8], 24) is not None  # 8 / (3 - 8/3): needs a fraction on the way


@pytest.mark.parametrize(
    "nums", [[1, 2, 3], [4, 7, 9], [2, 5, 5], [3, 3, 8, 8], [1, 5, 6, 7], [2, 9, 10, 13]]
)
def test_solver_agrees_with_brute_force(nums):
    reachable = brute_force_reachable(nums)
    for target in range(-20, 120):
        eq = solve_countdown(nums, target)
        assert (eq is not None) == (Fraction(target) in reachable), target
        if eq is not None:
            assert eval_equation(eq)[0] == target


def test_iter_task_streams_past_the_default_size():
    stream = iter_task(TaskSpec(name="arithmetic", split="train", options={"digits": 2}))
    assert len(list(islice(stream, 12_000))) == 12_000


# --------------------------------------------------------------------------- generic loader


def test_jsonl_loader_maps_fields_and_keeps_the_rest(tmp_path):
    path = write_lines(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"prompt": "2+2?", "gold": 4, "key": "a", "tests": ["assert f() == 4"]}),
            "",
            json.dumps({"prompt": "3+3?", "gold": "6", "key": "b"}),
        ],
    )
    opts = {"question": "prompt", "answer": "gold", "id": "key", "verifier": "exact", "system": False}
    problems = load_task(TaskSpec(name="jsonl", split="test", path=path, options=opts))
    assert [p.id for p in problems] == ["a", "b"]
    assert [p.reference for p in problems] == ["4", "6"]
    assert problems[0].messages == [{"role": "user", "content": "2+2?"}]
    assert problems[0].meta["tests"] == ["assert f() == 4"] and problems[0].meta["verifier"] == "exact"
    assert "prompt" not in problems[0].meta and is_test_problem(problems[0])


def test_jsonl_messages_field_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {
            "chat": [
                {"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": "<think>..</think>42"},
            ],
            "answer": "42",
        }
    ]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    p = load_task(TaskSpec(name="jsonl", split="train", path=str(path), options={"messages": "chat"}))[0]
    assert [m["role"] for m in p.messages] == ["system", "user"]  # assistant turn moved to meta, system added
    assert p.meta["solution"] == "<think>..</think>42" and p.reference == "42" and p.id == "chats/train/0"


def test_path_overrides_shipped_file_for_any_split(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl", [json.dumps({"question": "q", "answer": "work\n#### 1,234"})]
    )
    p = load_task(TaskSpec(name="gsm8k", split="train", path=path))[0]
    assert p.reference == "1234" and p.id == "gsm8k/train/0" and not is_test_problem(p)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"question": "q", "answer": "a"}', '{"question": "q", "answer": '], ":2: invalid JSON"),
        (['{"question": "q", "answer": "a"}', "", '{"question": "q"}'], ":3: field 'answer': missing"),
        (['{"question": "q", "answer": [1]}'], ":1: field 'answer': expected a string"),
        (['{"question": 7, "answer": "a"}'], ":1: field 'question': expected a string, got int"),
        (["[1, 2]"], ":1: expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TaskError) as err:
        load_task(TaskSpec(name="jsonl", split="test", path=path))
    assert str(err.value).startswith(path) and message in str(err.value)


@pytest.mark.parametrize(
    "name, row, message",
    [
        (
            "gsm8k",
            {"question": "q", "answer": "no final line"},
            ":1: field 'answer': no '#### <final answer>' line",
        ),
        (
            "countdown-hf",
            {"target": 5, "nums": [1, "2"]},
            ":1: field 'nums': expected a non-empty list of integers",
        ),
        (
            "countdown-hf",
            {"target": True, "nums": [1, 2]},
            ":1: field 'target': expected an integer, got bool",
        ),
        ("math500", {"problem": "p"}, ":1: field 'answer': missing"),
    ],
)
def test_malformed_task_files(tmp_path, name, row, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(row)])
    with pytest.raises(TaskError, match=message):
        load_task(TaskSpec(name=name, split="test", path=path))


def test_bad_bytes_and_missing_file(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(TaskError, match=r"latin1.jsonl:2: not UTF-8"):
        load_task(TaskSpec(name="jsonl", split="test", path=str(bad)))
    with pytest.raises(TaskError, match="nope.jsonl: no such data file"):
        load_task(TaskSpec(name="gsm8k", split="test", path=str(tmp_path / "nope.jsonl")))


@pytest.mark.parametrize(
    "spec, message",
    [
        (TaskSpec(name="foo"), "unknown task 'foo'; known: arithmetic, countdown, gsm8k, math500"),
        (
            TaskSpec(name="arithmetic", options={"digit": 3}),
            "task 'arithmetic': unknown option 'digit'; known: digits",
        ),
        (TaskSpec(name="arithmetic", options={"ops": ["/"]}), "task 'arithmetic': option 'ops'"),
        (TaskSpec(name="arithmetic", options={"digits": "many"}), "option 'digits'"),
        (
            TaskSpec(name="arithmetic", options={"digits": 2, "min_digits": 3}),
            "min_digits \\(3\\) is above digits",
        ),
        (TaskSpec(name="countdown", options={"n_numbers": 7}), "option 'n_numbers'"),
        (TaskSpec(name="countdown", path="x.jsonl"), "is generated; it reads no file"),
        (TaskSpec(name="gsm8k", split="train"), "task 'gsm8k' has no 'train' split"),
        (TaskSpec(name="gsm8k", split="test", options={"question": "q"}), "unknown option 'question'"),
        (TaskSpec(name="jsonl", split="test"), "needs task.path"),
        (TaskSpec(name="jsonl", split="test", options={"verifier": "magic"}), "option 'verifier'"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(TaskError, match=message):
        load_task(spec)


def test_registry_describes_every_task():
    assert list(TASKS)[:2] == ["arithmetic", "countdown"]
    for name, info in TASKS.items():
        assert info.name == name and info.description and info.splits and "test" in info.splits
    assert TASKS["arithmetic"].builtin and not TASKS["gsm8k"].builtin
    assert TASKS["arithmetic"].options["digits"] == 4 and TASKS["arithmetic"].options["ops"] == ["+"]


# --------------------------------------------------------------------------- CLI and imports


def test_cli_list_and_show(capsys):
    from r1lab.cli import main

    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in TASKS)
    assert main(["tasks", "show", "gsm8k", "--n", "2"]) == 0
    shown = capsys.readouterr().out
    assert "== gsm8k/test/0" in shown and "reference: 18" in shown and "gsm8k/test/2" not in shown
    assert main(["tasks", "arithmetic", "--split", "train", "-o", "digits=2", "--n", "1"]) == 0
    assert "== arithmetic/train/0" in capsys.readouterr().out
    assert main(["tasks", "show", "arithmetic", "-o", "digit=2"]) == 2
    assert "unknown option 'digit'" in capsys.readouterr().err


def test_tasks_package_does_not_import_torch():
    code = (
        "import sys, r1lab.tasks, r1lab.tasks.commands; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

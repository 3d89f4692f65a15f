"""`r1lab audit-verifier`: gold answers accepted, adversarial variants rejected, failures reported."""

import json

import pytest

import r1lab.rewards.audit as audit_module
from r1lab.cli import main
from r1lab.config import TaskSpec
from r1lab.rewards.audit import Variant, audit, variants_for
from r1lab.tasks import load_task


@pytest.mark.parametrize("task", ["gsm8k", "math500", "countdown-hf"])
def test_audit_passes_on_a_subset(task, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["audit-verifier", task, "--limit", "12", "--workers", "1", "--json", str(out)]) == 0
    assert "verifier OK" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["task"] == task and report["problems"] == 12
    variants = report["variants"]
    assert all(v["wrong"] == 0 for v in variants.values())
    gold = [name for name, v in variants.items() if v["should_accept"]]
    assert gold and all(variants[name]["accepted"] == variants[name]["n"] > 0 for name in gold)
    assert "long_padding" in variants and "huge_answer" in variants  # problem 0 gets the long ones


def test_variants_cover_the_brief():
    problems = load_task(TaskSpec(name="gsm8k", split="test", limit=2))
    names = {v.name for v in variants_for(problems[0], problems[1])}
    expected = {
        "gold_boxed", "gold_phrase", "off_by_one", "other_answer", "empty", "think_only", "candidates",
        "long_padding", "huge_answer", "digits:fullwidth", "digits:bold", "digits:arabic", "latex_tricks",
    }  # fmt: skip
    assert names == expected
    long_texts = [v.text for v in variants_for(problems[0], problems[1]) if v.name == "long_padding"]
    assert all(len(t) > 1_000_000 for t in long_texts)
    countdown = load_task(TaskSpec(name="countdown-hf", split="test", limit=2))
    names = {v.name for v in variants_for(countdown[0], countdown[1])}
    assert {"gold_equation", "reuse_number", "omit_number", "foreign_number", "miss_target"} <= names


def test_a_fooled_verifier_fails_the_audit(monkeypatch, capsys):
    # A verifier that accepts everything must be caught: exit status 1 and the variants named.
    monkeypatch.setattr(audit_module, "accuracy", lambda text, parsed, problem: 1.0)
    assert main(["audit-verifier", "gsm8k", "--limit", "3", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "off_by_one" in out


def test_a_verifier_rejecting_golds_fails_the_audit(monkeypatch):
    monkeypatch.setattr(audit_module, "accuracy", lambda text, parsed, problem: 0.0)
    tallies = audit(load_task(TaskSpec(name="math500", split="test", limit=2)), progress=False)
    assert tallies["gold_boxed"].wrong == 2 and tallies["empty"].wrong == 0


def test_audit_counts_per_variant():
    problems = load_task(TaskSpec(name="countdown-tinyzero", split="test", limit=4))
    tallies = audit(problems, progress=False)
    assert tallies["gold_equation"].n == 8 and tallies["gold_equation"].accepted == 8
    assert tallies["reuse_number"].n == 4 and tallies["reuse_number"].accepted == 0
    assert isinstance(variants_for(problems[0], None)[0], Variant)


def test_audit_rejects_bad_arguments(capsys):
    assert main(["audit-verifier", "no-such-task", "--limit", "2"]) == 2
    assert main(["audit-verifier", "gsm8k", "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert "no-such-task" in err and "--limit" in err


@pytest.mark.slow
@pytest.mark.parametrize("task", ["gsm8k", "math500", "countdown-hf", "countdown-tinyzero", "aime2024"])
def test_full_audit(task, tmp_path):
    out = tmp_path / "audit.json"
    assert main(["audit-verifier", task, "--json", str(out)]) == 0
    assert all(v["wrong"] == 0 for v in json.loads(out.read_text())["variants"].values())

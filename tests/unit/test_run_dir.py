"""The run directory (`r1lab.metrics.run.RunDir`): metrics survive kills, checkpoints publish atomically.

A resume reads only this directory, so the tests play the failures a run meets: a line torn by a
kill, a checkpoint writer that dies half way, leftovers of a killed writer, and NaN losses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from r1lab.metrics.run import RunDir, atomic_write_text


def write_weights(text: str):
    """A checkpoint writer that leaves two files, like a model dir plus trainer state."""

    def write(d: Path) -> None:
        (d / "model.safetensors").write_text(text, encoding="utf-8")
        (d / "trainer_state.pt").write_text("state", encoding="utf-8")

    return write


def leftovers(run: RunDir) -> list[str]:
    return sorted(p.name for p in run.checkpoints_dir.iterdir() if p.name.startswith("."))


def test_creating_makes_the_layout(tmp_path):
    run = RunDir(tmp_path / "a" / "run")
    assert run.samples_dir.is_dir() and run.checkpoints_dir.is_dir()
    assert run.read_metrics() == [] and run.latest_checkpoint() is None
    RunDir(run.path)  # opening an existing directory again is fine


# --------------------------------------------------------------------------- metrics


def test_log_and_read_round_trip(tmp_path):
    run = RunDir(tmp_path)
    rows = [{"step": 1, "loss": 0.5, "tag": "a"}, {"step": 2, "loss": 0.25, "tag": "b"}]
    for r in rows:
        run.log(r)
    assert run.read_metrics() == rows
    assert len(run.metrics_path.read_text().splitlines()) == 2  # one JSON object per line


def test_non_finite_values_are_logged_as_null(tmp_path):
    run = RunDir(tmp_path)
    run.log({"step": 1, "loss": math.nan, "kl": math.inf, "neg": -math.inf, "ok": 1.5})
    text = run.metrics_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 1, "loss": None, "kl": None, "neg": None, "ok": 1.5}


def test_a_torn_last_line_is_skipped(tmp_path):
    run = RunDir(tmp_path)
    run.log({"step": 1, "loss": 0.5})
    run.log({"step": 2, "loss": 0.4})
    with open(run.metrics_path, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_truncate_keeps_steps_up_to_the_checkpoint_and_repairs_a_torn_line(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 6):
        run.log({"step": step})
    with open(run.metrics_path, "a", encoding="utf-8") as f:
        f.write('{"step": 6')
    run.truncate_metrics(3)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    run.log({"step": 4, "again": True})  # the resumed run re-logs the steps it redoes
    assert run.read_metrics()[-1] == {"step": 4, "again": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_record_logged_after_a_torn_line_is_kept(tmp_path):
    run = RunDir(tmp_path)
    run.log({"step": 1})
    with open(run.metrics_path, "a", encoding="utf-8") as f:
        f.write('{"step": 2, "lo')
    run.log({"step": 2, "loss": 0.1})
    assert run.read_metrics() == [{"step": 1}, {"step": 2, "loss": 0.1}]


def test_write_json_round_trips(tmp_path):
    run = RunDir(tmp_path)
    path = run.write_json("summary.json", {"a": 1, "nested": {"b": [1, 2]}})
    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text()) == {"a": 1, "nested": {"b": [1, 2]}}


def test_write_json_writes_non_finite_values_as_null(tmp_path):
    run = RunDir(tmp_path)
    path = run.write_json("summary.json", {"loss": math.nan, "nested": {"kl": math.inf}})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) == {
        "loss": None,
        "nested": {"kl": None},
    }


def test_write_samples_one_row_per_line(tmp_path):
    run = RunDir(tmp_path)
    path = run.write_samples("step_3", [{"text": "wait, é"}, {"text": "8"}])
    assert path == run.samples_dir / "step_3.jsonl"
    assert [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] == [
        {"text": "wait, é"},
        {"text": "8"},
    ]


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "latest"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


# --------------------------------------------------------------------------- checkpoints


def test_save_checkpoint_publishes_and_updates_latest(tmp_path):
    run = RunDir(tmp_path)
    path = run.save_checkpoint(10, write_weights("w10"))
    assert path == run.checkpoints_dir / "step_10"
    assert (path / "model.safetensors").read_text() == "w10"
    assert (run.checkpoints_dir / "latest").read_text().strip() == "step_10"
    assert run.latest_checkpoint() == path
    assert leftovers(run) == []


def test_nothing_is_visible_until_the_writer_returns(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(1, write_weights("w1"))
    seen = {}

    def write(d: Path) -> None:
        seen["final exists"] = (run.checkpoints_dir / "step_2").exists()
        seen["latest"] = run.latest_checkpoint()
        seen["inside checkpoints"] = d.parent == run.checkpoints_dir  # same filesystem: rename is atomic
        write_weights("w2")(d)

    run.save_checkpoint(2, write)
    assert seen == {
        "final exists": False,
        "latest": run.checkpoints_dir / "step_1",
        "inside checkpoints": True,
    }
    assert run.latest_checkpoint() == run.checkpoints_dir / "step_2"


def test_a_failing_writer_leaves_the_previous_latest_and_no_temp_dir(tmp_path):
    run = RunDir(tmp_path)
    good = run.save_checkpoint(1, write_weights("w1"))

    def crash(d: Path) -> None:
        (d / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint(2, crash)
    assert run.latest_checkpoint() == good
    assert (good / "model.safetensors").read_text() == "w1"
    assert not (run.checkpoints_dir / "step_2").exists()
    assert leftovers(run) == []


def test_a_failing_rewrite_of_an_existing_step_keeps_it(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(5, write_weights("first"))

    def crash(d: Path) -> None:
        raise KeyboardInterrupt  # Ctrl-C mid-save is a BaseException, cleaned up too

    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(5, crash)
    assert (run.latest_checkpoint() / "model.safetensors").read_text() == "first"
    assert leftovers(run) == []


def test_saving_the_same_step_again_replaces_it(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(5, write_weights("first"))
    run.save_checkpoint(5, write_weights("second"))
    assert (run.latest_checkpoint() / "model.safetensors").read_text() == "second"


def test_pruning_keeps_the_newest_by_step_number(tmp_path):
    run = RunDir(tmp_path)
    for step in (8, 9, 10, 11):  # step_10 sorts before step_8 as text; pruning must sort by number
        run.save_checkpoint(step, write_weights(f"w{step}"), keep_last=2)
    names = sorted(p.name for p in run.checkpoints_dir.iterdir())
    assert names == ["latest", "step_10", "step_11"]
    assert run.latest_checkpoint().name == "step_11"


def test_pruning_never_removes_latest(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(20, write_weights("w20"), keep_last=1)
    # a resumed run that saves an older step than an existing one: that older step is `latest`
    run.save_checkpoint(15, write_weights("w15"), keep_last=1)
    assert run.latest_checkpoint().name == "step_15"


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_save(tmp_path):
    run = RunDir(tmp_path)
    stale = run.checkpoints_dir / ".tmp_step_3_999_123"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    run.save_checkpoint(4, write_weights("w4"))
    assert leftovers(run) == []


def test_latest_pointing_at_a_missing_dir_is_no_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    (run.checkpoints_dir / "latest").write_text("step_7\n")
    assert run.latest_checkpoint() is None

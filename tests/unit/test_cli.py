"""The `r1lab` command (`r1lab.cli`): every command answers --help, user errors are one line.

In process through `main(argv)` (the `run_cli` fixture), and once through the installed console
script in a subprocess, because a traceback is what a user sees when the entry point is wrong.
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from r1lab.cli import COMMANDS


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def test_top_level_help_lists_every_command(run_cli):
    status, out, _ = run_cli(["--help"])
    assert status == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS)
    for name, (_, helptext) in COMMANDS.items():
        assert helptext in out, name


def test_no_arguments_prints_help_and_fails(run_cli):
    status, out, _ = run_cli([])
    assert status == 2 and "commands:" in out


def test_version(run_cli):
    from r1lab import __version__

    status, out, _ = run_cli(["--version"])
    assert (status, out.strip()) == (0, f"r1lab {__version__}")


def test_unknown_command_exits_2(run_cli):
    status, out, err = run_cli(["bogus"])
    assert status == 2 and out == ""
    assert err.strip() == "r1lab: unknown command 'bogus'; run `r1lab --help` for the list"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help(run_cli, name):
    status, out, err = run_cli([name, "--help"])
    if module_exists(COMMANDS[name][0]):
        assert status == 0, err
        assert out.startswith(f"usage: r1lab {name}")
        assert COMMANDS[name][1] in " ".join(out.split())  # argparse re-wraps the description
    else:
        assert (status, err.strip()) == (1, f"r1lab {name}: not yet available")


def test_user_error_is_one_line_with_status_2(run_cli):
    status, out, err = run_cli(["grpo", "nope.yaml"])
    assert status == 2
    assert err.splitlines() == ["r1lab grpo: error: nope.yaml: no such recipe file"]


def test_bad_override_is_one_line_naming_the_field(run_cli, repo_root):
    recipe = repo_root / "recipes" / "grpo-arithmetic.yaml"
    status, _, err = run_cli(["grpo", str(recipe), "rl.bogus=1"])
    assert status == 2
    (line,) = err.splitlines()
    assert line.startswith("r1lab grpo: error: ") and "'rl.bogus'" in line and "unknown key" in line


def test_unknown_option_is_an_argparse_error(run_cli):
    status, _, err = run_cli(["grpo", "--no-such-flag"])
    assert status == 2 and "unrecognized arguments" in err


def test_entry_point_prints_user_errors_without_a_traceback(r1lab_exe, tmp_path):
    # `sft`, not `grpo`: r1lab.rl.commands imports the trainer (torch, ~10 CPU-seconds) before it
    # reads the recipe, too slow for a unit test; the in-process test above covers grpo.
    for argv, expected in (
        (["sft", "nope.yaml"], "r1lab sft: error: nope.yaml"),
        (["bogus"], "r1lab: unknown command 'bogus'"),
    ):
        proc = subprocess.run(
            [str(r1lab_exe), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr


def test_entry_point_help(r1lab_exe):
    proc = subprocess.run([str(r1lab_exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert all(name in proc.stdout for name in COMMANDS)


def test_flags_may_come_after_the_overrides(run_cli, repo_root):
    """`r1lab grpo RECIPE --resume rl.bogus=1` and `... rl.bogus=1 --resume` read the same: the override
    reaches the config (and is refused there by name) wherever the flag stands."""
    recipe = str(repo_root / "recipes" / "grpo-arithmetic.yaml")
    for argv in (["grpo", recipe, "--resume", "rl.bogus=1"], ["grpo", recipe, "rl.bogus=1", "--resume"]):
        status, _, err = run_cli(argv)
        assert status == 2 and "'rl.bogus'" in err and "unrecognized" not in err

"""The code reward and its sandbox: right programs score 1, wrong ones 0, hostile ones are contained.

Every hostile program runs with small limits so the file stays fast; afterwards no process of the
sandbox user may be left alive and the test process must not have grown. The layer-by-layer matrix
(each containment layer alone) is in tests/integration/test_sandbox_hostile.py.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1lab.rewards import sandbox
from r1lab.rewards.code import code_reward, extract_program, fenced_blocks, parse_tests
from r1lab.rewards.sandbox import Limits, run_python
from r1lab.tasks.base import Problem, TaskError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

SMALL = Limits(wall_s=1.0, cpu_s=1.0, memory_mb=128, max_procs=16, output_bytes=20_000, file_bytes=1_000_000)
ROOMY = Limits(wall_s=10.0, memory_mb=128)  # for programs that should pass, even on a loaded machine
MEMORY = Limits(wall_s=5.0, memory_mb=64)  # filling 64 MiB can take a second when the box is busy
HOSTILE = dataclasses.replace(SMALL, wall_s=5.0)  # hostile programs that end on their own, quickly
SQUARE_TESTS = [{"input": f"{n}\n", "output": f"{n * n}\n"} for n in (2, 3, 5, 7)]
ONE_TEST = [{"input": "", "output": "4"}]  # hostile programs need one run to show they score 0


def problem(tests) -> Problem:
    return Problem("p1", [{"role": "user", "content": "solve"}], "", {"verifier": "code", "tests": tests})


def completion(code: str) -> str:
    return f"<think>let me write it</think>\nHere it is:\n```python\n{code}\n```\n"


def live_processes(uid: int) -> list[int]:
    """Pids of live (not zombie) processes owned by `uid`."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(ln.split(":", 1) for ln in status.read_text().splitlines() if ":" in ln)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith(
            "Z"
        ):
            pids.append(int(status.parent.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def contained():
    """After a hostile run: nothing of the sandbox user survives, no cgroup is left, we did not grow."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    yield
    lay = sandbox.layers()
    if lay.uid is not None:
        deadline = time.monotonic() + 3.0  # another test session may be running a sandbox right now
        while live_processes(lay.uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_processes(lay.uid) == []
    if lay.cgroup:
        assert not list(Path(lay.cgroup).glob(f"r1lab-sbx-{os.getpid()}-*"))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024
    assert subprocess.run(["true"]).returncode == 0  # the machine can still start processes


# --------------------------------------------------------------------------- grading


def test_stdin_stdout_solution_scores_one():
    r = code_reward(completion("n = int(input())\nprint(n * n)"), problem(SQUARE_TESTS), ROOMY)
    assert r.score == 1.0
    assert r.parts == {"accuracy": 1.0, "pass_rate": 1.0, "format": 1.0}
    assert r.answer == "n = int(input())\nprint(n * n)"


def test_assert_solution_scores_one():
    tests = [{"assert": "assert f(2) == 4"}, {"assert": "assert f(-3) == 9"}]
    assert code_reward(completion("def f(x):\n    return x * x"), problem(tests), ROOMY).score == 1.0


def test_wrong_solution_scores_zero():
    r = code_reward(completion("print(int(input()) + 1)"), problem(SQUARE_TESTS), ROOMY)
    assert r.score == 0.0 and r.parts["accuracy"] == 0.0


def test_partial_solution_scores_the_fraction_passed():
    code = "n = int(input())\nprint(n * n if n < 5 else 0)"
    r = code_reward(completion(code), problem(SQUARE_TESTS), ROOMY)
    assert r.score == 0.5 and r.parts["pass_rate"] == 0.5 and r.parts["accuracy"] == 0.0
    failing_assert = [{"assert": "assert f(2) == 4"}, {"assert": "assert f(3) == 10"}]
    assert code_reward(completion("def f(x):\n    return x * x"), problem(failing_assert), ROOMY).score == 0.5


def test_output_is_compared_line_by_line_stripped():
    tests = [{"input": "", "output": "1 2\n3\n"}]
    assert code_reward(completion("print(' 1 2  ')\nprint('3')\nprint()"), problem(tests), ROOMY).score == 1.0
    assert code_reward(completion("print('1 2 3')"), problem(tests), ROOMY).score == 0.0


def test_no_program_scores_zero_and_code_in_the_reasoning_does_not_count():
    good = "```python\nprint(int(input()) ** 2)\n```"
    assert code_reward(f"<think>{good}</think> I am done.", problem(SQUARE_TESTS), ROOMY).score == 0.0
    assert code_reward(f"<think>{good}", problem(SQUARE_TESTS), ROOMY).score == 0.0  # never closed
    r = code_reward(f"no think tags\n{good}", problem(SQUARE_TESTS), ROOMY)
    assert r.score == 1.0 and r.parts["format"] == 0.0


def test_extraction_prefers_the_last_python_block():
    text = "```python\nprint(1)\n```\n```python\nprint(2)\n```\n```text\noutput\n```"
    assert extract_program(text) == "print(2)"
    assert extract_program("```\nprint(3)\n```") == "print(3)"
    assert extract_program("```python\nprint(4)\n```\n```python\ntruncated") == "print(4)"
    assert extract_program("```python\n\n```") is None
    assert fenced_blocks("```Python title\nx\n```") == [("python", "x")]


@pytest.mark.parametrize(
    "tests",
    [
        None,
        [],
        "tests",
        [{"input": "1"}],
        [{"output": "1", "assert": "assert 1"}],
        [{"input": 1, "output": "1"}],
    ],
)
def test_malformed_tests_raise_a_task_error_naming_the_problem(tests):
    with pytest.raises(TaskError, match="problem 'p1': meta.tests"):
        parse_tests(problem(tests))


def test_a_timeout_ends_grading_early(contained):
    tests = [{"input": "", "output": "1"}] * 5
    start = time.monotonic()
    r = code_reward(completion("while True:\n    pass"), problem(tests), SMALL)
    assert r.score == 0.0
    assert time.monotonic() - start < 3 * SMALL.wall_s  # one timeout, not five


def test_run_python_reports_status_and_output():
    r = run_python("import sys\nprint(input()[::-1])\nsys.exit(3)", stdin="abc\n", limits=ROOMY)
    assert (r.status, r.stdout, r.returncode) == ("error", "cba\n", 3)
    assert run_python("raise ValueError('boom')", limits=ROOMY).stderr.rstrip().endswith("ValueError: boom")


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)


# --------------------------------------------------------------------------- hostile programs


def test_infinite_loop_is_stopped(contained):
    r = run_python("while True:\n    pass", limits=SMALL)
    assert r.status == "timeout" and r.wall_s < SMALL.wall_s + 1.0
    r = run_python("import time\ntime.sleep(60)", limits=SMALL)  # sleeping burns no CPU: the wall limit
    assert r.status == "timeout" and r.wall_s < SMALL.wall_s + 1.0
    assert code_reward(completion("while True:\n    pass"), problem(ONE_TEST), SMALL).score == 0.0


FORK_BOMB = """
import os
print(os.getpid(), flush=True)
while True:
    try:
        if os.fork() == 0:
            print(os.getpid(), flush=True)
    except OSError:
        pass
"""


def test_fork_bomb_is_contained_by_the_operating_system(contained):
    lay = sandbox.layers()
    if lay.cgroup is None and lay.uid is None:
        pytest.skip("no pids cgroup and no unprivileged uid here: only the audit hook stops fork()")
    r = run_python(FORK_BOMB, limits=SMALL, guard=False)
    pids = [int(p) for p in r.stdout.split()]
    assert r.status == "timeout" and 1 <= len(pids) <= SMALL.max_procs
    assert not [p for p in pids if alive(p)]


def test_fork_bomb_scores_zero(contained):
    assert code_reward(completion(FORK_BOMB), problem(ONE_TEST), SMALL).score == 0.0


@pytest.mark.parametrize("bomb", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_memory_bomb_fails_its_allocation(bomb, contained):
    r = run_python(bomb, limits=MEMORY)
    assert r.status == "memory" and r.wall_s < MEMORY.wall_s
    assert code_reward(completion(bomb), problem(ONE_TEST), MEMORY).score == 0.0


def test_writing_outside_its_directory_creates_nothing(tmp_path, contained):
    target = tmp_path / "pwned"
    code = f"open({str(target)!r}, 'w').write('x')\nprint(4)"
    assert code_reward(completion(code), problem(ONE_TEST), HOSTILE).score == 0.0
    assert not target.exists()
    r = run_python(f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))", limits=HOSTILE)
    assert r.status == "error" and not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_writing_inside_its_directory_works():
    r = run_python("open('f.txt', 'w').write('hi')\nprint(open('f.txt').read())", limits=ROOMY)
    assert (r.status, r.stdout) == ("ok", "hi\n")


def test_network_connection_never_reaches_our_listener(contained):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint(4)"
        assert code_reward(completion(code), problem(ONE_TEST), HOSTILE).score == 0.0
        with pytest.raises(TimeoutError):
            server.accept()


def test_parent_environment_is_not_visible(monkeypatch, contained):
    secret = "r1lab-secret-7f3a9c"
    monkeypatch.setenv("R1LAB_SECRET", secret)
    code = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in (os.getppid(), 1):\n"
        "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
        "    except OSError as e:\n        print('refused', e)\n"
    )
    r = run_python(code, limits=ROOMY)
    assert r.status == "ok" and "refused" in r.stdout
    assert secret not in r.stdout + r.stderr
    assert "R1LAB_SECRET" not in r.stdout + r.stderr


@pytest.mark.parametrize("stream", ["print('x' * 1000)", "import sys\nsys.stderr.write('y' * 1000)"])
def test_huge_output_is_cut_at_the_cap(stream, contained):
    r = run_python(f"while True:\n    {stream.replace(chr(10), chr(10) + '    ')}", limits=HOSTILE)
    assert r.status == "output_limit"
    assert len(r.stdout) + len(r.stderr) <= HOSTILE.output_bytes
    assert r.wall_s < HOSTILE.wall_s
    code = "while True:\n    print('4')"
    assert code_reward(completion(code), problem(ONE_TEST), HOSTILE).score == 0.0

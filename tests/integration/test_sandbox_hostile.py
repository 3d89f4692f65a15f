"""Each containment layer of the sandbox alone against hostile programs (root only: it switches layers).

Three configurations, each checked against the programs it is documented to contain:
  * "os": uid drop + namespaces + pids cgroup, without the audit hook (the operating system alone);
  * "uid": only the unprivileged uid and rlimits (what remains without namespaces and cgroups);
  * "hook": only the audit hook and rlimits, running as root (what a non-root user gets).
A case absent from a configuration's list is a documented hole of that configuration (e.g. the
network is open to "uid" alone); see the docstring of `r1lab.rewards.sandbox`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest

from r1lab.rewards import sandbox
from r1lab.rewards.sandbox import Limits, run_python

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="switching layers needs root"),
]

SMALL = Limits(wall_s=1.0, cpu_s=1.0, memory_mb=128, max_procs=16, output_bytes=20_000, file_bytes=1_000_000)

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
ESCAPEE = """
import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    time.sleep(30)
print(pid, flush=True)
"""
ENV_READER = """
import os
print(dict(os.environ))
try:
    print(open(f"/proc/{os.getppid()}/environ").read())
except OSError as e:
    print("refused", e)
"""


def configurations() -> dict[str, tuple[sandbox.Layers, bool]]:
    full = sandbox.layers()
    return {
        "os": (full, False),
        "uid": (dataclasses.replace(full, netns=False, mountns=False, cgroup=None), False),
        "hook": (
            dataclasses.replace(full, uid=None, gid=None, netns=False, mountns=False, cgroup=None),
            True,
        ),
    }


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(params=["os", "uid", "hook"])
def config(request, monkeypatch):
    layers, guard = configurations()[request.param]
    if request.param == "os" and not (layers.netns and layers.mountns and layers.cgroup):
        pytest.skip(f"not every operating-system layer works here: {layers}")
    monkeypatch.setattr(sandbox, "layers", lambda: layers)

    def run(source: str, **kw):
        return run_python(source, limits=kw.pop("limits", SMALL), guard=guard, **kw)

    run.name = request.param
    yield run
    time.sleep(0.05)


def test_loops_and_sleepers_are_stopped(config):
    for source in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        r = config(source)
        assert r.status == "timeout" and r.wall_s < SMALL.wall_s + 1.0


def test_memory_bombs_fail(config):
    roomy = dataclasses.replace(SMALL, wall_s=5.0, memory_mb=64)  # filling memory is slow on a busy box
    for source in ("x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"):
        assert config(source, limits=roomy).status == "memory"


def test_output_floods_are_cut(config):
    r = config("while True:\n    print('x' * 1000)")
    assert r.status == "output_limit" and len(r.stdout) <= SMALL.output_bytes


def test_environment_is_not_visible(config, monkeypatch):
    monkeypatch.setenv("R1LAB_SECRET", "r1lab-secret-1d2e")
    r = config(ENV_READER)
    assert "refused" in r.stdout or r.status == "error"
    assert "r1lab-secret-1d2e" not in r.stdout + r.stderr


def test_writes_outside_the_working_directory_are_refused(config, tmp_path):
    target = tmp_path / "pwned"
    config(f"open({str(target)!r}, 'w').write('x')")
    config(f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))")
    assert not target.exists()


def test_fork_bombs_are_bounded_and_killed(config):
    r = config(FORK_BOMB)
    pids = [int(p) for p in r.stdout.split()]
    bound = 4 * SMALL.max_procs if config.name == "uid" else SMALL.max_procs
    assert len(pids) <= bound
    time.sleep(0.05)
    assert not [p for p in pids if alive(p)]


def test_network_is_closed(config):
    if config.name == "uid":
        pytest.skip("documented hole: without a network namespace or the hook, sockets work")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        r = config(
            f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1)"
        )
        assert r.status == "error"
        with pytest.raises(TimeoutError):
            server.accept()


def test_a_process_that_leaves_the_session_is_still_killed(config):
    r = config(ESCAPEE)  # without a cgroup it is found by the stdout/stderr pipe it still holds
    pids = [int(p) for p in r.stdout.split()]
    time.sleep(0.05)
    assert not [p for p in pids if p > 0 and alive(p)]

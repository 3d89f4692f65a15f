"""Run untrusted Python (a model's program) in a contained subprocess: `run_python(source, stdin, limits)`.

Code rewards execute whatever the policy wrote, thousands of times per RL run: a program that
loops, forks, allocates, floods stdout, writes files, phones home or reads our secrets must be
contained and scored 0 while the trainer stays healthy. Containment is layered; `layers()` says
which layers this machine allows (measured once per process).

Always (any user):
  * `python -I -S -B` (no user site, no PYTHON* variables, no site-packages) with an environment
    of only PATH/HOME/TMPDIR/LANG: the parent's variables are not visible;
  * rlimits set in the child before exec: CPU (SIGXCPU; SIGKILL a second later), AS (allocations
    fail with MemoryError), FSIZE (per file), CORE=0, NOFILE, NPROC;
  * a new session, SIGKILLed with all of the run's processes when the program exits, overruns
    `wall_s` (enforced by the parent) or writes more than `output_bytes` (pipes are read
    incrementally; the parent never keeps more than the cap);
  * `guard=True`: an audit hook (PEP 578) refuses sockets, subprocesses, fork/exec/kill, ctypes,
    writes/renames/deletes outside the working directory and reading other processes' /proc.
    Audit hooks are not a security boundary; this is defence in depth with legible refusals.
As root (the usual training container or VM):
  * the program runs as `nobody` with no groups: it cannot write our files, read
    /proc/<pid>/environ of our processes or signal them, and RLIMIT_NPROC (ignored for root) counts;
  * new network and IPC namespaces: only a down loopback, no connection even to 127.0.0.1;
  * a new mount namespace with a private tmpfs of `file_bytes` on /tmp, also bound on /dev/shm,
    /var/tmp and /run/lock: the working directory, a quota on all it can write, gone with it;
  * a per-run pids cgroup (v1, or v2 with pids delegated): at most `max_procs` processes and
    threads - what contains a fork bomb - and the list of every process of the run for the
    final kill, including any that left the session with setsid().
What is lost without a layer: without the cgroup, RLIMIT_NPROC is per uid (shared by concurrent
runs, counting killed processes until init reaps them: about a second here), so it is set to
4 x `max_procs`; the run's processes are then found for the final kill by the stdout/stderr pipes
they inherited, and one that closes both and calls setsid() escapes (RLIMIT_CPU still ends a busy
one). Without the mount namespace the working directory is a host temp dir and only FSIZE bounds
writes. Root in a default Docker container has the uid layer only (namespaces need CAP_SYS_ADMIN,
cgroupfs is read-only): the network is then closed only by the hook. Without root nothing of this
paragraph applies: the hook stops writes, sockets and fork, and NPROC is our user's current
process count plus `max_procs`.

The child's interpreter is $R1LAB_SANDBOX_PYTHON if set, else the first of ours and the system
`python3` that the sandbox user can start (a venv under /root is unreadable to
`nobody`); the program gets the standard library only.

    >>> run_python("print(input()[::-1])", stdin="abc\\n").stdout
    'cba\\n'
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import pwd
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "output_limit", "killed"]

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
_SANDBOX_HOME = "/tmp"  # the working directory inside the mount namespace (a private tmpfs)
_SCRATCH_DIRS = ("/dev/shm", "/var/tmp", "/run/lock")  # world-writable directories besides /tmp
_MAIN = "main.py"  # the program's file name, relative to its working directory
_libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: the child only makes syscalls
_run_ids = itertools.count()


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (no usable interpreter, a containment layer failed to apply)."""


@dataclass(frozen=True)
class Limits:
    """What one run may use; every limit ends the run (or fails the allocation) when reached."""

    wall_s: float = 5.0  # wall-clock seconds, enforced by the parent
    cpu_s: float = 4.0  # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 256  # address space per process (RLIMIT_AS)
    max_procs: int = 16  # processes + threads at once (pids cgroup; RLIMIT_NPROC)
    output_bytes: int = 64_000  # stdout + stderr together
    file_bytes: int = 8_000_000  # private tmpfs size when available; always the per-file cap

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_procs", "output_bytes", "file_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunResult:
    """How a run ended: `returncode` is the main process's exit status, negative for a signal."""

    status: Status
    stdout: str
    stderr: str
    returncode: int
    wall_s: float


@dataclass(frozen=True)
class Layers:
    """Which containment layers this machine allows (measured once per process by `layers()`)."""

    uid: int | None  # the unprivileged uid the child runs as; None: our own user
    gid: int | None
    netns: bool  # new network namespace
    mountns: bool  # new mount namespace with a private tmpfs working directory
    cgroup: str | None  # directory in which per-run pids cgroups are created; None: unavailable


# --------------------------------------------------------------------------- child side (after fork)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write_new(path: str, data: bytes, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | flags, 0o644)  # in the child: if this fails, the child dies
    os.write(fd, data)
    os.close(fd)


def _mount_private_tmp(options: bytes, source: bytes) -> None:
    # Make every mount private first so the tmpfs never propagates back into the parent's namespace.
    _check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    _check(_libc.mount(b"tmpfs", b"/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV, options), "mount tmpfs /tmp")
    for scratch in _SCRATCH_DIRS:  # the other places `nobody` may write: the same private tmpfs
        if os.path.isdir(scratch):
            _check(_libc.mount(b"/tmp", scratch.encode(), None, _MS_BIND, None), f"bind {scratch}")
    _write_new(f"{_SANDBOX_HOME}/{_MAIN}", source, os.O_CREAT | os.O_EXCL)
    os.chdir(_SANDBOX_HOME)


def _run_as(uid: int | None, gid: int | None) -> None:
    if uid is not None and gid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def _child_setup(
    cgroup_procs: str | None,
    unshare_flags: int,
    tmpfs_options: bytes | None,
    source: bytes,
    rlimits: tuple[tuple[int, int, int], ...],
    uid: int | None,
    gid: int | None,
) -> None:
    """preexec_fn: runs in the forked child before exec. Any failure aborts the run (fails closed).

    Everything is computed by the parent so that the child only makes syscalls. With a mount
    namespace the program's source is written here, into the new tmpfs the parent cannot see.
    """
    if cgroup_procs:
        _write_new(cgroup_procs, str(os.getpid()).encode())
    if unshare_flags:
        _check(_libc.unshare(unshare_flags), "unshare")
    if tmpfs_options is not None:
        _mount_private_tmp(tmpfs_options, source)
    for res, soft, hard in rlimits:
        resource.setrlimit(res, (soft, hard))
    _run_as(uid, gid)


# --------------------------------------------------------------------------- layer detection


def _works_in_child(fn) -> bool:
    """Whether `fn()` succeeds in a forked child (namespaces and mounts are per process: try, discard)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _pids_cgroup_dir() -> str | None:
    """Our own cgroup in a hierarchy with the pids controller, if we may create children in it."""
    try:
        own = [ln.split(":", 2) for ln in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = [ln.split() for ln in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return None
    for hid, controllers, path in own:
        for _, where, fstype, options, *_ in mounts:
            v1 = fstype == "cgroup" and "pids" in controllers.split(",") and "pids" in options.split(",")
            if v1 or (hid == "0" and fstype == "cgroup2"):
                probe = Path(where + path.rstrip("/")) / f"r1lab-probe-{os.getpid()}"
                try:
                    probe.mkdir()
                except OSError:
                    continue
                works = (probe / "pids.max").exists()  # v2: only if pids is delegated to our children
                probe.rmdir()
                if works:
                    return str(probe.parent)
    return None


@functools.lru_cache(maxsize=1)
def layers() -> Layers:
    """Measure which containment layers work here (cached; a few forks, tens of milliseconds)."""
    if os.geteuid() != 0:
        return Layers(uid=None, gid=None, netns=False, mountns=False, cgroup=None)
    uid, gid = 65534, 65534  # nobody's conventional ids, for images without a passwd entry
    with contextlib.suppress(KeyError):
        uid, gid = pwd.getpwnam("nobody")[2:4]
    netns = _works_in_child(lambda: _check(_libc.unshare(_CLONE_NEWNET | _CLONE_NEWIPC), "unshare"))

    def try_mount() -> None:
        _check(_libc.unshare(_CLONE_NEWNS), "unshare")
        _mount_private_tmp(b"size=65536,mode=0700", b"")

    mountns = _works_in_child(try_mount)
    return Layers(uid=uid, gid=gid, netns=netns, mountns=mountns, cgroup=_pids_cgroup_dir())


@functools.lru_cache(maxsize=4)
def sandbox_python(uid: int | None, gid: int | None) -> str:
    """The interpreter `uid` can start: $R1LAB_SANDBOX_PYTHON, else ours, else the system python3."""
    wanted = os.environ.get("R1LAB_SANDBOX_PYTHON")
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    candidates = [wanted] if wanted else [sys.executable, getattr(sys, "_base_executable", None), system]
    for cand in dict.fromkeys(c for c in candidates if c):
        try:
            setup = functools.partial(_run_as, uid, gid)
            argv = [cand, "-I", "-S", "-c", "import json, math, collections"]
            probe = subprocess.run(argv, env={}, cwd="/", capture_output=True, timeout=30, preexec_fn=setup)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return cand
    raise SandboxError(f"no Python that uid {uid} can start among {candidates}: set R1LAB_SANDBOX_PYTHON")


# Runs in the child as `python -I -S -B -c _BOOTSTRAP guard|noguard`: reads main.py, installs the
# hook, runs the program as __main__. The hook has no closures and keeps everything it uses in
# default arguments, and rebinding _path's (reachable from a traceback) is refused, so a program
# cannot change what it checks by monkeypatching os.path or editing the functions.
_BOOTSTRAP = r"""
import os, sys
_src = open("main.py", encoding="utf-8", errors="replace").read()
def _path(p, realpath=os.path.realpath, fspath=os.fspath, fsdecode=os.fsdecode):
    return None if p is None or isinstance(p, int) else realpath(fsdecode(fspath(p)))
def _hook(event, args, path=_path, root=os.getcwd().rstrip("/") + "/", me=str(os.getpid()),
          write=os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
          denied=("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.forkpty", "os.kill", "ctypes.", "gc.get_"),
          one_path=("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime"),
          two_paths=("os.rename", "os.link", "os.symlink"), banned=("_ctypes", "_posixsubprocess"),
          rebinding=("__code__", "__defaults__", "__kwdefaults__"), guarded=(_path.__code__,)):
    if event.startswith(denied) or (event == "import" and args[0] in banned) or (event == "object.__setattr__"
            and args[1] in rebinding and getattr(args[0], "__code__", None) in guarded):
        raise PermissionError("sandbox: " + event + (" " + args[0] if event == "import" else "") + " is not allowed")
    if event == "open":
        target = path(args[0]) or ""
        if target.startswith("/proc/") and target.split("/")[2].isdigit() and target.split("/")[2] != me:
            raise PermissionError("sandbox: reading another process's /proc entries is not allowed")
        if not ((isinstance(args[2], int) and args[2] & write) or any(c in (args[1] or "") for c in "wax+")):
            return
        targets = [target]
    elif event in one_path or event in two_paths:
        targets = [path(a) for a in args[: 2 if event in two_paths else 1]]
    else:
        return
    for t in targets:
        if t and t != "/dev/null" and not (t + "/").startswith(root):
            raise PermissionError("sandbox: " + event + " outside the working directory is not allowed")
if sys.argv[1] == "guard":
    sys.addaudithook(_hook)
sys.argv = ["main.py"]
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "main.py"})
"""


# --------------------------------------------------------------------------- parent side


def _user_tasks(uid: int) -> int:
    """Processes + threads our user runs now (RLIMIT_NPROC counts them all when we cannot change uid)."""
    total = 0
    for tasks in Path("/proc").glob("[0-9]*/task"):
        with contextlib.suppress(OSError):  # the process exited meanwhile
            total += len(os.listdir(tasks)) if tasks.parent.stat().st_uid == uid else 0
    return total


def _rlimits(limits: Limits, lay: Layers) -> tuple[tuple[int, int, int], ...]:
    cpu = max(1, int(limits.cpu_s + 0.999))
    if lay.uid is None:
        nproc = _user_tasks(os.getuid()) + limits.max_procs
    elif lay.cgroup:
        # The cgroup is the exact per-run cap; this per-uid backstop is shared by concurrent runs.
        nproc = max(256, 16 * limits.max_procs)
    else:
        # Shared by concurrent runs, and killed processes count until init reaps them (about a
        # second here): headroom so that the next run can still start.
        nproc = 4 * limits.max_procs
    return (
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_AS, limits.memory_mb << 20, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, 64, 64),
        (resource.RLIMIT_NPROC, nproc, nproc),
    )


def _pipe_writers(pipes: frozenset[int]) -> list[int]:
    """Pids of processes (not us) holding a write end of one of these pipes (by inode).

    Without a cgroup this is how the run's processes are found, even those that left its process
    group: they all inherited stdout/stderr. Only write ends count, so a process that forked from
    ours and still holds copies of our read ends is never mistaken for one of them.
    """
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):  # the process exited, or is not ours to inspect
            for fd in os.scandir(fd_dir):
                link = os.readlink(fd.path)
                if link.startswith("pipe:[") and int(link[6:-1]) in pipes:
                    flags = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:", 1)[1].split()[0]
                    if int(flags, 8) & os.O_ACCMODE == os.O_WRONLY:
                        found.append(pid)
                        break
    return found


def _kill_tree(pgid: int, cgroup: Path | None, pipes: frozenset[int]) -> None:
    """SIGKILL the run's process group, then every process of the run until none is left.

    The run's processes are those in its cgroup, or without one, those writing to its pipes.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if cgroup is not None:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        else:
            pids = _pipe_writers(pipes)
        if not pids:
            return
        for pid in pids:  # a fork bomb refills slots as we kill; the loop ends once nothing is left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _remove_cgroup(cgroup: Path) -> None:
    for _ in range(200):  # killed processes leave the cgroup once reaped (by init, asynchronously)
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def _read_pipes(
    proc: subprocess.Popen, bufs: tuple[bytearray, bytearray], cap: int, deadline: float
) -> str | None:
    """Read stdout/stderr into `bufs` until the program exits (or, once it is dead, until EOF).

    Returns "timeout" if `deadline` passes first, "output_limit" as soon as more than `cap` bytes
    arrived in all (the parent never keeps more than `cap`), None otherwise.
    """
    running = proc.returncode is None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, 0)
    sel.register(proc.stderr, selectors.EVENT_READ, 1)
    pidfd = None
    if running:
        with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3; else poll every 20 ms
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, 2)  # readable when the main process exits
    try:
        while (proc.poll() is None) if running else len(sel.get_map()) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            for key, _ in sel.select(min(remaining, 0.02) if running and pidfd is None else remaining):
                if key.data == 2:
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                room = cap - len(bufs[0]) - len(bufs[1])
                bufs[key.data].extend(chunk[:room])
                if len(chunk) > room:
                    return "output_limit"
        return None
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)


def _status(why: str | None, returncode: int, stderr: str) -> Status:
    if why is not None or returncode == 0:
        return why or "ok"  # type: ignore[return-value]
    if returncode == -signal.SIGXCPU:
        return "timeout"
    if stderr.rstrip().rsplit("\n", 1)[-1].startswith("MemoryError"):
        return "memory"
    return "killed" if returncode < 0 else "error"


def run_python(source: str, stdin: str = "", limits: Limits = Limits(), guard: bool = True) -> RunResult:
    """Run `source` as a Python program with `stdin`, contained as the module docstring describes.

    `guard=False` leaves out the audit hook (tests use it to check the operating-system layers alone).
    """
    lay = layers()
    interpreter = sandbox_python(lay.uid, lay.gid)
    cgroup = Path(lay.cgroup, f"r1lab-sbx-{os.getpid()}-{next(_run_ids)}") if lay.cgroup else None
    workdir = None
    try:
        if cgroup is not None:
            cgroup.mkdir()
            (cgroup / "pids.max").write_text(str(limits.max_procs))
        if not lay.mountns:  # fallback: a host temp dir, owned by the sandbox user when there is one
            workdir = tempfile.mkdtemp(prefix="r1lab-sbx-")
            Path(workdir, _MAIN).write_text(source, encoding="utf-8")
            if lay.uid is not None:
                os.chown(workdir, lay.uid, lay.gid)
        home = workdir or _SANDBOX_HOME
        setup = functools.partial(
            _child_setup,
            str(cgroup / "cgroup.procs") if cgroup else None,
            (_CLONE_NEWNET | _CLONE_NEWIPC if lay.netns else 0) | (_CLONE_NEWNS if lay.mountns else 0),
            f"size={limits.file_bytes},mode=0700,uid={lay.uid},gid={lay.gid}".encode()
            if lay.mountns
            else None,
            source.encode("utf-8", errors="replace"),
            _rlimits(limits, lay),
            lay.uid,
            lay.gid,
        )
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [interpreter, "-I", "-S", "-B", "-c", _BOOTSTRAP, "guard" if guard else "noguard"],
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir or "/",
                    env=env,
                    start_new_session=True,
                    preexec_fn=setup,
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise SandboxError(f"cannot start the sandboxed program: {e}") from e
            with proc:
                bufs = (bytearray(), bytearray())
                why = _read_pipes(proc, bufs, limits.output_bytes, start + limits.wall_s)
                pipes = frozenset(os.fstat(p.fileno()).st_ino for p in (proc.stdout, proc.stderr))
                _kill_tree(proc.pid, cgroup, pipes)  # background processes die with the program
                returncode = proc.wait()
                # What the dead left in the pipes; bounded in time in case a process escaped the kill.
                _read_pipes(proc, bufs, limits.output_bytes, time.monotonic() + 2.0)
            wall = time.monotonic() - start
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    stdout, stderr = (b.decode("utf-8", errors="replace") for b in bufs)
    return RunResult(_status(why, returncode, stderr), stdout, stderr, returncode, round(wall, 4))

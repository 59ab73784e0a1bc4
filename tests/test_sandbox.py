"""rl.sandbox: output capture, limits (time, CPU, memory, processes, file size), network and
filesystem guards, clean-up. Every hostile program here is contained by the sandbox's own limits."""

from __future__ import annotations

import os
import select
import socket
import sys
import tempfile
import time

import pytest

from rl import sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's guarantees are tested on Linux")


@pytest.fixture
def sbx_root(tmp_path, monkeypatch):
    """Sandbox directories go under a private folder, so the tests can see what is left behind."""
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _procs_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (sandboxed ones carry their directory)."""
    found = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if p.isdigit() and text.encode() in f.read():
                    found.append(int(p))
        except OSError:
            pass
    return found


def _assert_clean(root) -> None:
    assert _procs_mentioning(str(root)) == [], "sandboxed processes outlived run_code"
    assert os.listdir(root) == [], "sandbox directory not removed"


def test_output_exit_code_and_stdin(sbx_root):
    r = sandbox.run_code("import sys\nprint('out', input())\nprint('err', file=sys.stderr)\nexit(3)", stdin="hi\n")
    assert (r.returncode, r.stdout, r.stderr, r.timed_out, r.killed_by) == (3, "out hi\n", "err\n", False, None)
    assert not r.ok
    r = sandbox.run_code("import sys\nsys.stdout = open('/dev/stdout', 'w')\nprint(sum(range(10)))")
    assert r.ok and r.stdout == "45\n"
    _assert_clean(sbx_root)


def test_signal_death_is_reported():
    r = sandbox.run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (r.returncode, r.killed_by, r.ok) == (-9, "SIGKILL", False)


def test_infinite_loop_hits_wall_timeout(sbx_root):
    t = time.monotonic()
    r = sandbox.run_code("while True: pass", timeout_s=1.0, cpu_s=30)
    assert r.timed_out and r.returncode is None and r.killed_by == "SIGKILL" and not r.ok
    assert time.monotonic() - t < 3.0
    _assert_clean(sbx_root)


def test_busy_loop_hits_cpu_limit():
    t = time.monotonic()
    r = sandbox.run_code("while True: pass", timeout_s=30, cpu_s=1)
    assert not r.timed_out and r.killed_by in ("SIGXCPU", "SIGKILL") and not r.ok
    assert time.monotonic() - t < 10.0  # CPU seconds, so loose: a loaded machine stretches them


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10**10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(100 * 2**20))"],
    ids=["at-once", "gradual"],
)
def test_memory_bombs_fail(code, sbx_root):
    r = sandbox.run_code(code, memory_mb=256, timeout_s=10)
    assert not r.ok and not r.timed_out
    assert "MemoryError" in r.stderr or r.killed_by == "SIGKILL"
    assert sandbox.run_code("print(1)").stdout == "1\n"  # and life goes on
    _assert_clean(sbx_root)


def test_fork_bomb_is_contained_and_reaped(sbx_root):
    # Contained by pids.max (cgroup), RLIMIT_NPROC (non-root) or, with neither, refused forks.
    t = time.monotonic()
    r = sandbox.run_code("import os\nwhile True:\n    os.fork()", timeout_s=3, max_processes=16)
    assert not r.ok and time.monotonic() - t < 6.0
    _assert_clean(sbx_root)


def test_detached_children_are_killed_after_a_normal_exit(sbx_root):
    # New sessions escape the process group; the PID namespace / cgroup still catch them.
    code = "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
    r = sandbox.run_code(code, timeout_s=5)
    assert r.ok
    _assert_clean(sbx_root)


def test_network_is_refused():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        r = sandbox.run_code(code, timeout_s=5)
        assert not r.ok and "connected" not in r.stdout
        assert "PermissionError" in r.stderr  # the audit hook layer, whatever the namespaces
        assert select.select([listener], [], [], 0.2)[0] == [], "the listener saw a connection"
    finally:
        listener.close()
    if sandbox.isolation()["netns"]:  # the kernel layer: an empty network namespace
        r = sandbox.run_code("print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))")
        assert r.stdout == "['lo']\n"


def test_writes_outside_are_refused_inside_allowed(tmp_path, sbx_root):
    target = tmp_path / "outside.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
        f"import os; os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os; os.symlink({str(target)!r}, 'link'); open('link', 'w').write('x')",
        f"import os; open('f', 'w').write('x'); os.rename('f', {str(target)!r})",
        f"import shutil; shutil.copy('main.py', {str(target)!r})",
        f"import os; os.mkdir({str(target)!r})",
    ]
    code = "import os\nok = []\n"
    for a in attempts:
        code += f"try:\n    {a}\n    ok.append({a!r})\nexcept PermissionError:\n    pass\n"
    code += "open('/dev/null', 'w').write('x')\nopen('inside.txt', 'w').write('kept')\n"
    code += "print(ok, open('inside.txt').read(), os.getcwd())\n"
    r = sandbox.run_code(code)
    assert r.ok, r.stderr
    assert not target.exists()
    assert r.stdout.startswith("[] kept " + str(sbx_root))
    _assert_clean(sbx_root)


def test_file_size_limit():
    r = sandbox.run_code("open('big', 'wb').write(b'x' * (4 << 20))", file_size_mb=1)
    assert not r.ok and "File too large" in r.stderr


def test_exec_and_ctypes_are_refused():
    for code in ["import os; os.system('true')", "import subprocess; subprocess.run(['true'])", "import ctypes"]:
        r = sandbox.run_code(code)
        assert not r.ok and "PermissionError: sandbox" in r.stderr, code
    if sandbox.isolation()["seccomp"]:
        status = sandbox.run_code("print(open('/proc/self/status').read())").stdout
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="calls 3.11's private fork_exec directly")
def test_seccomp_blocks_exec_that_bypasses_the_audit_hooks(tmp_path):
    if not sandbox.isolation()["seccomp"]:
        pytest.skip("no seccomp here")
    target = tmp_path / "pwned"
    code = (
        "import os, subprocess\nr, w = os.pipe()\n"
        f"pid = subprocess._fork_exec([b'/bin/sh', b'-c', b'echo x > {target}'], [b'/bin/sh'], True, (w,), None,"
        " None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\n"
        "os.waitpid(pid, 0)\nos.close(w)\nprint(os.read(r, 100))\n"
    )
    r = sandbox.run_code(code)
    assert r.ok, r.stderr
    assert "OSError:1:" in r.stdout  # execve -> EPERM from the seccomp filter
    assert not target.exists()


def test_output_is_truncated():
    r = sandbox.run_code("print('x' * (3 << 20))")
    assert r.ok and len(r.stdout) < (1 << 20) + 100 and r.stdout.endswith("more bytes dropped]")


def test_run_many_keeps_order_and_per_item_options():
    codes = [f"print({i})" for i in range(5)] + ["while True: pass"]
    per_item = [{}] * 5 + [{"timeout_s": 0.5}]
    res = sandbox.run_many(codes, per_item=per_item, timeout_s=10, max_workers=3)
    assert [r.stdout for r in res[:5]] == [f"{i}\n" for i in range(5)]
    assert res[5].timed_out
    assert sandbox.run_many([]) == []
    with pytest.raises(ValueError, match="per_item"):
        sandbox.run_many(["pass"], per_item=[])


@pytest.fixture(params=["landlock", "audit-hook"])
def read_layer(request, monkeypatch):
    """Both read-restricting layers: Landlock (with the audit hook in front) and the audit hook alone."""
    if request.param == "landlock" and not sandbox.isolation()["landlock"]:
        pytest.skip("Landlock is unavailable on this kernel (or refused by a seccomp policy)")
    if request.param == "audit-hook":
        monkeypatch.setattr(sandbox, "LANDLOCK", False)
    assert sandbox.isolation()["read_restriction"] == request.param
    return request.param


def _refused(attempts: list[str]) -> str:
    """A program printing the attempts that did NOT raise PermissionError (so '[]' when all were refused)."""
    code = "import os\nok = []\n"
    for a in attempts:
        code += f"try:\n    {a}\n    ok.append({a!r})\nexcept PermissionError:\n    pass\n"
    return code + "print(ok)\n"


@pytest.fixture
def secret(tmp_path):
    """A file outside the sandbox, as a checkpoint or credentials file would be."""
    path = tmp_path / "ckpt" / "secret.txt"
    path.parent.mkdir()
    path.write_text("s3cret")
    return path


def _hidden_file() -> str | None:
    """A file in the base interpreter's site-packages (closed unless site_packages=True), if there is one."""
    import site

    for d in site.getsitepackages([sys.base_prefix]):
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def test_reads_outside_are_refused(read_layer, secret, sbx_root):
    home = os.path.expanduser("~")
    attempts = [
        "open('/etc/passwd').read()",
        f"open({str(secret)!r}).read()",
        f"import pathlib; pathlib.Path({str(secret)!r}).read_text()",
        f"os.read(os.open({str(secret)!r}, os.O_RDONLY), 9)",
        f"import shutil; shutil.copy({str(secret)!r}, 'copy')",
        f"os.symlink({str(secret)!r}, 'link'); open('link').read()",
        "open('/proc/self/root/etc/passwd').read()",
        "open('/proc/1/environ', 'rb').read()",
        f"os.listdir({str(secret.parent)!r})",
        "os.listdir('/')",
        f"list(os.scandir({home!r}))",
    ]
    if hidden := _hidden_file():
        attempts.append(f"open({hidden!r}, 'rb').read()")
    r = sandbox.run_code(_refused(attempts))
    assert r.ok, r.stderr
    assert r.stdout == "[]\n"
    _assert_clean(sbx_root)


def test_program_still_works(read_layer, sbx_root):
    code = (
        "import json, math, re, collections, itertools, fractions, decimal, random, datetime, functools, heapq\n"
        "import string, typing, dataclasses, unittest, time, os, sys, zlib, hashlib\n"
        "os.mkdir('d'); open('d/f.txt', 'w').write('mine'); print(open('d/f.txt').read(), sorted(os.listdir('.')))\n"
        "print(input(), open('/dev/stdin').read().split(), len(open('/dev/urandom', 'rb').read(4)))\n"
        "print('Pid:' in open('/proc/self/status').read(), time.localtime().tm_year > 2000, os.cpu_count() > 0)\n"
        "print(fractions.Fraction(1, 3) + 1, decimal.Decimal('1.1') * 2, math.comb(5, 2))\n"
    )
    r = sandbox.run_code(code, stdin="first\nsecond\n")
    assert r.ok, r.stderr
    assert r.stdout == "mine ['d', 'main.py']\nfirst ['first', 'second'] 4\nTrue True True\n4/3 2.2 10\n"
    _assert_clean(sbx_root)


def test_numpy_with_site_packages(read_layer):
    pytest.importorskip("numpy")
    code = "import numpy as np\nprint(np.linalg.solve(np.eye(3) * 2, np.ones(3)).sum())"
    r = sandbox.run_code(code, site_packages=True)
    assert r.ok and r.stdout == "1.5\n", r.stderr


def test_landlock_refuses_what_the_audit_hook_cannot_see(secret):
    # dir_fd-relative opens (the hook sees 's' next to the cwd; the kernel follows d/s) and ctypes calls into libc
    # (allowed with site_packages=True) never reach the audit hook: only the kernel layer stops them.
    if not sandbox.isolation()["landlock"]:
        pytest.skip("Landlock is unavailable on this kernel (or refused by a seccomp policy)")
    targets = ["/etc/passwd", str(secret), *filter(None, [_hidden_file()])]
    attempts = [
        f"os.makedirs('d', exist_ok=True); os.symlink({t!r}, 'd/s'); os.read(os.open('s', os.O_RDONLY, "
        "dir_fd=os.open('d', os.O_RDONLY)), 9); os.remove('d/s')"
        for t in targets
    ]
    r = sandbox.run_code(_refused(attempts))
    assert r.ok and r.stdout == "[]\n", r.stderr
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def errno(path, flags=os.O_RDONLY):\n    fd = libc.open(path.encode(), flags)\n"
        "    return ctypes.get_errno() if fd < 0 else os.close(fd)\n"
        f"print([errno(p) for p in {['/etc/passwd', str(secret)]!r}], errno('/', os.O_DIRECTORY),"
        f" errno({str(secret.parent)!r}, os.O_DIRECTORY))\n"
        "print(errno('main.py'), errno(os.__file__), errno('/proc/self/status'), errno('.', os.O_DIRECTORY))\n"
    )
    r = sandbox.run_code(code, site_packages=True)
    assert r.ok, r.stderr
    assert r.stdout == "[13, 13] 13 13\nNone None None None\n"  # EACCES from the kernel; own files open


def test_landlock_network_and_signal_scopes():
    abi = sandbox.isolation()["landlock"]
    if not abi:
        pytest.skip("Landlock is unavailable on this kernel (or refused by a seccomp policy)")
    if abi >= 4:  # TCP connect through libc, past the audit hook: EACCES from Landlock before routing
        code = (
            "import ctypes, socket, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "s = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
            "addr = struct.pack('=HH4s8x', socket.AF_INET, socket.htons(9), socket.inet_aton('127.0.0.1'))\n"
            "print(s >= 0, libc.connect(s, addr, len(addr)), ctypes.get_errno())\n"
        )
        r = sandbox.run_code(code, site_packages=True)
        assert r.ok and r.stdout == "True -1 13\n", r.stderr
    if abi >= 6 and sandbox.isolation()["pidns"]:  # PID 1 is the namespace's init, outside the Landlock domain
        r = sandbox.run_code("import os\ntry:\n    os.kill(1, 0)\nexcept PermissionError:\n    print('refused')")
        assert r.ok and r.stdout == "refused\n", r.stderr


def test_isolation_reports_the_read_layer(monkeypatch):
    iso = sandbox.isolation()
    assert {"netns", "pidns", "seccomp", "cgroup_pids", "landlock", "read_restriction"} <= set(iso)
    assert iso["read_restriction"] == ("landlock" if iso["landlock"] else "audit-hook")
    assert iso["landlock"] is False or (isinstance(iso["landlock"], int) and iso["landlock"] >= 1)
    monkeypatch.setattr(sandbox, "LANDLOCK", False)
    assert (sandbox.isolation()["landlock"], sandbox.isolation()["read_restriction"]) == (False, "audit-hook")

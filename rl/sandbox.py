"""Run untrusted (model-generated) Python in a subprocess with layered limits, for rewards.

Defence in depth for reward computation, NOT a security boundary against a determined attacker.
Nothing runs in the caller's process; each program gets a fresh temporary directory (its cwd and
HOME, deleted afterwards) and `python -I -S -B` with a minimal environment (no site-packages: only
the standard library is importable unless `site_packages=True`). Layers, outermost first:

* process group (`start_new_session`): on the wall-clock timeout the whole group is SIGKILLed.
* Linux namespaces via `unshare` where it works (probed once): a network namespace with only a
  down loopback (no network at all) and a PID namespace (everything dies with the program). Root
  needs no user namespace; others use `--map-root-user`. As root, `setpriv` also drops all
  capabilities, so the program cannot raise hard limits or undo mounts/namespaces.
* cgroups (where writable, e.g. as root on cgroup v1): `pids.max = max_processes` and a memory cap
  of `memory_mb` for the whole process tree. For non-root users RLIMIT_NPROC caps the tasks
  instead (the kernel ignores RLIMIT_NPROC for uid 0). With neither, forking is refused.
* rlimits set by the prelude before the user code: CPU, address space, file size, open files,
  core dumps off.
* Landlock (Linux >= 5.13, unprivileged, via ctypes in the prelude; `LANDLOCK = False` turns it
  off): the kernel lets the program and its children open only its directory (read/write), its
  stdio files, /dev/null, /dev/urandom, its own /proc/<pid>, and read-only what the interpreter
  needs: the sys.path entries inside the Python installation (site-packages only with
  `site_packages=True`), the directories of the loaded binary and libraries, time zones, CPU
  topology. No exec; with ABI >= 4 no TCP bind/connect, >= 6 no signals or abstract unix sockets
  outside. Fails closed: if the kernel offers Landlock and it cannot be applied, nothing runs.
* seccomp (x86_64 / aarch64, via ctypes in the prelude): execve/execveat fail (and fork/clone
  without CLONE_THREAD when forking is refused), so no other binary can run without the guards.
* audit hooks (`sys.addaudithook`, cannot be removed by the program): refuse sockets, process
  execution, ctypes, writes/renames/removals outside the directory, opens and listings outside
  the Landlock allow-list (the read layer where Landlock is missing), rlimit changes, and
  (without a PID namespace) signals to other processes.

Known gaps: without Landlock, reads rest on the audit hooks, which see paths, not inodes (symlink
races, `os.open(..., dir_fd=...)` escape them), miss C extensions opening files, and are bypassed
by ctypes, which `site_packages=True` allows (numpy needs it); the hooks' state lives in the
program's own interpreter (ctypes and gc.get_objects are refused, frames are not). Landlock
does not restrict stat/readlink (names and metadata outside stay visible), children of the
program cannot read their own /proc/<pid>, libraries outside the already-loaded directories
cannot be dlopened, and with ABI 1 renames across directories fail (EXDEV). As root outside a
user namespace the program still owns root's files; without a PID namespace or cgroup, a child
that calls setsid() can outlive the run. `isolation()` says which layers this machine provides.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_MAX_OUTPUT = 1 << 20  # bytes of stdout/stderr kept; the rest is summarised
LANDLOCK = True  # False: restrict reads with the audit hook alone (tests use it to cover that layer)
_CGROUP_ROOT = "/sys/fs/cgroup"

# Runs inside the sandboxed interpreter before the user code. argv[1] is the JSON config.
_PRELUDE = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
WORK = cfg["work"]
_ALSO_WRITABLE = frozenset(cfg["also_writable"])  # /dev/null and what /dev/stdout, /dev/stderr lead to
sys.argv = ["main.py"]


# [(path, access)] the program may open (its directory, its stdio, what the interpreter needs) and the
# site-packages directories beneath those that stay closed. Real paths: the audit hook compares prefixes.
def _grants():
    real = os.path.realpath
    installs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes = tuple(real(p).rstrip("/") + "/" for p in installs)
    # sys.path entries outside the installation (.pth files, e.g. an editable install of the trainer) stay closed.
    dirs = [real(p) for p in sys.path if isinstance(p, str) and (real(p) + "/").startswith(prefixes)]
    for line in open("/proc/self/maps"):  # interpreter, libpython, libc, locale: later dlopens come from there
        f = line.rstrip("\n").split(None, 5)[5:]
        if f and f[0].startswith("/") and not f[0].startswith(("/proc/", "/dev/")) and not f[0].endswith(" (deleted)"):
            dirs.append(os.path.dirname(f[0]))
    dirs += ["/usr/share/zoneinfo", "/sys/devices/system/cpu", real("/proc/self")]  # time zones, os.cpu_count
    roots = []
    for d in sorted(set(dirs)):  # a parent sorts before what lies beneath it
        if d != "/" and not any(d.startswith(r + "/") for r in roots):
            roots.append(d)
    files = ["/etc/ld.so.cache", "/etc/localtime", "/dev/urandom", "/dev/random", "/dev/zero", cfg["stdin"]]
    grants = [(WORK, "all"), ("/dev/null", "rw"), *[(f, "w") for f in _ALSO_WRITABLE - {"/dev/null"}]]
    grants += [(p, "r") for p in roots + files]
    if cfg["site_packages"]:
        return grants, []
    import site  # with -S importing it adds nothing to sys.path
    return grants, sorted({real(p) for p in site.getsitepackages(sorted(installs))})


# Kernel-enforced allow-list (Landlock LSM, unprivileged): afterwards this process and its children can
# open only `grants`, whatever the route (C code, ctypes, dir_fd, symlink races). Rights the ABI lacks are
# left out of the handled set, i.e. stay allowed: REFER needs ABI 2, TRUNCATE 3, IOCTL_DEV 5.
def _landlock(abi, grants, hidden):
    import ctypes, stat, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    def call(*args):
        r = libc.syscall(*(a if isinstance(a, bytes) else ctypes.c_long(a) for a in args))
        if r < 0:
            raise OSError(ctypes.get_errno(), f"landlock syscall {args[0]}")
        return r
    fs = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    file_rights = fs & (1 | 2 | 4 | 1 << 14 | 1 << 15)  # all a rule on a non-directory may carry
    access = {"r": 4 | 8, "w": 2 | 1 << 14, "rw": 2 | 4 | 1 << 14, "all": fs & ~1}  # EXECUTE nowhere
    # ABI 4: TCP bind/connect handled and never allowed; ABI 6: no signals, abstract sockets outside the domain
    attr = struct.pack("QQQ", fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    ruleset = call(444, attr, len(attr), 0)
    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # absent here
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        inner = is_dir and any(h.startswith(path + "/") for h in hidden)
        if r := (rights & 8 if inner else rights) & (fs if is_dir else file_rights):
            call(445, ruleset, 1, struct.pack("=Qi", r, fd), 0)  # LANDLOCK_RULE_PATH_BENEATH
        if not path.startswith("/proc/"):  # procfs gives a re-looked-up pid dentry a new inode, without the
            os.close(fd)  # rule: the open fd pins this one (disk, sysfs and tmpfs inodes the rule itself holds)
        for e in os.scandir(path) if inner else ():  # listable; readable beside the hidden site-packages only
            if e.path not in hidden and not e.is_symlink():
                allow(e.path, rights)
    for path, a in grants:
        allow(path, access[a])
    if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS: required to restrict oneself without CAP_SYS_ADMIN
        raise OSError(ctypes.get_errno(), "prctl")
    call(446, ruleset, 0)
    os.close(ruleset)


def _seccomp(deny_fork):
    import ctypes, struct
    m = os.uname().machine
    arch, nr = {  # syscall numbers; aarch64 has no fork/vfork
        "x86_64": (0xC000003E, dict(execve=59, execveat=322, ptrace=101, process_vm_writev=311, fork=57,
                                    vfork=58, clone=56, clone3=435)),
        "aarch64": (0xC00000B7, dict(execve=221, execveat=281, ptrace=117, process_vm_writev=271, clone=220,
                                     clone3=435))}[m]
    ld, ret = (lambda k: (0x20, 0, 0, k)), (lambda k: (0x06, 0, 0, k))
    jeq, err = (lambda k, t, f: (0x15, t, f, k)), (lambda e: ret(0x50000 | e))
    prog = [ld(4), jeq(arch, 1, 0), err(1), ld(0)]  # foreign syscall ABIs fail with EPERM
    if m == "x86_64":
        prog += [(0x35, 0, 1, 0x40000000), err(1)]  # x32 ABI numbers
    deny = [("execve", 1), ("execveat", 1), ("ptrace", 1), ("process_vm_writev", 1)]  # EPERM
    deny += deny_fork * [("fork", 11), ("vfork", 11), ("clone3", 38)]  # EAGAIN, ENOSYS
    for name, e in deny:  # clone3 -> ENOSYS makes libc fall back to clone, whose flags we can see
        if name in nr:
            prog += [jeq(nr[name], 0, 1), err(e)]
    if deny_fork:  # clone is allowed for threads only
        prog += [jeq(nr["clone"], 0, 3), ld(16), (0x45, 1, 0, 0x10000), err(11)]
    prog.append(ret(0x7FFF0000))
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Prog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):  # NO_NEW_PRIVS, SECCOMP
        raise OSError(ctypes.get_errno(), "prctl")


try:
    for procs in cfg["cgroups"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
except Exception as e:
    sys.stderr.write(f"sandbox setup failed: {e!r}\n")
    os._exit(125)
if cfg["status_fd"] is not None:
    # We are PID 1 of a new PID namespace, which ignores signals it has no handler for (its own
    # SIGKILL, SIGXCPU): run the program in a child; this init reaps and reports its wait status.
    _pid = os.fork()
    if _pid:
        while (_st := os.wait())[0] != _pid:
            pass
        os.write(cfg["status_fd"], str(_st[1]).encode())
        _code = os.waitstatus_to_exitcode(_st[1])
        os._exit(_code if _code >= 0 else 128 - _code)  # the namespace dies with us
    os.close(cfg["status_fd"])
try:
    for name, soft, hard in cfg["rlimits"]:
        r = getattr(resource, name)
        cap = resource.getrlimit(r)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        resource.setrlimit(r, (soft, hard))
except Exception as e:
    sys.stderr.write(f"sandbox setup failed: {e!r}\n")
    os._exit(125)
_GRANTS, _HIDDEN = _grants()
if cfg["landlock"]:  # the parent saw Landlock on this kernel: fail closed rather than run without it
    try:
        _landlock(cfg["landlock"], _GRANTS, _HIDDEN)
    except Exception as e:
        sys.stderr.write(f"sandbox setup failed: landlock: {e!r}\n")
        os._exit(125)
_READABLE = tuple(p for p, a in _GRANTS if a != "w")
try:
    _seccomp(cfg["deny_fork"])
except Exception:
    pass  # unsupported platform: the audit hooks below still refuse exec/fork
for _m in [m for m in sys.modules if m == "_ctypes" or m.split(".")[0] == "ctypes"]:
    del sys.modules[_m]
import gc
gc.collect()

_W = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATHS = {"os.mkdir": [(0, 2)], "os.rmdir": [(0, 1)], "os.remove": [(0, 1)], "os.rename": [(0, 2), (1, 3)],
          "os.link": [(0, 2), (1, 3)], "os.symlink": [(1, 2)], "os.chmod": [(0, 2)], "os.chown": [(0, 3)],
          "os.utime": [(0, 3)], "os.truncate": [(0, None)], "os.setxattr": [(0, None)],
          "os.removexattr": [(0, None)], "sqlite3.connect": [(0, None)]}
# gc.get_*: a cheap obstacle to finding and editing this hook's state from the program.
_EXEC = {"os.exec", "os.posix_spawn", "os.system", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
         "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
_EXEC |= {"os.fork", "os.forkpty"} if cfg["deny_fork"] else set()
_KILL = set() if cfg["status_fd"] is not None else {"os.kill", "os.killpg"}
_LIST = {"os.listdir", "os.scandir", "os.listxattr", "os.getxattr"}
_ALLOW_CTYPES = cfg["allow_ctypes"]
_DENY_PREFIXES = ("socket.",) if _ALLOW_CTYPES else ("socket.", "ctypes.")  # ctypes bypasses the hooks


def _inside(path, dir_fd=None):
    if isinstance(path, int):
        return True  # an fd: it is only writable if it was opened for writing, which was checked
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    real = os.path.realpath(os.path.join(base, os.fsdecode(path)))
    return real == WORK or real.startswith(WORK + os.sep) or real in _ALSO_WRITABLE


def _under(real, roots):
    return any(real == r or real.startswith(r + os.sep) for r in roots)


def _readable(path):  # the audit hook's copy of the allow-list: paths only, relative ones from the cwd (no dir_fd)
    if isinstance(path, int):
        return True  # an fd the program already holds
    real = os.path.realpath(os.fsdecode("." if path is None else path))
    return _under(real, _READABLE) and not _under(real, _HIDDEN)


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        write = (flags or 0) & _W or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if not (_inside(path) if write else _readable(path)):
            raise PermissionError(f"sandbox: {path!r} is outside what the program may open")
    elif event in _LIST:
        if not _readable(args[0]):
            raise PermissionError(f"sandbox: {event} of {args[0]!r} is not allowed")
    elif event in _PATHS:
        for i, j in _PATHS[event]:
            if not _inside(args[i], None if j is None else args[j]):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
    elif event.startswith(_DENY_PREFIXES) or event in _EXEC:
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event == "import" and not _ALLOW_CTYPES and args[0].split(".")[0] in ("ctypes", "_ctypes"):
        raise PermissionError("sandbox: ctypes is not allowed")
    elif event in _KILL and args[0] != os.getpid():
        raise PermissionError(f"sandbox: {event} is not allowed")


sys.addaudithook(_hook)
import builtins, runpy
builtins.exit = builtins.quit = sys.exit  # normally added by `site`, which -S skips
del cfg
runpy.run_path("main.py", run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program. returncode is None when it was killed at the wall-clock timeout."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_by: str | None  # signal name, e.g. "SIGKILL" (timeout, memory cgroup) or "SIGXCPU"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def _prefix() -> tuple[str, ...]:
    """argv prefix entering the namespaces (and dropping capabilities as root), () where unsupported."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if sys.platform != "linux" or unshare is None:
        return ()
    base = [unshare, *(["--map-root-user"] if os.geteuid() != 0 else []), "--net", "--pid", "--fork", "--kill-child"]
    drop = [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--"] if setpriv else []
    for argv in ([*base, "--", *drop], [*base, "--"]) if os.geteuid() == 0 and drop else ([*base, "--"],):
        if _probe(argv):
            return tuple(argv)
    return ()


def _cgroup_slots() -> list[tuple[str, tuple[str, ...]]]:
    """(this process's cgroup directory, limit files) for each writable hierarchy with pids / memory."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return []
    v1 = {"pids": ("pids.max",), "memory": ("memory.limit_in_bytes",)}
    slots = []
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if ctrls:  # cgroup v1: one hierarchy per controller
            slots += [(os.path.join(_CGROUP_ROOT, c, path.lstrip("/")), v1[c]) for c in ctrls.split(",") if c in v1]
        else:  # v2, mounted alone or next to v1 as "unified"
            for root in (_CGROUP_ROOT, os.path.join(_CGROUP_ROOT, "unified")):
                if os.path.exists(os.path.join(root, "cgroup.controllers")):
                    slots.append((os.path.join(root, path.lstrip("/")), ("pids.max", "memory.max")))
                    break
    return [(d, files) for d, files in slots if os.access(os.path.join(d, "cgroup.procs"), os.W_OK)]


def _make_cgroups(name: str, max_processes: int, memory_mb: int) -> dict[str, list[str]]:
    """Create per-run child cgroups with limits: directory -> the limit files that were set."""
    values = {"pids.max": max_processes, "memory.limit_in_bytes": memory_mb << 20, "memory.max": memory_mb << 20}
    made = {}
    for parent, files in _cgroup_slots():
        d = os.path.join(parent, name)
        try:
            os.mkdir(d)
        except OSError:
            continue
        written = []
        for f in files:  # a v2 controller not enabled for children has no files here
            try:
                with open(os.path.join(d, f), "w") as fh:
                    fh.write(str(values[f]))
                written.append(f)
            except OSError:
                pass
        if written:
            made[d] = written
        else:
            _remove_cgroup(d)
    return made


def _remove_cgroup(d: str) -> None:
    """SIGKILL whatever is left in cgroup `d`, then remove it (best effort, ~2 s at most)."""
    for _ in range(200):
        try:
            pids = [int(p) for p in open(os.path.join(d, "cgroup.procs")).read().split()]
        except OSError:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if not pids:
            try:
                os.rmdir(d)
                return
            except OSError:
                pass  # tasks still exiting
        time.sleep(0.01)


def _user_tasks() -> int | None:
    """Tasks (threads) owned by this real uid, what RLIMIT_NPROC counts; None without /proc."""
    uid, n = os.getuid(), 0
    try:
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if os.stat(f"/proc/{p}").st_uid == uid:
                        n += len(os.listdir(f"/proc/{p}/task"))
                except OSError:
                    pass  # exited meanwhile
    except OSError:
        return None
    return n


@functools.cache
def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (444 = landlock_create_ruleset with the VERSION flag), 0 without."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(int(libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))), 0)
    except (OSError, AttributeError):
        return 0


def isolation() -> dict[str, bool | int | str]:
    """Which layers this machine provides (probed once; audit hooks and rlimits always apply).

    "landlock" is the ABI version in use (False without); "read_restriction" names the strongest layer
    limiting what the program can read, "landlock" or "audit-hook" (the hook applies in both cases)."""
    abi = _landlock_abi() if LANDLOCK else 0
    return {**_layers(), "landlock": abi or False, "read_restriction": "landlock" if abi else "audit-hook"}


@functools.cache
def _layers() -> dict[str, bool]:
    prefix, cg = _prefix(), _make_cgroups(f"m1jax-probe-{os.getpid()}", 8, 64)
    for d in cg:
        _remove_cgroup(d)
    limits = {f for files in cg.values() for f in files}
    return {
        "netns": bool(prefix),
        "pidns": bool(prefix),
        "drop_capabilities": any(os.path.basename(a) == "setpriv" for a in prefix),
        "cgroup_pids": "pids.max" in limits,
        "cgroup_memory": bool(limits & {"memory.limit_in_bytes", "memory.max"}),
        "rlimit_nproc": os.geteuid() != 0 and os.path.isdir("/proc"),
        "seccomp": sys.platform == "linux" and os.uname().machine in ("x86_64", "aarch64"),
    }


def _read(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(_MAX_OUTPUT + 1)
        rest = os.fstat(f.fileno()).st_size - _MAX_OUTPUT
    text = data[:_MAX_OUTPUT].decode("utf-8", "replace")
    return text + f"\n[sandbox: {rest} more bytes dropped]" if rest > 0 else text


def run_code(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_size_mb: int = 16,
    max_processes: int = 32,
    site_packages: bool = False,
    python: str = sys.executable,
) -> SandboxResult:
    """Run Python source `code` in a fresh sandboxed interpreter (see the module docstring).

    max_processes caps tasks (threads included) of the whole program; memory_mb is both the
    per-process address-space limit and, with a memory cgroup, the limit for the whole tree.
    """
    with tempfile.TemporaryDirectory(prefix="m1jax-sandbox-") as tmp:
        tmp = os.path.realpath(tmp)
        work, io_dir = os.path.join(tmp, "work"), os.path.join(tmp, "io")
        os.mkdir(work)
        os.mkdir(io_dir)
        with open(os.path.join(work, "main.py"), "wb") as f:
            f.write(code.encode("utf-8", "replace"))
        with open(os.path.join(io_dir, "stdin"), "wb") as f:
            f.write(stdin.encode("utf-8", "replace"))
        prefix = _prefix()  # non-empty: PID namespace, whose init (the prelude) reports via `status`
        cgroups = _make_cgroups(os.path.basename(tmp), max_processes + bool(prefix), memory_mb)
        rlimits = [("RLIMIT_CPU", cpu_s, cpu_s + 1), ("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
                   ("RLIMIT_FSIZE", file_size_mb << 20, file_size_mb << 20), ("RLIMIT_CORE", 0, 0),
                   ("RLIMIT_NOFILE", 256, 256)]  # fmt: skip
        capped = any("pids.max" in files for files in cgroups.values())
        if os.geteuid() != 0 and not capped and (n := _user_tasks()) is not None:
            rlimits.append(("RLIMIT_NPROC", n + max_processes, n + max_processes))  # counts the whole uid
            capped = True
        status, out, err = (os.path.join(io_dir, f) for f in ("status", "stdout", "stderr"))
        status_fd = os.open(status, os.O_WRONLY | os.O_CREAT, 0o600) if prefix else None
        cfg = {"work": work, "also_writable": ["/dev/null", out, err], "rlimits": rlimits,
               "cgroups": [os.path.join(d, "cgroup.procs") for d in cgroups], "status_fd": status_fd,
               "deny_fork": not capped or max_processes <= 1, "allow_ctypes": site_packages,
               "site_packages": site_packages, "stdin": os.path.join(io_dir, "stdin"),
               "landlock": _landlock_abi() if LANDLOCK else 0}  # fmt: skip
        flags = ["-I", "-B"] + ([] if site_packages else ["-S"])
        argv = [*prefix, python, *flags, "-c", _PRELUDE, json.dumps(cfg)]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        timed_out, proc = False, None
        try:
            fds = () if status_fd is None else (status_fd,)
            with open(os.path.join(io_dir, "stdin"), "rb") as fin, open(out, "ab") as fout, open(err, "ab") as ferr:
                proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env,
                                        start_new_session=True, pass_fds=fds)  # fmt: skip
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            if proc is not None:  # also after a normal exit: children may outlive the program
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
            if status_fd is not None:
                os.close(status_fd)
            for d in cgroups:
                _remove_cgroup(d)
        if timed_out:
            return SandboxResult(None, _read(out), _read(err), True, "SIGKILL")
        if prefix and (st := open(status).read()):
            rc = os.waitstatus_to_exitcode(int(st))
        name = signal.Signals(-rc).name if rc < 0 and -rc in signal.valid_signals() else None
        return SandboxResult(rc, _read(out), _read(err), False, name)


def run_many(
    codes: Sequence[str],
    *,
    max_workers: int | None = None,
    per_item: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> list[SandboxResult]:
    """run_code over `codes` concurrently (threads: the work happens in subprocesses), in order.

    kwargs go to every run_code call; per_item[i] (optional) overrides them for codes[i].
    """
    codes = list(codes)
    if per_item is not None and len(per_item) != len(codes):
        raise ValueError(f"run_many: {len(per_item)} per_item option sets for {len(codes)} programs")
    if not codes:
        return []
    jobs = [{**kwargs, **(per_item[i] if per_item is not None else {})} for i in range(len(codes))]
    workers = max_workers or min(len(codes), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: run_code(codes[i], **jobs[i]), range(len(codes))))

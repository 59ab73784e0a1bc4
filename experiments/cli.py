"""What the command-line programs share: the config flag, logging, and expected failures.

- `config_flag(default)`: an ml_collections config file whose fields are overridden with
  `--config.<field>=value`. Any name is accepted at parse time, so that the config's own checks
  (`validate`) reject an unknown one by name, with the valid ones, instead of a flags traceback.
- `setup_logging(workdir)`: the console shows m1jax's own messages and other libraries' warnings;
  `workdir/run.log` gets m1jax's debug messages (tracebacks of expected failures included) and
  other libraries' INFO and up.
- `main_errors(workdir)`: a context in which a bad config, data or checkpoint (`ValueError`) or an
  expected end of a run (`m1jax.errors.RunError`) prints one `error: ...` line and exits 1; the
  traceback goes to the log file.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

from ml_collections import config_flags

log = logging.getLogger("m1jax")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def config_flag(default: str | None, help_text: str = "ml_collections config file; override with --config.<field>="):
    _check_config_path(sys.argv)  # the flag loads the file while it is defined: a missing one is a traceback
    return config_flags.DEFINE_config_file("config", default, help_text, lock_config=False, accept_new_attributes=True)


def _check_config_path(argv) -> None:
    """Exit with one line if --config names a file that does not exist (`file.py:arg` allowed)."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            raise SystemExit(f"error: --config={value}: no such config file ({os.path.abspath(path)})")


class _ConsoleFilter(logging.Filter):
    """m1jax's INFO and up; other libraries' WARNING and up, except orbax's (via absl), which logs
    each save at INFO and a skipped corrupt checkpoint at ERROR: that story is told by m1jax."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "m1jax" or record.name.startswith("m1jax."):
            return record.levelno >= logging.INFO
        if record.name == "absl":
            return record.levelno >= logging.CRITICAL
        return record.levelno >= logging.WARNING


def log_path(workdir: str) -> str:
    """`workdir/run.log` for process 0, `run.<i>.log` for the others (they share one workdir)."""
    import jax

    i = jax.process_index()
    return os.path.join(workdir, "run.log" if i == 0 else f"run.{i}.log")


def setup_logging(workdir: str | None = None) -> str | None:
    """Console handler (see `_ConsoleFilter`), and a DEBUG file handler in `workdir`; returns its path."""
    root = logging.getLogger()
    for h in list(root.handlers):  # absl's handler: its own format, and every library's INFO
        root.removeHandler(h)
    root.setLevel(logging.INFO)  # other libraries' debug output is not ours to keep
    log.setLevel(logging.DEBUG)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs dozens of INFO lines per save
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
    console.addFilter(_ConsoleFilter())
    root.addHandler(console)
    if workdir is None:
        return None
    os.makedirs(workdir, exist_ok=True)
    path = log_path(workdir)
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file)
    return path


@contextlib.contextmanager
def main_errors(where: str | None = None):
    """Expected failures as one line on stderr and exit status 1 (see the module docstring)."""
    from m1jax.errors import RunError

    try:
        yield
    except (ValueError, RunError) as e:
        log.debug("the run ended with an error", exc_info=True)
        more = f" (log: {where})" if where else ""
        raise SystemExit(f"error: {e}{more}") from None


def train(entry: str, config, workdir: str, progress: bool) -> dict:
    """Join a multi-host job if the environment says so, log to `workdir`, and run `entry`
    ("module:function", imported only now so that --help stays fast) as `fn(config, workdir,
    progress=...)`; expected failures end the process with one line (`main_errors`)."""
    setup_logging()
    with main_errors():
        from m1jax import distributed

        distributed.initialize()  # multi-host jobs (launch/): before any JAX work
    log_file = setup_logging(workdir)
    module, name = entry.split(":")
    fn = getattr(importlib.import_module(module), name)
    with main_errors(log_file):
        return fn(config, workdir, progress=progress)

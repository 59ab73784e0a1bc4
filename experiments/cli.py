"""What the command-line programs share: the config flag, logging, and expected failures.

- `config_flag(default)`: an ml_collections config file whose fields are overridden with
  `--config.<field>=value`. Any leaf name is accepted while flags are parsed, so that the config's
  own checks (`validate`) reject an unknown one by name, with the valid ones; an override that
  cannot even be placed (`--config.nonsense.deep=1`, `--config.steps.x=1`) or a value that does not
  parse is one `error:` line too (`parse_flags`, the flags parser of `app.run`).
- `setup_logging(workdir)`: the console shows m1jax's own messages and other libraries' warnings;
  `workdir/run.log` gets m1jax's debug messages (tracebacks of expected failures included) and
  other libraries' INFO and up.
- `main_errors(log_file)`: a context in which a bad config, data or checkpoint (`ValueError`) or
  an expected end of a run (`m1jax.errors.RunError`) prints one `error: ...` line and exits 1;
  the traceback goes to the log file.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import runpy
import sys
import warnings

from absl import flags
from ml_collections import config_dict, config_flags

log = logging.getLogger("m1jax")
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_PARSE_ERRORS = (KeyError, AttributeError, TypeError, ValueError, IndexError)  # what a bad override raises


def config_flag(default: str | None, help_text: str = "ml_collections config file; override with --config.<field>="):
    """The --config flag. Defining it loads `default` with the command line's overrides, so a bad
    one fails here, before `app.run`: reported as one line like the rest."""
    _check_config_path(sys.argv)
    try:
        return config_flags.DEFINE_config_file(
            "config", default, help_text, lock_config=False, accept_new_attributes=True
        )
    except _PARSE_ERRORS as e:
        raise SystemExit(f"error: {describe_override_error(sys.argv, default, e)}") from None


def run_flags(default_config: str, default_workdir: str, workdir_help: str):
    """(--config, --workdir, --progress): the flags of a training CLI; `default_config` is a file
    name in configs/."""
    return (
        config_flag(os.path.join(_CONFIGS, default_config)),
        flags.DEFINE_string("workdir", default_workdir, workdir_help),
        flags.DEFINE_bool("progress", True, "show a progress bar"),
    )


def launch(main) -> None:
    """`app.run(main)` with `parse_flags`, after re-executing with huge pages where that helps."""
    from absl import app

    from m1jax import host

    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    app.run(main, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags parser: a flag or config override that does not parse is one line, exit 1."""
    # A restore that fails inside orbax / tensorstore can leave a metadata coroutine unawaited; Python
    # then prints a RuntimeWarning when it is collected (at a random point), noise beside the one
    # error the CLI reports for unreadable checkpoints.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None
    except _PARSE_ERRORS as e:
        raise SystemExit(f"error: {describe_override_error(argv, None, e)}") from None


def _config_arg(argv) -> str | None:
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_path(argv) -> None:
    """Exit with one line if --config names a file that does not exist (`file.py:arg` allowed)."""
    value = _config_arg(argv)
    if value is not None and not os.path.isfile(path := value.split(":", 1)[0]):
        raise SystemExit(f"error: --config={value}: no such config file ({os.path.abspath(path)})")


def describe_override_error(argv, default: str | None, error: Exception) -> str:
    """Which `--config.a.b=v` override could not be placed in the config, and why (the section
    that does not exist, with the closest names; or a value that is not a section)."""
    from m1jax.train import config as train_config
    from rl import config as rl_config

    value = _config_arg(argv) or default
    try:
        path, _, arg = value.partition(":")
        get_config = runpy.run_path(path)["get_config"]
        config = get_config(arg) if arg else get_config()
    except Exception:  # noqa: BLE001 - the config file itself is broken: its own error says more
        return f"{type(error).__name__}: {error}"
    renamed = train_config.dotted(rl_config.RENAMED if "rl" in config else train_config.RENAMED)
    for arg in argv[1:]:
        if not arg.startswith(("--config.", "--noconfig.")):
            continue
        field = arg.split("=", 1)[0].split(".", 1)[1]
        node, where = config, "config"
        for part in field.split(".")[:-1]:
            if not isinstance(node, config_dict.ConfigDict):
                return f"{arg}: {where} is a value, not a section with fields"
            if part not in node:
                return f"{arg}: " + train_config.unknown_message([part], node.keys(), where, renamed)
            node, where = node[part], f"{where}.{part}"
        if not isinstance(node, config_dict.ConfigDict):
            return f"{arg}: {where} is a value, not a section with fields"
    return f"{type(error).__name__}: {error}"


class _ConsoleFilter(logging.Filter):
    """m1jax's INFO and up; other libraries' WARNING and up. orbax (logging through absl) shows its
    errors only: it logs each save at INFO, and its report of a corrupt checkpoint's metadata
    repeats what m1jax says when it falls back to the previous checkpoint."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "m1jax" or record.name.startswith("m1jax."):
            return record.levelno >= logging.INFO
        if record.name == "absl":
            return record.levelno >= logging.ERROR and not record.getMessage().startswith("Failed to read Metadata")
        return record.levelno >= logging.WARNING


def setup_logging(log_file: str | None = None) -> None:
    """Console handler (see `_ConsoleFilter`), and a file handler at `log_file` if given."""
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
    if log_file is not None:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        file = logging.FileHandler(log_file)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)


@contextlib.contextmanager
def main_errors(log_file: str | None = None):
    """Expected failures as one line on stderr and exit status 1 (see the module docstring)."""
    from m1jax.errors import RunError

    try:
        yield
    except (ValueError, RunError) as e:
        log.debug("the run ended with an error", exc_info=True)
        more = f" (log: {log_file})" if log_file else ""
        raise SystemExit(f"error: {e}{more}") from None


def train(entry: str, config, workdir: str, progress: bool) -> dict:
    """Join a multi-host job if the environment says so, log to `workdir/run.log` (process i > 0:
    `run.<i>.log`, they share the workdir), and run `entry` ("module:function", imported only now
    so that --help stays fast) as `fn(config, workdir, progress=...)`; expected failures end the
    process with one line (`main_errors`)."""
    setup_logging()
    with main_errors():
        from m1jax import distributed

        multi = distributed.initialize()  # multi-host jobs (launch/): before any JAX work
    index = 0
    if multi:  # a single process needs no backend to know it is process 0
        import jax

        index = jax.process_index()
    log_file = os.path.join(workdir, "run.log" if index == 0 else f"run.{index}.log")
    setup_logging(log_file)
    module, name = entry.split(":")
    fn = getattr(importlib.import_module(module), name)
    with main_errors(log_file):
        return fn(config, workdir, progress=progress)

"""Rerun the benchmarks and notebooks and collect their numbers into one report.

    python -m experiments.report [--out experiments/results] [--quick] [--only forward,01_attention_scaling]

Runs each benchmark script (`experiments/benchmarks/{forward,train_step,lightning}.py`, as
subprocesses writing JSON) and executes each notebook of `experiments/notebooks/` (nbclient; small
mode unless FULL=1 is set, as the notebooks read it), whose figures and `<name>.json` land in the
output folder. Then writes `REPORT.md` and `report.json` there: the machine it ran on, the command,
and every number as the scripts and notebooks produced it (nothing is typed in). `--quick` runs the
benchmarks' smoke modes (for tests); `--only` picks steps by name. A step that fails is reported
as failed, with its error, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")
# name -> python arguments (each script takes --out PATH and --quick); train_step also trains
# transformers' MiniMaxForCausalLM side by side.
BENCHMARKS = {
    "forward": ["-m", "experiments.benchmarks.forward"],
    "train_step": ["-m", "experiments.benchmarks.train_step", "--compare-hf"],
    "lightning": ["-m", "experiments.benchmarks.lightning"],
}


def machine() -> dict:
    """Where the numbers come from: OS, CPU, cores, memory, accelerator and library versions."""
    import jax

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    for mod in ("flax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def run_benchmark(name: str, out_dir: str, quick: bool) -> dict:
    path = os.path.join(out_dir, f"benchmark_{name}.json")
    cmd = [sys.executable, *BENCHMARKS[name], "--out", path]
    if quick:
        cmd.append("--quick")
    return _subprocess(cmd, path)


def _subprocess(cmd: list[str], path: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    shown = ["python"] + [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]]
    step = {"command": " ".join(shown)}
    step["wall_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0 or not os.path.exists(path):
        step.update(ok=False, error=(proc.stderr or proc.stdout)[-3000:])
        return step
    with open(path) as fh:
        step.update(ok=True, result=json.load(fh))
    return step


def run_notebook(path: str, out_dir: str) -> dict:
    """Execute one notebook (its kernel inherits M1JAX_RESULTS_DIR = out_dir from main); the JSON
    it writes there is the result."""
    import nbclient
    import nbformat

    name = os.path.splitext(os.path.basename(path))[0]
    nb = nbformat.read(path, as_version=4)
    mode = " (FULL=1)" if os.environ.get("FULL") == "1" else " (small mode)"
    step = {"command": f"nbclient {os.path.relpath(path, ROOT)}{mode}"}
    t0 = time.perf_counter()
    try:
        meta = {"metadata": {"path": os.path.dirname(path)}}
        nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", resources=meta).execute()
    except Exception as e:  # noqa: BLE001 - a failing notebook is reported, the others still run
        step.update(ok=False, wall_s=round(time.perf_counter() - t0, 1), error=f"{type(e).__name__}: {str(e)[-3000:]}")
        return step
    step["wall_s"] = round(time.perf_counter() - t0, 1)
    result = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(result):
        step.update(ok=False, error=f"the notebook wrote no {name}.json")
        return step
    with open(result) as fh:
        step.update(ok=True, result=json.load(fh))
    step["figures"] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, f"{name}*.png")))
    return step


# -- the markdown ------------------------------------------------------------------------------


def _scalars(obj, prefix: str = "", depth: int = 0):
    """(dotted key, value) for every number / string / bool in a nested JSON object; lists of
    numbers are shown whole when short."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _scalars(v, f"{prefix}{k}.", depth + 1)
    elif isinstance(obj, list):
        if len(obj) <= 12 and all(isinstance(x, (int, float, str, bool)) or x is None for x in obj):
            yield prefix[:-1], obj
        elif all(isinstance(x, dict) for x in obj):
            for i, x in enumerate(obj[:40]):
                yield from _scalars(x, f"{prefix}{i}.", depth + 1)
    else:
        yield prefix[:-1], obj


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def markdown(report: dict) -> str:
    lines = ["# m1jax results report", ""]
    lines += [f"Generated {report['date']} by `{report['command']}` in {report['wall_s']:.0f} s.", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["machine"].items()]
    for section in ("benchmarks", "notebooks"):
        lines += ["", f"## {section.capitalize()}", ""]
        for name, step in report[section].items():
            status = "ok" if step["ok"] else "FAILED"
            lines += [f"### {name} ({status}, {step['wall_s']} s)", "", f"`{step['command']}`", ""]
            if not step["ok"]:
                lines += ["```", step.get("error", "").strip()[-1500:], "```", ""]
                continue
            lines += [f"![{fig}]({fig})" for fig in step.get("figures", [])]
            lines += ["", "| key | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in _scalars(step["result"]) if not k.endswith("times_s")]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"), help="output folder")
    ap.add_argument("--quick", action="store_true", help="the benchmarks' smoke modes")
    ap.add_argument("--only", default="", help="comma-separated benchmark / notebook names (default: all)")
    ap.add_argument("--notebooks", default=NOTEBOOKS, help="folder of the notebooks to execute")
    args = ap.parse_args(argv)
    paths = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(args.notebooks, "*.ipynb"))}
    notebooks = sorted(paths)
    only = {x for x in args.only.split(",") if x}
    unknown = only - set(BENCHMARKS) - set(notebooks)
    if unknown:
        ap.error(f"--only: unknown names {sorted(unknown)}; choose from {sorted(BENCHMARKS) + notebooks}")
    pick = lambda names: [n for n in names if not only or n in only]
    os.makedirs(args.out, exist_ok=True)
    os.environ["M1JAX_RESULTS_DIR"] = os.path.abspath(args.out)  # where the notebooks' kernels write

    t0 = time.perf_counter()
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    report["command"] = "python -m experiments.report " + " ".join(argv if argv is not None else sys.argv[1:])
    report["benchmarks"] = {n: run_benchmark(n, args.out, args.quick) for n in pick(BENCHMARKS)}
    report["notebooks"] = {n: run_notebook(paths[n], args.out) for n in pick(notebooks)}
    report["machine"] = machine()  # after the steps: this process then holds no accelerator while they run
    report["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(args.out, "REPORT.md"), "w") as fh:
        fh.write(markdown(report))
    failed = [n for s in ("benchmarks", "notebooks") for n, step in report[s].items() if not step["ok"]]
    print(f"wrote {os.path.join(args.out, 'REPORT.md')}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    from m1jax import host

    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    sys.exit(main())

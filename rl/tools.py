"""Tools a policy can call in a multi-turn episode (`rl.envs`): the call format, a registry, and a pool.

The call format (chat-template tokens of `m1jax.data.tokenizer.TOOL_SPECIALS`). The model writes

    <tool_call>NAME
    INPUT</tool_call>

(the tool's name on the first line, everything after the first newline is its input, verbatim: an
expression for `calculator`, a program for `python`), and generation stops at `</tool_call>`. The
environment appends

    <tool_response>OUTPUT</tool_response>

to the context, OUTPUT truncated to `max_output` characters, and the model's next turn follows. The
response is encoded with `special=False`: a tool cannot write control tokens into the context.

A tool is `fn(input: str, timeout_s: float) -> str`; it raises `ToolError` for a failure the model
should read (bad expression, non-zero exit). `ToolPool.run` never raises: a malformed call, an
unknown tool, a timeout or any exception inside a tool comes back as a `ToolResult` with `error`
set (its kind) and an "error: ..." text the model sees, so a tool failure is an observation and a
counted event, never a crash of the trainer. Calls run on a bounded thread pool (`workers`), so a
slow tool holds one worker for at most `timeout_s`, not the other episodes.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from m1jax.data.tokenizer import TOOL_SPECIALS as TOOL_TOKENS
from rl import sandbox

CALL, END_CALL, RESPONSE, END_RESPONSE = TOOL_TOKENS
ToolFn = Callable[[str, float], str]
_REGISTRY: dict[str, ToolFn] = {}


class ToolError(Exception):
    """A failure the model should read as its observation (bad input, a program that failed)."""


def register(name: str) -> Callable[[ToolFn], ToolFn]:
    """Decorator adding a tool under `name` (one line, no spaces; names are unique)."""
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"tool name {name!r} must be non-empty without whitespace")

    def add(fn: ToolFn) -> ToolFn:
        if name in _REGISTRY:
            raise ValueError(f"tool {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> ToolFn:
    if name not in _REGISTRY:
        raise KeyError(f"unknown tool {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def parse_names(spec: str, field: str = "rl.env.tools") -> tuple[str, ...]:
    """ "calculator,python" -> the names, each checked against the registry (ValueError naming `field`)."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in _REGISTRY]
    if not names or unknown:
        what = f"unknown tool(s) {unknown}" if unknown else "no tool named"
        raise ValueError(f"config.{field}={spec!r}: {what}; available: {', '.join(available())}")
    return names


def format_call(name: str, arg: str) -> str:
    return f"{CALL}{name}\n{arg}{END_CALL}"


def format_response(text: str) -> str:
    return f"{RESPONSE}{text}{END_RESPONSE}"


@dataclasses.dataclass(frozen=True)
class Call:
    """A parsed call: `name` and `arg`, or `error` (why the turn is not a well-formed call)."""

    name: str = ""
    arg: str = ""
    error: str | None = None


def parse_call(turn: str) -> Call | None:
    """The call a model turn ends with: None if the turn does not end with `</tool_call>` (no call);
    a Call with `error` set when it does but the call is malformed."""
    body = turn.rstrip()
    if not body.endswith(END_CALL):
        return None
    body = body[: -len(END_CALL)]
    if CALL not in body:
        return Call(error=f"malformed call: {END_CALL} without {CALL}")
    body = body.rsplit(CALL, 1)[1]
    name, nl, arg = body.partition("\n")
    name = name.strip()
    if not nl or not name:
        return Call(error=f"malformed call: write {CALL}NAME, a newline, then the input")
    return Call(name=name, arg=arg)


@dataclasses.dataclass(frozen=True)
class ToolResult:
    text: str  # what the model reads (inside <tool_response>), already truncated
    error: str | None = None  # None, or "malformed" / "unknown_tool" / "timeout" / "tool_error" / "crash"


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters: its start and its end (where a traceback names the error),
    with a note of how many characters were dropped between them."""
    if len(text) <= limit:
        return text
    note = f"...[{len(text) - limit} more chars]..."
    keep = max(limit - len(note), 0)
    return text[: keep // 2] + note + text[len(text) - (keep - keep // 2) :]


class ToolPool:
    """Runs parsed calls on at most `workers` threads, each bounded by `timeout_s` (use as a context
    manager, or `close()`). `names`: the tools episodes may call (others are unknown to them)."""

    def __init__(self, names: Sequence[str], *, workers: int = 4, timeout_s: float = 5.0, max_output: int = 256):
        for n in names:
            get(n)  # fail now on a name that is not registered
        if workers < 1 or not timeout_s > 0 or max_output < 16:
            raise ValueError(f"ToolPool needs workers >= 1, timeout_s > 0, max_output >= 16; got {workers}, "
                             f"{timeout_s}, {max_output}")  # fmt: skip
        self.names, self.timeout_s, self.max_output = tuple(names), float(timeout_s), int(max_output)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="m1jax-tool")

    def __enter__(self) -> ToolPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _one(self, call: Call) -> ToolResult:
        if call.error is not None:
            return ToolResult(f"error: {call.error}", "malformed")
        if call.name not in self.names:
            return ToolResult(f"error: unknown tool {call.name!r}; tools: {', '.join(self.names)}", "unknown_tool")
        try:
            return ToolResult(truncate(get(call.name)(call.arg, self.timeout_s), self.max_output))
        except ToolError as e:
            return ToolResult(truncate(f"error: {e}", self.max_output), "tool_error")
        except Exception as e:  # a bug or a resource failure inside the tool: the model sees it, training goes on
            return ToolResult(truncate(f"error: {type(e).__name__}: {e}", self.max_output), "crash")

    def run(self, calls: Sequence[Call]) -> list[ToolResult]:
        """Results of `calls`, in order, each within `timeout_s` (plus scheduling) of its start."""
        futures = [self._pool.submit(self._one, c) for c in calls]
        out = []
        for f in futures:
            try:  # the tools bound their own work; this bounds a tool that does not
                out.append(f.result(timeout=self.timeout_s + 1.0))
            except FutureTimeout:
                out.append(ToolResult(f"error: no result within {self.timeout_s:g} s", "timeout"))
        return out


# --- the registered tools ---

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_DIGITS = 1000  # the calculator's bound on an integer's size (and so on its time)
_CALC_FILE = "<calculator>"
# The parser's warnings about the model's input ("invalid decimal literal") are not ours to print. One
# filter at import: warnings.catch_warnings() is not thread-safe and the pool runs calls in threads.
warnings.filterwarnings("ignore", module=_CALC_FILE)


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int):
            if b < 0:
                a = float(a)  # 2**-1 = 0.5
            elif abs(a) > 1 and b * math.log10(abs(a)) > MAX_DIGITS:
                raise ToolError(f"power too large (results are limited to {MAX_DIGITS} digits)")
        if isinstance(node.op, ast.Mult) and isinstance(a, int) and isinstance(b, int):
            if a and b and math.log10(abs(a)) + math.log10(abs(b)) > MAX_DIGITS:
                raise ToolError(f"product too large (results are limited to {MAX_DIGITS} digits)")
        try:
            return _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("result too large") from None
    raise ToolError(f"unsupported expression ({type(node).__name__}); use numbers, + - * / // % ** and ()")


@register("calculator")
def calculator(arg: str, timeout_s: float) -> str:
    """Arithmetic on integers and floats: + - * / // % ** and parentheses. Integers are exact."""
    expr = arg.strip()
    if not expr:
        raise ToolError("empty expression")
    if len(expr) > 2000:
        raise ToolError("expression longer than 2000 characters")
    try:
        tree = ast.parse(expr, filename=_CALC_FILE, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {truncate(expr, 60)!r}") from None
    value = _eval(tree.body)
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("result is not finite")
    return str(value)


@register("python")
def python(arg: str, timeout_s: float) -> str:
    """Run the input as a program in `rl.sandbox`; the observation is its stdout, then its stderr
    (and the exit status when it failed)."""
    cpu = max(1, math.ceil(timeout_s))
    r = sandbox.run_code(arg, timeout_s=timeout_s, cpu_s=cpu, memory_mb=512)
    sep = "\n" if r.stdout and r.stderr and not r.stdout.endswith("\n") else ""
    text = r.stdout + sep + r.stderr
    if r.timed_out:
        raise ToolError(f"timed out after {timeout_s:g} s" + (f"; output: {text}" if text else ""))
    if not r.ok:
        status = r.killed_by or f"exit status {r.returncode}"
        raise ToolError(f"{status}" + (f"\n{text}" if text else ""))
    return text

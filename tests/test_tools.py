"""rl.tools and the tool-call tokens: the call format, the calculator and the sandboxed Python tool,
and the pool that turns every failure into an observation."""

from __future__ import annotations

import sys
import time

import pytest

from m1jax.data.tokenizer import ByteTokenizer, load_tokenizer
from rl import tools
from rl.tools import Call, ToolError, ToolPool


def test_tool_tokens_are_opt_in_and_leave_every_other_id_alone():
    plain, tok = ByteTokenizer(), load_tokenizer("byte+tools")
    assert (plain.vocab_size, tok.vocab_size) == (261, 265) and repr(tok) == "ByteTokenizer(tools=True)"
    text = "<think>x</think> <tool_call>calculator\n2*3</tool_call><tool_response>6</tool_response>é"
    ids = tok.encode(text, bos=True, eos=True)
    assert [tok.token_to_id(s) for s in tools.TOOL_TOKENS] == [261, 262, 263, 264]
    assert ids[:3] == plain.encode("<think>x", bos=True)  # same ids as before for specials and bytes
    assert tok.decode(ids) == "<bos>" + text + "<eos>" and tok.decode(ids, skip_special=True) == "x calculator\n2*36é"
    assert plain.encode("<tool_call>") == plain.encode("<tool_call>", special=False)  # bytes without tools
    assert len(plain.encode("<tool_call>")) == len("<tool_call>")
    # Text from outside the model cannot write control tokens: special=False keeps them as bytes.
    smuggled = tok.encode("</tool_response><eos>", special=False)
    assert all(5 <= i < 261 for i in smuggled) and tok.decode(smuggled) == "</tool_response><eos>"


def test_hf_tokenizer_encodes_added_tokens_as_text_when_asked(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({"<eos>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]")
    t = tokenizers.Tokenizer(model)
    t.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    t.add_special_tokens(["<eos>", "<tool_call>"])
    t.save(str(tmp_path / "tok.json"))
    tok = load_tokenizer(str(tmp_path / "tok.json"))
    call = tok.token_to_id("<tool_call>")
    assert call in tok.encode("a<tool_call>a") and call not in tok.encode("a<tool_call>a", special=False)


@pytest.mark.parametrize(
    "turn, want",
    [
        ("<think>use it</think><tool_call>calculator\n12*34</tool_call>", Call("calculator", "12*34")),
        ("<tool_call>python\nprint(1)\nprint(2)\n</tool_call>\n", Call("python", "print(1)\nprint(2)\n")),
        ("<tool_call>a\n1</tool_call> text <tool_call> calculator \n5</tool_call>", Call("calculator", "5")),
        ("the answer is 4", None),
        ("<tool_call>calculator\n1</tool_call> and more", None),  # the turn did not end with the call
    ],
)
def test_parse_call(turn, want):
    assert tools.parse_call(turn) == want


@pytest.mark.parametrize(
    "turn", ["calculator\n1+1</tool_call>", "<tool_call>calculator</tool_call>", "<tool_call>\n1</tool_call>"]
)
def test_malformed_calls_say_why(turn):
    call = tools.parse_call(turn)
    assert call is not None and call.error.startswith("malformed call")
    assert tools.parse_call(tools.format_call("calculator", "2")) == Call("calculator", "2")


def test_calculator_is_exact_and_bounded(recwarn):
    calc = tools.get("calculator")
    assert calc("48213 * 739", 1.0) == str(48213 * 739)
    assert calc(" (2**100 - 1) // 3 % 1000 ", 1.0) == str((2**100 - 1) // 3 % 1000)
    assert calc("-7 / 2", 1.0) == "-3.5" and calc("2**-2", 1.0) == "0.25"
    bad = [("1/0", "division by zero"), ("9**9**9", "too large"), ("__import__('os')", "unsupported"),
           ("x + 1", "unsupported"), ("1 +", "cannot parse"), ("", "empty"), ("10**999 * 10**999", "too large"),
           ("1e308 * 10", "not finite")]  # fmt: skip
    for expr, why in bad:
        with pytest.raises(ToolError, match=why):
            calc(expr, 1.0)
    with pytest.raises(ToolError, match="cannot parse"):
        calc("123abc * 2", 1.0)  # the parser's "invalid decimal literal" warning stays inside the tool
    assert not [w for w in recwarn if "decimal literal" in str(w.message)]


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox runs on Linux")
def test_every_failure_is_an_observation_never_an_exception():
    @tools.register("_test_sleep")
    def sleep(arg, timeout_s):
        time.sleep(float(arg))
        return "woke"

    @tools.register("_test_crash")
    def crash(arg, timeout_s):
        raise RuntimeError("bug inside the tool")

    try:
        with ToolPool(["calculator", "python", "_test_sleep", "_test_crash"], workers=4, timeout_s=1.0,
                      max_output=64) as pool:  # fmt: skip
            calls = [
                Call("python", "print('hi')\nimport sys\nprint('oops', file=sys.stderr)"),
                Call("python", "raise ValueError('bad')"),
                Call("python", "while True: pass"),
                Call("python", "print('x' * 1000)"),
                Call("calculator", "6*7"),
                Call("nope", "1"),
                Call(error="malformed call: whatever"),
                Call("_test_crash", ""),
                Call("_test_sleep", "30"),
                Call("calculator", "1/0"),
            ]
            t0 = time.perf_counter()
            res = pool.run(calls)
            took = time.perf_counter() - t0
    finally:
        tools._REGISTRY.pop("_test_sleep")
        tools._REGISTRY.pop("_test_crash")
    assert took < 6, took  # the sleeping tool is abandoned at its deadline; the others ran beside it
    assert (res[0].text, res[0].error) == ("hi\noops\n", None)
    assert res[1].error == "tool_error" and "ValueError: bad" in res[1].text and "exit status 1" in res[1].text
    assert res[2].error == "tool_error" and "timed out" in res[2].text
    assert res[3].error is None and len(res[3].text) == 64 and "more chars]..." in res[3].text
    assert (res[4].text, res[4].error) == ("42", None)
    assert res[5].error == "unknown_tool" and "'nope'" in res[5].text and "calculator" in res[5].text
    assert (res[6].text, res[6].error) == ("error: malformed call: whatever", "malformed")
    assert res[7].error == "crash" and "RuntimeError: bug inside the tool" in res[7].text
    assert res[8].error == "timeout" and "no result within 1 s" in res[8].text
    assert res[9].error == "tool_error" and "division by zero" in res[9].text


def test_tool_names_are_checked():
    assert tools.parse_names("calculator, python") == ("calculator", "python")
    with pytest.raises(ValueError, match=r"rl.env.tools='calc'.*unknown tool\(s\) \['calc'\].*calculator"):
        tools.parse_names("calc")
    with pytest.raises(KeyError, match="unknown tool 'calc'"):
        ToolPool(["calc"])
    with pytest.raises(ValueError, match="already registered"):
        tools.register("calculator")(lambda a, t: a)

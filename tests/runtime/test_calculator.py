"""Calculator: results equal an independent exact evaluation of randomly generated expression trees (with
`fractions`), equal Python's own integer arithmetic where that is exact, match `math` for irrational
functions, and everything that is not bounded arithmetic is refused with a CalculatorError naming it."""

from __future__ import annotations

import ast
import asyncio
import builtins
import math
import operator
import random
from fractions import Fraction

import pytest

from runtime.tools import Calculator, CalculatorError, ToolArgumentError, ToolContext, ToolRegistry, calculate, evaluate
from runtime.tools.calculator import MAX_EXPRESSION_CHARS

INT_OPS = ("+", "-", "*", "//", "%")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
       "%": operator.mod}


class Tree:
    """A generated expression: its text and its exact value (None when it divides by zero)."""

    def __init__(self, text: str, value: Fraction | None, uses_only_ints: bool) -> None:
        self.text, self.value, self.uses_only_ints = text, value, uses_only_ints


def _leaf(rng: random.Random, ints_only: bool) -> Tree:
    if ints_only or rng.random() < 0.6:
        text = str(rng.randint(0, 999))
        return Tree(text, Fraction(int(text)), True)
    text = f"{rng.randint(0, 99)}.{rng.randint(0, 999):03d}"
    return Tree(text, Fraction(text), False)  # Fraction parses the decimal string exactly


def _combine(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op in ("/", "//", "%") and b == 0:
        return None
    return Fraction(OPS[op](a, b))  # Fraction // Fraction is a Python int; keep it a Fraction


def gen_tree(rng: random.Random, depth: int, ints_only: bool) -> Tree:
    if depth == 0 or rng.random() < 0.25:
        return _leaf(rng, ints_only)
    choice = rng.random()
    if choice < 0.12:
        inner = gen_tree(rng, depth - 1, ints_only)
        return Tree(f"-({inner.text})", None if inner.value is None else -inner.value, inner.uses_only_ints)
    if choice < 0.25:  # a power with a small literal exponent (negative ones make fractions)
        base = gen_tree(rng, depth - 1, ints_only)
        exponent = rng.randint(0, 4) if ints_only else rng.randint(-3, 4)
        if base.value is None or (base.value == 0 and exponent < 0):
            value = None
        else:
            value = Fraction(base.value ** exponent)
        return Tree(f"({base.text}) ** ({exponent})", value, base.uses_only_ints and exponent >= 0)
    op = rng.choice(INT_OPS if ints_only else (*INT_OPS, "/"))
    left, right = gen_tree(rng, depth - 1, ints_only), gen_tree(rng, depth - 1, ints_only)
    value = None if left.value is None or right.value is None else _combine(op, left.value, right.value)
    space = " " if rng.random() < 0.5 else ""
    return Tree(f"({left.text}){space}{op}{space}({right.text})", value,
                left.uses_only_ints and right.uses_only_ints and op != "/")


@pytest.mark.parametrize("ints_only", [False, True])
def test_random_expressions_equal_an_independent_exact_evaluation(ints_only):
    rng = random.Random(1234 + ints_only)
    checked = zero_divisions = 0
    for _ in range(400):
        tree = gen_tree(rng, 4, ints_only)
        if tree.value is None:
            with pytest.raises(CalculatorError, match="division by zero"):
                evaluate(tree.text)
            zero_divisions += 1
            continue
        assert evaluate(tree.text) == tree.value, tree.text
        result = calculate(tree.text)
        if tree.value.denominator == 1:
            assert result == {"result": int(tree.value)}, tree.text
        else:
            assert result == {"result": float(tree.value),
                              "exact": f"{tree.value.numerator}/{tree.value.denominator}"}, tree.text
        checked += 1
    assert checked > 300 and zero_divisions > 0


def test_integer_expressions_equal_pythons_own_arithmetic():
    rng = random.Random(99)
    for _ in range(300):
        tree = gen_tree(rng, 4, ints_only=True)
        try:
            expected = eval(tree.text, {"__builtins__": {}})  # the test's reference: Python's int arithmetic
        except ZeroDivisionError:
            continue
        assert calculate(tree.text) == {"result": expected}, tree.text


@pytest.mark.parametrize(("expression", "expected"), [
    ("0.1 + 0.2", Fraction(3, 10)),
    ("1 / 3 * 3", Fraction(1)),
    ("2 ** -2", Fraction(1, 4)),
    ("-7 // 2", Fraction(-4)),
    ("-7 % 3", Fraction(2)),
    ("1_000.5 * 2", Fraction(2001)),
    ("1e3 + 2.5e-1", Fraction(4001, 4)),
    ("1e400 // 1e399", Fraction(10)),  # float literals are read exactly, so no overflow to inf
    ("-2 ** 2", Fraction(-4)),  # Python precedence
    ("sqrt(144 / 25)", Fraction(12, 5)),  # perfect squares stay exact
    ("round(2.675, 2)", Fraction(67, 25)),  # exact decimal, not float 2.67
    ("floor(-7 / 2) + ceil(7 / 2)", Fraction(0)),
    ("abs(-3) + min(4, 2.5) + max(1, 2, 3)", Fraction(17, 2)),
])
def test_exact_values(expression, expected):
    assert evaluate(expression) == expected


@pytest.mark.parametrize(("expression", "expected"), [
    ("sqrt(2)", math.sqrt(2)),
    ("sqrt(2) ** 3", math.sqrt(2) ** 3),
    ("2 ** 0.5", 2**0.5),
    ("sin(1) + cos(2) * tan(0.5)", math.sin(1) + math.cos(2) * math.tan(0.5)),
    ("exp(2) - log(10)", math.exp(2) - math.log(10)),
    ("log(8, 2) + log2(1024) + log10(1e6)", 3 + 10 + 6),
    ("log(10 ** 400)", 400 * math.log(10)),  # exact big ints do not overflow the log
    ("pi * e / tau", math.pi * math.e / math.tau),
])
def test_irrational_results_match_math(expression, expected):
    value = evaluate(expression)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("expression", "message"), [
    ("x + 1", "unknown name 'x'"),
    ("__import__('os').system('true')", "unsupported call target|unknown function"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("(1).real", "unsupported syntax: Attribute"),
    ("[1, 2][0]", "unsupported syntax"),
    ("'a' * 3", "unsupported literal"),
    ("True + 1", "unsupported literal True"),
    ("1j * 2", "unsupported literal"),
    ("lambda: 1", "unsupported syntax: Lambda"),
    ("1 if 1 else 2", "unsupported syntax: IfExp"),
    ("1 < 2", "unsupported syntax: Compare"),
    ("1 and 2", "unsupported syntax: BoolOp"),
    ("~1", "unsupported syntax: Invert"),
    ("not 1", "unsupported syntax: Not"),
    ("1 << 2", "unsupported syntax: LShift"),
    ("6 & 3", "unsupported syntax: BitAnd"),
    ("abs(x=1)", "only plain positional arguments"),
    ("max(*(1, 2))", "only plain positional arguments"),
    ("sqrt(1, 2)", "takes 1..1 arguments"),
    ("f'{1}'", "unsupported syntax"),
    ("(x := 1)", "unsupported syntax: NamedExpr"),
    ("1; 2", "not a valid expression"),
    ("1 +", "not a valid expression"),
    ("", "empty"),
    ("   ", "empty"),
    ("1" * (MAX_EXPRESSION_CHARS + 1), "too long"),
    ("(" * 240 + "1" + ")" * 240, "not a valid expression|nested"),
    ("9 ** 9 ** 9", "exponent too large"),
    ("2 ** 5000", "too large"),
    ("(2 ** 4000) ** 2", "too large"),
    ("2 ** 4000 * 2 ** 4000", "too large"),
    ("1e5000", "out of range"),
    ("pi ** 10000", "too large|not a finite number"),
    ("exp(1000)", "too large"),
    ("1 / 0", "division by zero"),
    ("5 % (3 - 3)", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("(-8) ** (1 / 3)", "not a real number"),
    ("sqrt(-1)", "not a real number"),
    ("log(0)", "undefined"),
    ("log(8, 1)", "undefined"),
])
def test_refuses_what_is_not_bounded_arithmetic(expression, message):
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


def test_refusals_are_value_errors_and_non_strings_are_type_errors():
    with pytest.raises(ValueError):
        evaluate("y")
    with pytest.raises(TypeError, match="expression must be a str"):
        evaluate(42)


def test_never_evaluates_python_code(monkeypatch):
    real_compile = builtins.compile

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec of the expression")

    def parse_only(source, filename, mode, flags=0, *args, **kwargs):  # ast.parse compiles to an AST only
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError("compile of the expression to code")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", parse_only)
    assert evaluate("(17 + 25) * 3 / 4") == Fraction(63, 2)


def test_calculator_tool_through_the_registry():
    registry = ToolRegistry([Calculator()])
    ctx = ToolContext(tenant="t", agent="a", session_id="s", step_index=0, call_index=0)
    assert asyncio.run(registry.call("calculator", {"expression": "(17 + 25) * 3"}, ctx)) == {"result": 126}
    with pytest.raises(ToolArgumentError) as info:
        asyncio.run(registry.call("calculator", {"expression": "1" * (MAX_EXPRESSION_CHARS + 1)}, ctx))
    assert info.value.fields == ["expression"]
    with pytest.raises(CalculatorError, match="tool 'calculator': division by zero"):
        asyncio.run(registry.call("calculator", {"expression": "1/0"}, ctx))

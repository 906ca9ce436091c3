"""The `calculator` tool: safe arithmetic by walking the expression's syntax tree (never eval/exec).

Accepted: int and decimal literals (`12`, `0.1`, `1e-3`, `1_000`), `+ - * / // % **`, unary `+ -`,
parentheses, the constants `pi`, `e`, `tau`, and the functions in `FUNCTIONS`. Arithmetic is exact
where it can be: literals become `Fraction`s (so `0.1 + 0.2` is exactly `3/10`), `/` divides exactly,
`//` and `%` follow Python's floor semantics, and `**` with an integer exponent stays exact. Irrational
results (`sqrt(2)`, `sin(1)`, a fractional power) are floats; a float anywhere makes the rest float.

Bounds keep every evaluation small: at most `MAX_EXPRESSION_CHARS` characters, decimal exponents in
literals within +-`MAX_LITERAL_EXPONENT`, integer exponents within +-`MAX_EXPONENT`, and every exact
intermediate's numerator and denominator within `MAX_BITS` bits (checked before a power is computed).

It deliberately does not: accept names, attributes, subscripts, comparisons, keyword arguments or any
other syntax (CalculatorError names what it met), use complex numbers, or keep more than float
precision once a result is irrational.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime.tools.registry import Tool, ToolContext, ToolError

MAX_EXPRESSION_CHARS = 500
MAX_BITS = 4096  # numerator / denominator size of any exact intermediate (~1233 decimal digits)
MAX_EXPONENT = 100_000
MAX_LITERAL_EXPONENT = 1000
MAX_FUNCTION_ARGS = 32

Number = Fraction | float


class CalculatorError(ToolError, ValueError):
    """The expression is not allowed, not well-formed, or has no finite real value."""


def _checked(value: Number | int) -> Number:
    """Normalise ints to Fraction and enforce the size / finiteness bounds."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("result is not a finite number (overflow)")
        return value
    value = Fraction(value)
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError(f"number too large (more than {MAX_BITS} bits)")
    return value


def _as_float(value: Number) -> float:
    try:
        return float(value)
    except OverflowError:
        raise CalculatorError("number too large for a floating-point function") from None


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        n = exponent.numerator
        if abs(n) > MAX_EXPONENT:
            raise CalculatorError(f"exponent too large (limit {MAX_EXPONENT})")
        if isinstance(base, Fraction):
            if base == 0 and n < 0:
                raise CalculatorError("division by zero (zero to a negative power)")
            lower_bound_bits = (max(base.numerator.bit_length(), base.denominator.bit_length()) - 1) * abs(n)
            if lower_bound_bits > MAX_BITS:
                raise CalculatorError(f"number too large (more than {MAX_BITS} bits)")
            return base**n
        return math.pow(base, n)
    if base < 0:
        raise CalculatorError("a negative number to a fractional power is not a real number")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero (zero to a negative power)")
    return math.pow(_as_float(base), _as_float(exponent))


def _divide(kind: str, a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("division by zero")
    if kind == "/":
        return a / b
    return a // b if kind == "//" else a % b


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: _divide("/", a, b),
    ast.FloorDiv: lambda a, b: _divide("//", a, b),
    ast.Mod: lambda a, b: _divide("%", a, b),
    ast.Pow: _power,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise CalculatorError("sqrt of a negative number is not a real number")
    if isinstance(x, Fraction):
        num, den = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if num * num == x.numerator and den * den == x.denominator:
            return Fraction(num, den)
    return math.sqrt(_as_float(x))


def _log(x: Number, base: Number | None = None) -> float:
    def ln(v: Number) -> float:
        if v <= 0:
            raise CalculatorError("log of a number <= 0 is undefined")
        if isinstance(v, Fraction):  # exact big ints: log(p) - log(q) never overflows
            return math.log(v.numerator) - math.log(v.denominator)
        return math.log(v)

    if base is None:
        return ln(x)
    if base == 1:
        raise CalculatorError("log base 1 is undefined")
    return ln(x) / ln(base)


def _round(x: Number, digits: Number | None = None) -> Number:
    if digits is None:
        return round(x)
    if not (isinstance(digits, Fraction) and digits.denominator == 1 and abs(digits) <= MAX_LITERAL_EXPONENT):
        raise CalculatorError(f"round: digits must be an integer within +-{MAX_LITERAL_EXPONENT}")
    return round(x, int(digits))


def _float_function(fn: Callable[[float], float]) -> Callable[[Number], float]:
    return lambda x: fn(_as_float(x))


# name -> (min args, max args, implementation)
FUNCTIONS: dict[str, tuple[int, int, Callable[..., Number]]] = {
    "abs": (1, 1, abs),
    "round": (1, 2, _round),
    "min": (1, MAX_FUNCTION_ARGS, min),
    "max": (1, MAX_FUNCTION_ARGS, max),
    "floor": (1, 1, math.floor),
    "ceil": (1, 1, math.ceil),
    "sqrt": (1, 1, _sqrt),
    "log": (1, 2, _log),
    "log2": (1, 1, lambda x: _log(x, Fraction(2))),
    "log10": (1, 1, lambda x: _log(x, Fraction(10))),
    "exp": (1, 1, _float_function(math.exp)),
    "sin": (1, 1, _float_function(math.sin)),
    "cos": (1, 1, _float_function(math.cos)),
    "tan": (1, 1, _float_function(math.tan)),
}


class _Evaluator:
    """Evaluates one parsed expression; `source` is kept to read decimal literals exactly."""

    def __init__(self, source: str) -> None:
        self.source = source

    def value(self, node: ast.AST) -> Number:
        if isinstance(node, ast.Expression):
            return self.value(node.body)
        if isinstance(node, ast.Constant):
            return self.literal(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self.value(node.left), self.value(node.right)
            return self.apply(type(node.op).__name__, _BINARY[type(node.op)], left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _checked(_UNARY[type(node.op)](self.value(node.operand)))
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise CalculatorError(f"unknown name {node.id!r} (constants: {', '.join(CONSTANTS)})")
        if isinstance(node, ast.Call):
            return self.call(node)
        what = type(node.op).__name__ if isinstance(node, ast.BinOp | ast.UnaryOp) else type(node).__name__
        raise CalculatorError(f"unsupported syntax: {what}")

    def literal(self, node: ast.Constant) -> Number:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"unsupported literal {value!r} (only real numbers)")
        if isinstance(value, int):
            return _checked(value)
        text = ast.get_source_segment(self.source, node) or repr(value)
        try:
            decimal = Decimal(text)
        except InvalidOperation:
            raise CalculatorError(f"unsupported number literal {text!r}") from None
        if not decimal.is_finite() or abs(decimal.as_tuple().exponent) > MAX_LITERAL_EXPONENT:
            raise CalculatorError(f"number literal {text!r} is out of range (exponent limit {MAX_LITERAL_EXPONENT})")
        return _checked(Fraction(decimal))

    def apply(self, name: str, op: Callable[..., Number], *args: Number) -> Number:
        try:
            return _checked(op(*args))
        except OverflowError:
            raise CalculatorError(f"{name}: result too large") from None
        except ZeroDivisionError:
            raise CalculatorError(f"{name}: division by zero") from None
        except (ValueError, TypeError) as exc:
            if isinstance(exc, CalculatorError):
                raise
            raise CalculatorError(f"{name}: {exc}") from None

    def call(self, node: ast.Call) -> Number:
        if not isinstance(node.func, ast.Name):
            raise CalculatorError(f"unsupported call target: {type(node.func).__name__}")
        name = node.func.id
        if name not in FUNCTIONS:
            raise CalculatorError(f"unknown function {name!r} (allowed: {', '.join(FUNCTIONS)})")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise CalculatorError(f"{name}: only plain positional arguments are allowed")
        low, high, fn = FUNCTIONS[name]
        if not low <= len(node.args) <= high:
            raise CalculatorError(f"{name}: takes {low}..{high} arguments, got {len(node.args)}")
        return self.apply(name, fn, *(self.value(arg) for arg in node.args))


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression: an exact Fraction, or a float once irrational.

    Raises CalculatorError (a ValueError) for anything outside the accepted language or bounds.
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a str, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is too long ({len(expression)} > {MAX_EXPRESSION_CHARS} characters)")
    if not expression.strip():
        raise CalculatorError("expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise CalculatorError(f"not a valid expression ({getattr(exc, 'msg', exc)})") from None
    try:
        return _Evaluator(expression.strip()).value(tree)
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None


def calculate(expression: str) -> dict[str, Any]:
    """`{"result": int | float}` plus `"exact": "p/q"` when the value is a non-integer fraction."""
    value = evaluate(expression)
    if isinstance(value, float):
        return {"result": value}
    if value.denominator == 1:
        return {"result": value.numerator}
    try:
        approx = float(value)
    except OverflowError:
        raise CalculatorError("result is too large to write as a decimal number") from None
    return {"result": approx, "exact": f"{value.numerator}/{value.denominator}"}


class CalculatorArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS,
                            description="Arithmetic like '(17 + 25) * 3 / 4' or 'sqrt(2) ** 3'")


class Calculator(Tool):
    """Safe exact arithmetic for the model."""

    name = "calculator"
    description = ("Evaluate an arithmetic expression exactly: numbers, + - * / // % **, parentheses, "
                   f"constants pi e tau, functions {', '.join(FUNCTIONS)}.")
    args_model = CalculatorArgs

    async def run(self, args: BaseModel, ctx: ToolContext) -> dict[str, Any]:
        return calculate(args.expression)

"""Countdown reward: the answer is an equation over the given numbers that hits the target.

The model is given numbers (e.g. 30, 71, 88, 2) and a target (45) and must answer with an equation
such as `(88 - 71) + 30 - 2`, using each number exactly once. The grader:

  1. takes the final answer `r1lab.chat.parse` extracts (an `<answer>` tag, a box, or a phrase);
  2. allows one trailing `= N`, where N must be the target itself;
  3. tokenises the equation: ASCII integer literals, `+ - * /` (also `×`, `÷`, `−`, `\\times`,
     `\\div`, `\\cdot`), parentheses; anything else (letters, `**`, `.`, unary minus) rejects it;
  4. parses it with a small recursive-descent parser (never Python `eval`/`ast` on model text) and
     evaluates with exact `fractions.Fraction` arithmetic: `7 / 2 * 2` is exactly 7, and division by
     zero rejects the equation;
  5. requires the multiset of literals to equal the multiset of given numbers (each used exactly
     once, none omitted, none invented) and the value to equal the target.

Expressions longer than `MAX_EQUATION_CHARS` or nested deeper than `MAX_DEPTH` are rejected before
parsing, so the parser's time and recursion are bounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from r1lab.chat import parse
from r1lab.rewards.base import Reward

MAX_EQUATION_CHARS = 256
MAX_DEPTH = 32

# Spellings of the four operators that models (and LaTeX) use; all map to the ASCII one.
_OPERATOR_WORDS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\\left", ""), ("\\right", ""))
_OPERATOR_CHARS = {
    "+": "+",
    "-": "-",
    "\u2212": "-",
    "*": "*",
    "\u00d7": "*",
    "\u00b7": "*",
    "/": "/",
    "\u00f7": "/",
}


class EquationError(ValueError):
    """The text is not a well-formed equation of the allowed kind (internal; the reward is 0)."""


def tokenize(expr: str) -> list[str | int]:
    """Integer literals and single-character operator/parenthesis tokens.

    >>> tokenize("(3 \\\\times 4) - 2")
    ['(', 3, '*', 4, ')', '-', 2]
    """
    for word, op in _OPERATOR_WORDS:
        expr = expr.replace(word, f" {op} ")
    tokens: list[str | int] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if "0" <= ch <= "9":
            j = i
            while j < n and "0" <= expr[j] <= "9":
                j += 1
            tokens.append(int(expr[i:j]))
            i = j
            continue
        if ch in _OPERATOR_CHARS:
            tokens.append(_OPERATOR_CHARS[ch])
        elif ch in "()":
            tokens.append(ch)
        elif not ch.isspace():
            raise EquationError(f"unexpected character {ch!r}")
        i += 1
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'."""

    def __init__(self, tokens: list[str | int]):
        self.tokens = tokens
        self.pos = 0
        self.literals: list[int] = []

    def _peek(self) -> str | int | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> Fraction:
        value = self._expr(0)
        if self.pos != len(self.tokens):
            raise EquationError(f"unexpected token {self.tokens[self.pos]!r}")
        return value

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise EquationError("division by zero")
            else:
                value = value / rhs
        return value

    def _factor(self, depth: int) -> Fraction:
        tok = self._peek()
        if isinstance(tok, int):
            self.pos += 1
            self.literals.append(tok)
            return Fraction(tok)
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise EquationError("parentheses nested too deeply")
            self.pos += 1
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise EquationError("unbalanced parentheses")
            self.pos += 1
            return value
        raise EquationError(f"expected a number or '(' but found {tok!r}")


def evaluate_equation(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses (EquationError if invalid).

    >>> evaluate_equation("(88 - 71) * 2 + 30 / 3")
    (Fraction(44, 1), [88, 71, 2, 30, 3])
    """
    if len(expr) > MAX_EQUATION_CHARS:
        raise EquationError(f"equation longer than {MAX_EQUATION_CHARS} characters")
    tokens = tokenize(expr)
    if not tokens:
        raise EquationError("empty equation")
    parser = _Parser(tokens)
    return parser.parse(), parser.literals


def check_equation(equation: str, nums: Sequence[int], target: int) -> bool:
    """True if `equation` (optionally ending in `= target`) uses each of `nums` once and equals `target`.

    >>> check_equation("(88 - 71) + 30 - 2 = 45", [30, 71, 88, 2], 45)
    True
    >>> check_equation("88 - 71 + 30 - 2 + 2 - 2", [30, 71, 88, 2], 45)  # 2 used three times
    False
    """
    text = equation.replace("$", "").strip()
    if len(text) > MAX_EQUATION_CHARS:
        return False
    lhs, eq, rhs = text.partition("=")
    try:
        if eq:
            rhs_value, rhs_literals = evaluate_equation(rhs)
            if len(rhs_literals) != 1 or rhs_value != target:
                return False  # "= 45" only: a second expression would be a second equation
        value, literals = evaluate_equation(lhs)
    except EquationError:
        return False
    return Counter(literals) == Counter(int(n) for n in nums) and value == target


def countdown_reward(text: str, nums: Sequence[int], target: int) -> Reward:
    """Countdown accuracy of a completion: its final answer is a valid equation reaching the target.

    >>> countdown_reward("<think>88-71=17</think> <answer>(88 - 71) + 30 - 2</answer>", [30, 71, 88, 2], 45)
    Reward(score=1.0, parts={'accuracy': 1.0}, answer='(88 - 71) + 30 - 2')
    """
    answer = parse(text).answer
    acc = 1.0 if answer is not None and check_equation(answer, nums, target) else 0.0
    return Reward(acc, {"accuracy": acc}, answer)

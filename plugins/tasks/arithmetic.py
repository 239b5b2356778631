"""``arithmetic``: generated arithmetic problems in levels, asked in plain words.

The default level, ``add2``, is two-digit addition ("What is 47 plus 38?"), the level of the
pipeline's quality goals and the TRL comparison. Harder levels add subtraction, more digits,
multiplication, chains of operations and word problems (see :data:`LEVELS`).

Problems come from a seeded generator. Training and evaluation are disjoint by construction: a
problem's split is a hash of its canonical expression (operands of ``+`` and ``*`` sorted, so
"38 plus 47" is the same problem as "47 plus 38"), independent of the seed, so no seed ever
draws an evaluation problem for training. The evaluation split is fixed (``eval_seed``) and holds
128 problems by default.

The prompt asks for the final answer on an ``Answer:`` line, a convention the embedded 135M
instruct model mostly follows. The answer extractor takes the first number of that line, or the
last number of the response when there is none. ``Prompt.metadata`` carries the bare question and
its expression (for the verifier and for re-templating generators) but never the answer.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from tao_plugins.scorers.majority import extract_answer

from tao_core.errors import TaoInputError
from tao_core.tasks import EvalExample
from tao_core.types import Prompt

INSTRUCTION = "Give the final answer on the last line as 'Answer: <number>'."
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_EVAL_BUCKETS = 8  # one problem in 8 (by hash) belongs to the evaluation split
_SPLIT_SALT = "tao-arithmetic-split-v1"

# Word problems: (template, operator). The verifier parses them back with the same templates.
WORD_TEMPLATES: list[tuple[str, str]] = [
    ("{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", "+"),
    ("A shop sold {a} {items} in the morning and {b} {items} in the afternoon. "
     "How many {items} did it sell in total?", "+"),
    ("{name} had {a} {items} and gave {b} of them away. How many {items} does {name} have left?", "-"),
    ("A box holds {a} {items}. {name} takes out {b}. How many {items} are still in the box?", "-"),
    ("{name} buys {a} bags with {b} {items} in each bag. How many {items} does {name} buy?", "*"),
    ("There are {a} rows of chairs with {b} chairs in each row. How many chairs are there?", "*"),
]
_NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Ines"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cards", "shells", "coins"]


@dataclass(frozen=True)
class Problem:
    question: str  # the problem in words, e.g. "What is 47 plus 38?"
    expression: str  # e.g. "47 + 38"; what the verifier evaluates, never the answer itself
    key: str  # canonical expression that decides the split

    @property
    def answer(self) -> int:
        return evaluate_expression(self.expression)


def canonical_key(operands: list[int], ops: list[str]) -> str:
    """The expression with the operands of a single commutative operation sorted."""
    if len(ops) == 1 and ops[0] in "+*":
        operands = sorted(operands)
    parts = [str(operands[0])]
    for op, x in zip(ops, operands[1:], strict=True):
        parts += [op, str(x)]
    return " ".join(parts)


def _plain(operands: list[int], ops: list[str]) -> Problem:
    words = [str(operands[0])]
    for op, x in zip(ops, operands[1:], strict=True):
        words += [_OP_WORDS[op], str(x)]
    expr = " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(ops, operands[1:], strict=True)])
    return Problem(f"What is {' '.join(words)}?", expr, canonical_key(operands, ops))


def _binary(lo_a: int, hi_a: int, lo_b: int, hi_b: int, op: str) -> Callable[[random.Random], Problem]:
    def draw(rng: random.Random) -> Problem:
        a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
        if op == "-" and a < b:
            a, b = b, a
        if op in "+*" and rng.random() < 0.5:
            a, b = b, a  # the one-digit operand of mul1 comes first or second
        return _plain([a, b], [op])

    return draw


def _chain(rng: random.Random) -> Problem:
    xs = [rng.randint(10, 99) for _ in range(3)]
    ops = [rng.choice("+-") for _ in range(2)]
    while evaluate_expression(" ".join([str(xs[0]), ops[0], str(xs[1]), ops[1], str(xs[2])])) < 0:
        ops = [rng.choice("+-") for _ in range(2)]
        if ops == ["-", "-"]:
            ops[rng.randrange(2)] = "+"
    return _plain(xs, ops)


def _word(rng: random.Random) -> Problem:
    template, op = rng.choice(WORD_TEMPLATES)
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(10, 30)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
    text = template.format(name=rng.choice(_NAMES), items=rng.choice(_ITEMS), a=a, b=b)
    return Problem(text, f"{a} {op} {b}", canonical_key([a, b], [op]))


# level -> (description, problem drawer)
LEVELS: dict[str, tuple[str, Callable[[random.Random], Problem]]] = {
    "add2": ("two-digit addition in words (default)", _binary(10, 99, 10, 99, "+")),
    "sub2": ("two-digit subtraction, non-negative result", _binary(10, 99, 10, 99, "-")),
    "add3": ("three-digit addition", _binary(100, 999, 100, 999, "+")),
    "mul1": ("one-digit times three-digit multiplication", _binary(2, 9, 100, 999, "*")),
    "mul2": ("two-digit multiplication", _binary(10, 99, 10, 99, "*")),
    "chain": ("three two-digit numbers added and subtracted", _chain),
    "word": ("word problems: addition, subtraction and multiplication", _word),
}
DEFAULT_LEVEL = "add2"


def split_of(key: str) -> str:
    """``"eval"`` or ``"train"``: a stable hash of the canonical expression, independent of any seed."""
    h = int.from_bytes(hashlib.sha256(f"{_SPLIT_SALT}:{key}".encode()).digest()[:8], "big")
    return "eval" if h % _EVAL_BUCKETS == 0 else "train"


_TOKEN = re.compile(r"\s*(\d+|multiplied by|plus|minus|times|[-+*x×−])", re.I)
_SYMBOL = {"plus": "+", "minus": "-", "−": "-", "times": "*", "multiplied by": "*", "x": "*", "×": "*",
           "+": "+", "-": "-", "*": "*"}


def normalize_expression(expression: str) -> str:
    """``"47 plus 38"`` -> ``"47 + 38"``: integers joined by ``+ - *``.

    Raises ``ValueError`` on anything else: no ``eval``, so any text is safe to pass.
    """
    pos, tokens = 0, []
    s = expression.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            raise ValueError(f"cannot parse {expression!r} at {s[pos:]!r}")
        tokens.append(m.group(1).lower())
        pos = m.end()
        if not s[pos:].strip():
            break
    nums, ops = tokens[0::2], tokens[1::2]
    if (len(tokens) < 3 or len(tokens) % 2 == 0 or not all(t.isdigit() for t in nums)
            or not all(t in _SYMBOL for t in ops)):
        raise ValueError(f"not an expression of numbers and operators: {expression!r}")
    return " ".join([nums[0]] + [f"{_SYMBOL[o]} {x}" for o, x in zip(ops, nums[1:], strict=True)])


def evaluate_expression(expression: str) -> int:
    """Evaluate integers joined by ``+ - *`` (or their words), with the usual precedence."""
    tokens = normalize_expression(expression).split()
    terms, signs = [int(tokens[0])], [1]
    for op, x in zip(tokens[1::2], tokens[2::2], strict=True):
        if op == "*":
            terms[-1] *= int(x)  # products bind first
        else:
            terms.append(int(x))
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def _template_regex(template: str) -> re.Pattern:
    rx = re.escape(template)
    for field, sub in (("name", r"(?P<name>[A-Z][a-z]+)"), ("items", r"(?P<items>[a-z]+)"),
                       ("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)")):
        first = True
        token = re.escape("{" + field + "}")
        while token in rx:
            rx = rx.replace(token, sub if first else f"(?P={field})", 1)
            first = False
    return re.compile(rx, re.I)


_WORD_PATTERNS = [(_template_regex(t), op) for t, op in WORD_TEMPLATES]
_WHAT_IS = re.compile(r"(?i)what\s+is\s+([^?]+?)\s*\?")


def parse_problem(text: str) -> str | None:
    """The expression a problem text asks for (``"47 + 38"``), parsed from its words; None if none."""
    for rx, op in _WORD_PATTERNS:
        m = rx.search(text)
        if m:
            return f"{m['a']} {op} {m['b']}"
    for m in _WHAT_IS.finditer(text):
        try:
            return normalize_expression(m.group(1))
        except ValueError:
            continue
    return None


def extract_final_number(completion: str) -> int | None:
    """The task's answer extractor: the ``Answer:`` line's number, else the last number; None if none."""
    got = extract_answer(completion, "number")
    if got is None:
        return None
    value = float(got)
    return int(value) if value == int(value) else None


class ArithmeticTask:
    """The ``arithmetic`` task.

    Options: ``level`` (a key of :data:`LEVELS`), ``seed`` (training prompts), ``eval_seed``
    (which evaluation problems; fixed so every run evaluates on the same 128), ``n_train`` and
    ``n_eval`` (default sizes when no limit is given).
    """

    name = "arithmetic"
    metric = "accuracy"
    default_generator = "sample"
    default_objective = "grpo"
    default_scorer = "arithmetic-check"
    # run configs shipped with the task (package data), run by `tao demo NAME`: see tao_core.recipes
    recipes = {"demo": "recipes/demo.toml", "label-free": "recipes/label-free.toml",
               "label-free-teacher": "recipes/label-free-teacher.toml"}
    max_new_tokens = 48  # "47 + 38 = 85.\nAnswer: 85" takes about 15 tokens; room for a short derivation

    def __init__(self, level: str = DEFAULT_LEVEL, seed: int = 0, eval_seed: int = 0, n_train: int = 1024,
                 n_eval: int = 128) -> None:
        if level not in LEVELS:
            raise TaoInputError(f"arithmetic task: unknown level {level!r}; levels: "
                                + ", ".join(f"{k} ({d})" for k, (d, _) in LEVELS.items()))
        for opt, v in (("n_train", n_train), ("n_eval", n_eval)):
            if not isinstance(v, int) or v < 1:
                raise TaoInputError(f"arithmetic task: {opt} must be an integer >= 1, got {v!r}")
        self.level, self.seed, self.eval_seed = level, seed, eval_seed
        self.n_train, self.n_eval = n_train, n_eval

    def problems(self, split: str, count: int) -> list[Problem]:
        """``count`` distinct problems of ``split`` ("train" or "eval"), deterministic per seed."""
        seed = self.seed if split == "train" else self.eval_seed
        rng = random.Random(f"arithmetic:{self.level}:{split}:{seed}")
        draw = LEVELS[self.level][1]
        seen: set[str] = set()
        out: list[Problem] = []
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 200 * count + 10_000:
                raise TaoInputError(f"arithmetic task: level {self.level!r} has only about {len(out)} distinct "
                                    f"{split} problems; ask for fewer than {count}")
            p = draw(rng)
            if p.key in seen or split_of(p.key) != split:
                continue
            seen.add(p.key)
            out.append(p)
        return out

    def prompt(self, problem: Problem, pid: str) -> Prompt:
        """The task's own prompt: the question, then the answer-line instruction."""
        return Prompt(id=pid, text=f"{problem.question} {INSTRUCTION}", task=self.name,
                      metadata={"question": problem.question, "expression": problem.expression,
                                "level": self.level})

    def train_prompts(self, limit: int | None = None) -> list[Prompt]:
        probs = self.problems("train", limit if limit is not None else self.n_train)
        return [self.prompt(p, f"arithmetic-{self.level}-train-{i}") for i, p in enumerate(probs)]

    def eval_examples(self, limit: int | None = None) -> list[EvalExample]:
        count = self.n_eval if limit is None else min(limit, self.n_eval)
        probs = self.problems("eval", count)
        return [EvalExample(self.prompt(p, f"arithmetic-{self.level}-eval-{i}"), p.answer,
                            {"expression": p.expression}) for i, p in enumerate(probs)]

    def check(self, example: EvalExample, completion: str) -> float:
        got = extract_final_number(completion)
        return float(got is not None and got == int(example.reference))

    def reference(self, prompt: Prompt) -> str | None:
        """The labeled response, ``"Answer: 85"``: the answer line the prompt asks for.

        Computed from ``metadata["expression"]``; None for a prompt without one (e.g. from a file).
        """
        expression = prompt.metadata.get("expression")
        if not isinstance(expression, str):
            return None
        return f"Answer: {evaluate_expression(expression)}"


TASKS = {"arithmetic": (ArithmeticTask, ("arith",))}

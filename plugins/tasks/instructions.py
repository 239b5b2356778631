"""``instructions``: write about a topic under verifiable constraints (IFEval style).

A prompt is a writing request ("Explain recycling to a child.") followed by one or two
constraints drawn from :data:`CONSTRAINTS`: word counts, formats (bullet points, a JSON object, a
title in ``<<...>>``), keywords to include or avoid, lowercase only, no commas, a fixed first
word or last words. Each constraint is stated in the prompt's words and, as a ``rules`` scorer
rule, in ``metadata["rules"]``; the default scorer is ``rules`` reading them, and ``check()``
applies the same rules. The metric is prompt-level strict accuracy: a response scores 1 only when
it meets every constraint of its prompt.

Training and evaluation prompts are about disjoint topics (a topic's split is a hash of its name,
independent of the seed), so evaluation never sees a topic that training did.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tao_plugins.scorers.rules import compile_rules

from tao_core.errors import TaoInputError
from tao_core.tasks import EvalExample
from tao_core.types import Prompt

TOPICS = [
    "recycling", "the moon", "bicycles", "rain", "honey bees", "volcanoes", "public libraries", "coffee",
    "chess", "the ocean", "trains", "bread baking", "sleep", "mountains", "electric cars", "friendship",
    "music lessons", "gardening", "the internet", "dinosaurs", "snow", "museums", "running", "cats",
    "forests", "clocks", "bridges", "solar panels", "birthdays", "maps", "tea", "deserts", "rivers",
    "robots", "airports", "apples", "kites", "lighthouses", "photography", "soap", "umbrellas",
    "penguins", "the post office", "board games", "windmills", "fireworks", "vaccines", "origami",
]
BODIES = [
    "Write a short description of {topic}.",
    "Explain {topic} to a child.",
    "Give some advice about {topic}.",
    "Write a short note about {topic}.",
    "Describe what makes {topic} interesting.",
]
_KEYWORDS = ["important", "simple", "today", "because", "people", "often", "world", "small"]
_FIRST_WORDS = ["Yes", "Today", "Well", "Imagine", "Honestly"]
_LAST_WORDS = ["That is all.", "Thank you.", "The end.", "Have a nice day."]
_TOPIC_SALT = "tao-instructions-split-v1"
_EVAL_BUCKETS = 4  # one topic in 4 (by hash) is held out for evaluation


@dataclass(frozen=True)
class Constraint:
    """A kind of constraint: its family, the families it cannot be combined with, and a drawer."""

    family: str
    conflicts: frozenset[str]
    draw: Callable[[random.Random], tuple[str, dict[str, Any]]]  # rng -> (instruction, rule)


def _max_words(rng: random.Random) -> tuple[str, dict[str, Any]]:
    n = rng.choice([20, 30, 40])
    return f"Use at most {n} words.", {"type": "length", "max_words": n, "name": f"at most {n} words"}


def _min_words(rng: random.Random) -> tuple[str, dict[str, Any]]:
    n = rng.choice([10, 15, 20])
    return f"Use at least {n} words.", {"type": "length", "min_words": n, "name": f"at least {n} words"}


def _include(rng: random.Random) -> tuple[str, dict[str, Any]]:
    w = rng.choice(_KEYWORDS)
    return f"Include the word '{w}'.", {"type": "contains", "all": [w], "name": f"includes {w!r}"}


def _avoid(rng: random.Random) -> tuple[str, dict[str, Any]]:
    w = rng.choice(["the", "and", "is", "very"])
    return f"Do not use the word '{w}'.", {"type": "forbidden", "texts": [w], "name": f"avoids {w!r}"}


def _no_commas(rng: random.Random) -> tuple[str, dict[str, Any]]:
    return "Do not use any commas.", {"type": "forbidden", "texts": [","], "name": "no commas"}


def _bullets(rng: random.Random) -> tuple[str, dict[str, Any]]:
    n = rng.choice([2, 3, 4])
    return (f"Answer with exactly {n} bullet points, each on its own line starting with '- '.",
            {"type": "count", "pattern": r"^\s*[-*•] \S", "flags": "m", "min": n, "max": n,
             "name": f"{n} bullet points"})


def _json(rng: random.Random) -> tuple[str, dict[str, Any]]:
    schema = {"type": "object", "required": ["title", "summary"],
              "properties": {"title": {"type": "string", "minLength": 1}, "summary": {"type": "string", "minLength": 1}}}
    return ('Answer only with a JSON object with the string keys "title" and "summary".',
            {"type": "json_schema", "schema": schema, "name": "JSON with title and summary"})


def _title(rng: random.Random) -> tuple[str, dict[str, Any]]:
    return ("Include a title wrapped in double angular brackets, like <<my title>>.",
            {"type": "regex", "pattern": r"<<[^<>\n]+>>", "name": "title in <<>>"})


def _lowercase(rng: random.Random) -> tuple[str, dict[str, Any]]:
    return ("Write your whole answer in lowercase letters, with no capital letters.",
            {"type": "regex", "pattern": "[A-Z]", "negate": True, "name": "lowercase"})


def _first_word(rng: random.Random) -> tuple[str, dict[str, Any]]:
    w = rng.choice(_FIRST_WORDS)
    return (f"Start your answer with the word '{w}'.",
            {"type": "regex", "pattern": rf"^\W*{w}\b", "name": f"starts with {w!r}"})


def _last_words(rng: random.Random) -> tuple[str, dict[str, Any]]:
    p = rng.choice(_LAST_WORDS)
    return (f"End your answer with the exact words '{p}'",
            {"type": "regex", "pattern": re.escape(p.rstrip(".")) + r"[.!]?\s*\Z", "name": f"ends with {p!r}"})


def _c(family: str, conflicts: set[str], draw: Callable) -> Constraint:
    return Constraint(family, frozenset(conflicts), draw)


# name -> constraint; two constraints of one prompt never share a family or conflict
CONSTRAINTS: dict[str, Constraint] = {
    "max_words": _c("length", set(), _max_words),
    "min_words": _c("length", set(), _min_words),
    "include_word": _c("keyword", set(), _include),
    "avoid_word": _c("keyword", set(), _avoid),
    "no_commas": _c("punctuation", {"json"}, _no_commas),
    "bullets": _c("format", {"position"}, _bullets),
    "json": _c("format", {"position", "case", "punctuation", "title"}, _json),
    "title": _c("format", set(), _title),
    "lowercase": _c("case", {"json", "position"}, _lowercase),
    "first_word": _c("position", {"format", "case"}, _first_word),
    "last_words": _c("position", {"format", "case"}, _last_words),
}


def topic_split(topic: str) -> str:
    """``"eval"`` or ``"train"``: a stable hash of the topic, independent of any seed."""
    h = int.from_bytes(hashlib.sha256(f"{_TOPIC_SALT}:{topic}".encode()).digest()[:8], "big")
    return "eval" if h % _EVAL_BUCKETS == 0 else "train"


def _compatible(a: Constraint, b: Constraint) -> bool:
    return a.family != b.family and b.family not in a.conflicts and a.family not in b.conflicts


class InstructionsTask:
    """The ``instructions`` task.

    Options: ``seed`` (training prompts), ``eval_seed`` (which evaluation prompts; fixed so runs
    compare), ``n_train`` / ``n_eval`` (default sizes), ``max_constraints`` (1 or 2 per prompt).
    """

    name = "instructions"
    metric = "strict_accuracy"
    default_generator = "sample"
    default_objective = "grpo"
    default_scorer = "rules"
    max_new_tokens = 96  # the longest request, "at least 20 words" or 4 bullets, fits in about 60

    def __init__(self, seed: int = 0, eval_seed: int = 0, n_train: int = 1024, n_eval: int = 128,
                 max_constraints: int = 2) -> None:
        for opt, v in (("n_train", n_train), ("n_eval", n_eval)):
            if not isinstance(v, int) or v < 1:
                raise TaoInputError(f"instructions task: {opt} must be an integer >= 1, got {v!r}")
        if max_constraints not in (1, 2):
            raise TaoInputError(f"instructions task: max_constraints must be 1 or 2, got {max_constraints!r}")
        self.seed, self.eval_seed, self.n_train, self.n_eval = seed, eval_seed, n_train, n_eval
        self.max_constraints = max_constraints
        self.topics = {s: [t for t in TOPICS if topic_split(t) == s] for s in ("train", "eval")}

    def _draw(self, rng: random.Random, split: str) -> tuple[str, str, list[str], list[dict[str, Any]]]:
        topic = rng.choice(self.topics[split])
        body = rng.choice(BODIES).format(topic=topic)
        names = [rng.choice(sorted(CONSTRAINTS))]
        if self.max_constraints == 2 and rng.random() < 0.5:
            first = CONSTRAINTS[names[0]]
            names.append(rng.choice([n for n, c in sorted(CONSTRAINTS.items()) if _compatible(first, c)]))
        texts, rules = zip(*(CONSTRAINTS[n].draw(rng) for n in names), strict=True)
        return topic, " ".join([body, *texts]), names, list(rules)

    def prompts(self, split: str, count: int) -> list[Prompt]:
        """``count`` distinct prompts of ``split``, deterministic per seed."""
        seed = self.seed if split == "train" else self.eval_seed
        rng = random.Random(f"instructions:{split}:{seed}")
        seen: set[str] = set()
        out: list[Prompt] = []
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 200 * count + 10_000:
                raise TaoInputError(f"instructions task: only about {len(out)} distinct {split} prompts; "
                                    f"ask for fewer than {count}")
            topic, text, names, rules = self._draw(rng, split)
            if text in seen:
                continue
            seen.add(text)
            out.append(Prompt(id=f"instructions-{split}-{len(out)}", text=text, task=self.name,
                              metadata={"topic": topic, "constraints": names, "rules": rules}))
        return out

    def train_prompts(self, limit: int | None = None) -> list[Prompt]:
        return self.prompts("train", limit if limit is not None else self.n_train)

    def eval_examples(self, limit: int | None = None) -> list[EvalExample]:
        count = self.n_eval if limit is None else min(limit, self.n_eval)
        return [EvalExample(p, p.metadata["rules"]) for p in self.prompts("eval", count)]

    def check(self, example: EvalExample, completion: str) -> float:
        rule = compile_rules(example.reference, "all", f"instructions example {example.prompt.id!r}")
        return float(rule.evaluate(completion)[0] == 1.0)

    def reference(self, prompt: Prompt) -> str | None:
        """Always None: the task has constraints to check, but no labeled responses to imitate."""
        return None


TASKS = {"instructions": InstructionsTask}

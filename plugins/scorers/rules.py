"""``rules``: checkable rules on a candidate's text, composable with all / any / weighted.

A rule is a dict with a ``type`` and its options; every rule may also carry ``name`` (shown in the
score's details) and ``weight`` (for ``weighted``). Types:

- ``regex``: ``pattern`` must be found (``negate: true``: must not be); ``flags`` any of ``"ims"``;
  ``full: true`` matches the whole stripped text.
- ``count``: the number of ``pattern`` matches lies in [``min``, ``max``] (bullets, paragraphs).
- ``json_schema``: the response holds JSON (the whole text, a fenced block, or the first
  ``{...}``; ``strict: true``: the whole text) valid under ``schema`` (any JSON-Schema draft).
- ``length``: ``min_chars`` / ``max_chars`` / ``min_words`` / ``max_words`` / ``min_lines`` /
  ``max_lines`` bounds (inclusive).
- ``contains``: every text of ``all`` and at least one of ``any`` appears (``case_sensitive``,
  default false; ``whole_word``, default true).
- ``forbidden``: none of ``texts`` appears (same options).
- ``all`` / ``any`` / ``weighted``: a nested group of ``rules``, so rules compose to any depth.

``all`` scores 1.0 when every rule passes, ``any`` when one does, and ``weighted`` the weighted
share of passing rules. The scorer's rules come from its ``rules`` option, or, when that is not
given, from each prompt's ``metadata["rules"]`` (how the ``instructions`` task states a prompt's
constraints); a prompt without rules abstains, and malformed rules in a prompt are an ``error``
naming the prompt and the rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tao_plugins.scorers.majority import find_json

from tao_core.errors import TaoInputError
from tao_core.types import Candidate, Prompt, Score

_OPTIONS: dict[str, set[str]] = {
    "regex": {"pattern", "flags", "negate", "full"},
    "count": {"pattern", "flags", "min", "max"},
    "json_schema": {"schema", "strict"},
    "length": {"min_chars", "max_chars", "min_words", "max_words", "min_lines", "max_lines"},
    "contains": {"all", "any", "case_sensitive", "whole_word"},
    "forbidden": {"texts", "case_sensitive", "whole_word"},
    "all": {"rules"},
    "any": {"rules"},
    "weighted": {"rules"},
}
_COMMON = {"type", "name", "weight"}
_GROUPS = ("all", "any", "weighted")


def _flags(spec: str, where: str) -> int:
    table = {"i": re.I, "m": re.M, "s": re.S}
    bad = set(spec) - set(table)
    if bad:
        raise TaoInputError(f"{where}: unknown regex flags {sorted(bad)}; use any of 'i', 'm', 's'")
    out = 0
    for ch in spec:
        out |= table[ch]
    return out


def _compile(pattern: Any, flags: str, where: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise TaoInputError(f"{where}: 'pattern' must be a non-empty string")
    try:
        return re.compile(pattern, _flags(flags, where))
    except re.error as e:
        raise TaoInputError(f"{where}: invalid regex {pattern!r}: {e}") from None


def _phrase_regex(text: Any, case_sensitive: bool, whole_word: bool, where: str) -> re.Pattern:
    if not isinstance(text, str) or not text:
        raise TaoInputError(f"{where}: texts must be non-empty strings, got {text!r}")
    body = re.escape(text)
    if whole_word:
        body = (r"(?<!\w)" if text[0].isalnum() else "") + body + (r"(?!\w)" if text[-1].isalnum() else "")
    return re.compile(body, 0 if case_sensitive else re.I)


def _int_bound(spec: dict[str, Any], key: str, where: str) -> int | None:
    v = spec.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise TaoInputError(f"{where}: {key!r} must be a non-negative integer, got {v!r}")
    return v


@dataclass
class Rule:
    """A compiled rule: ``evaluate(text)`` returns ``(value in [0, 1], why)``."""

    kind: str
    name: str
    weight: float
    spec: dict[str, Any]
    children: list[Rule] = field(default_factory=list)
    compiled: Any = None

    def evaluate_group(self, text: str) -> tuple[float, str, list[tuple[str, float, str]]]:
        """A group rule's value and reason, with each child's ``(name, value, why)``."""
        parts = [(r, *r.evaluate(text)) for r in self.children]
        failed = [f"{r.name}: {why}" for r, v, why in parts if v < 1.0]
        if self.kind == "all":
            value = min(v for _, v, _ in parts)
        elif self.kind == "any":
            value = max(v for _, v, _ in parts)
        else:
            total = sum(r.weight for r, _, _ in parts)
            value = sum(r.weight * v for r, v, _ in parts) / total
        return value, "; ".join(failed), [(r.name, v, why) for r, v, why in parts]

    def evaluate(self, text: str) -> tuple[float, str]:
        k, s = self.kind, self.spec
        if k in _GROUPS:
            value, why, _ = self.evaluate_group(text)
            return value, why
        if k == "regex":
            rx: re.Pattern = self.compiled
            found = bool(rx.fullmatch(text.strip()) if s.get("full") else rx.search(text))
            if s.get("negate"):
                return (0.0, f"matches forbidden pattern {rx.pattern!r}") if found else (1.0, "")
            return (1.0, "") if found else (0.0, f"no match for {rx.pattern!r}")
        if k == "count":
            n = len(self.compiled.findall(text))
            lo, hi = s.get("min"), s.get("max")
            ok = (lo is None or n >= lo) and (hi is None or n <= hi)
            return (1.0, "") if ok else (0.0, f"{n} matches of {self.compiled.pattern!r}, want [{lo}, {hi}]")
        if k == "json_schema":
            if s.get("strict"):
                try:
                    value = json.loads(text.strip())
                except json.JSONDecodeError as e:
                    return 0.0, f"not JSON: {e.msg}"
            else:
                try:
                    value = find_json(text)
                except ValueError:
                    return 0.0, "no JSON found"
            err = next(iter(self.compiled.iter_errors(value)), None)
            if err is not None:
                path = "/".join(str(p) for p in err.absolute_path) or "(root)"
                return 0.0, f"JSON at {path}: {err.message}"
            return 1.0, ""
        if k == "length":
            measured = {"chars": len(text.strip()), "words": len(text.split()),
                        "lines": len([ln for ln in text.splitlines() if ln.strip()])}
            for unit, n in measured.items():
                lo, hi = s.get(f"min_{unit}"), s.get(f"max_{unit}")
                if (lo is not None and n < lo) or (hi is not None and n > hi):
                    return 0.0, f"{n} {unit}, want [{lo}, {hi}]"
            return 1.0, ""
        if k == "contains":
            need_all, need_any = self.compiled
            missing = [t for rx, t in need_all if not rx.search(text)]
            if missing:
                return 0.0, f"missing {missing}"
            if need_any and not any(rx.search(text) for rx, _ in need_any):
                return 0.0, f"none of {[t for _, t in need_any]}"
            return 1.0, ""
        if k == "forbidden":
            hits = [t for rx, t in self.compiled if rx.search(text)]
            return (0.0, f"contains forbidden {hits}") if hits else (1.0, "")
        raise AssertionError(k)


def compile_rule(spec: Any, where: str = "rules") -> Rule:
    """Check a rule dict (recursively) and compile it; errors name the rule's path, e.g. ``rules[2].rules[0]``."""
    if not isinstance(spec, dict):
        raise TaoInputError(f"{where}: a rule must be an object with a 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in _OPTIONS:
        raise TaoInputError(f"{where}: unknown rule type {kind!r}; types: {sorted(_OPTIONS)}")
    unknown = set(spec) - _OPTIONS[kind] - _COMMON
    if unknown:
        raise TaoInputError(f"{where}: unknown option(s) {sorted(unknown)} for a {kind} rule; "
                            f"accepted: {sorted(_OPTIONS[kind] | _COMMON)}")
    weight = spec.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
        raise TaoInputError(f"{where}: 'weight' must be a number >= 0, got {weight!r}")
    rule = Rule(kind, str(spec.get("name") or kind), float(weight), spec)
    if kind in _GROUPS:
        rules = spec.get("rules")
        if not isinstance(rules, list) or not rules:
            raise TaoInputError(f"{where}: an {kind} rule needs a non-empty list 'rules'")
        rule.children = [compile_rule(r, f"{where}.rules[{i}]") for i, r in enumerate(rules)]
        if kind == "weighted" and sum(r.weight for r in rule.children) <= 0:
            raise TaoInputError(f"{where}: the weights of a weighted rule must not all be 0")
    elif kind in ("regex", "count"):
        rule.compiled = _compile(spec.get("pattern"), spec.get("flags", ""), where)
        if kind == "count":
            lo, hi = _int_bound(spec, "min", where), _int_bound(spec, "max", where)
            if lo is None and hi is None:
                raise TaoInputError(f"{where}: a count rule needs 'min' and/or 'max'")
    elif kind == "json_schema":
        import jsonschema

        schema = spec.get("schema")
        if not isinstance(schema, dict | bool):
            raise TaoInputError(f"{where}: 'schema' must be a JSON-Schema object")
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise TaoInputError(f"{where}: invalid JSON schema: {e.message}") from None
        rule.compiled = cls(schema)
    elif kind == "length":
        bounds = [_int_bound(spec, k, where) for k in _OPTIONS["length"]]
        if all(b is None for b in bounds):
            raise TaoInputError(f"{where}: a length rule needs at least one of {sorted(_OPTIONS['length'])}")
    else:
        cs, ww = bool(spec.get("case_sensitive", False)), bool(spec.get("whole_word", True))
        if kind == "contains":
            lists = [spec.get("all", []), spec.get("any", [])]
            if not all(isinstance(x, list) for x in lists) or not any(lists):
                raise TaoInputError(f"{where}: a contains rule needs a list 'all' and/or 'any' of texts")
            rule.compiled = tuple([(_phrase_regex(t, cs, ww, where), t) for t in lst] for lst in lists)
        else:
            texts = spec.get("texts")
            if not isinstance(texts, list) or not texts:
                raise TaoInputError(f"{where}: a forbidden rule needs a non-empty list 'texts'")
            rule.compiled = [(_phrase_regex(t, cs, ww, where), t) for t in texts]
    return rule


def compile_rules(rules: Any, combine: str = "all", where: str = "rules") -> Rule:
    """A list of rule dicts (or one dict) as a single group rule combined with ``combine``."""
    if combine not in _GROUPS:
        raise TaoInputError(f"{where}: combine must be one of {list(_GROUPS)}, got {combine!r}")
    if isinstance(rules, dict):
        rules = [rules]
    if not isinstance(rules, list) or not rules:
        raise TaoInputError(f"{where}: expected a non-empty list of rules, got {rules!r}")
    return compile_rule({"type": combine, "name": combine, "rules": rules}, where)


class RulesScorer:
    """Options: ``rules`` (a list of rule dicts; default: each prompt's ``metadata[metadata_key]``),
    ``combine`` (``"all"``, ``"any"`` or ``"weighted"``), ``metadata_key`` (default ``"rules"``)."""

    name = "rules"
    version = "1"
    pointwise = True  # each candidate is judged on its own

    def __init__(self, rules: list[dict[str, Any]] | None = None,
                 combine: Literal["all", "any", "weighted"] = "all", metadata_key: str = "rules") -> None:
        if combine not in _GROUPS:
            raise TaoInputError(f"rules scorer: combine must be one of {list(_GROUPS)}, got {combine!r}")
        self.combine, self.metadata_key = combine, metadata_key
        self.rule = compile_rules(rules, combine, "rules scorer option 'rules'") if rules is not None else None
        self._cache: dict[str, Rule] = {}

    def rule_for(self, prompt: Prompt) -> Rule | None:
        if self.rule is not None:
            return self.rule
        spec = prompt.metadata.get(self.metadata_key)
        if spec is None:
            return None
        key = json.dumps(spec, sort_keys=True)
        if key not in self._cache:
            self._cache[key] = compile_rules(spec, self.combine,
                                             f"prompt {prompt.id!r} metadata[{self.metadata_key!r}]")
        return self._cache[key]

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        kw = {"scorer": self.name, "version": self.version}
        try:
            rule = self.rule_for(prompt)
        except TaoInputError as e:
            return [Score.error(f"rules: {e}", **kw) for _ in candidates]
        if rule is None:
            return [Score.abstain(f"rules: no rules given and prompt {prompt.id!r} has no "
                                  f"metadata[{self.metadata_key!r}]", **kw) for _ in candidates]
        out = []
        for c in candidates:
            value, why, parts = rule.evaluate_group(c.text)
            details = {"rules": [{"name": n, "value": v, **({"why": w} if w else {})} for n, v, w in parts]}
            out.append(Score.ok(value, why or "all rules pass", details=details, **kw))
        return out


SCORERS = {"rules": RulesScorer}

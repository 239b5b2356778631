"""Built-in generators (TAO stage 1).

- ``sample``: ``n`` i.i.d. samples per prompt under the task's own prompt.
- ``diverse``: controlled diversity. Each prompt's ``n`` candidates are spread over a temperature
  ladder and several prompt templates: ``default`` (the task's own prompt), ``plain`` (the bare
  question), ``steps`` (reason step by step, then a final ``Answer:`` line) and ``json`` (a JSON
  object with the answer), plus any user template. Each candidate's metadata records its template
  and temperature; one sampled under another template than the task's own prompt is marked
  ``off_policy`` and carries ``policy_prompt_token_ids``, the task prompt's tokens, so training can
  recompute its log-probs under the task's prompt (or leave it out) without re-tokenizing.
  A template can sample from a weight set other than the policy (``template_weight_sets``, e.g. the
  voters from a frozen or EMA teacher, :mod:`tao_core.teacher`); its candidates are marked
  ``off_policy`` (with ``policy_prompt_token_ids``) and carry ``weight_set``.
  Near-duplicates are marked (``near_duplicate_of``), never dropped, and every candidate carries
  the group's ``diversity`` figure: distinct answers and mean pairwise similarity.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

import tao_core
from tao_core.engine import POLICY
from tao_core.errors import TaoInputError
from tao_core.models import LoadedModel
from tao_core.sampler import sampler_for
from tao_core.types import Candidate, Prompt, SamplingParams


class SampleGenerator:
    """``sample``: ``n`` i.i.d. samples per prompt under the task's own prompt."""

    name = "sample"

    def __init__(self, model: LoadedModel) -> None:
        self.sampler = sampler_for(model)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        groups = self.sampler.sample(prompts, params)
        for group in groups:
            for c in group:
                c.generator = self.name
        return groups


# name -> template applied to the bare question; "default" keeps the task's own prompt
TEMPLATES: dict[str, str] = {
    "plain": "{question}",
    "steps": "{question}\nThink step by step, then give the final answer on the last line as 'Answer: <answer>'.",
    "json": '{question}\nRespond only with a JSON object of the form {{"reasoning": "...", "answer": "..."}}.',
}
ON_POLICY = "default"  # the task's own prompt, as in Candidate.template


def question_of(prompt: Prompt) -> str:
    """The bare question a template wraps: ``metadata["question"]`` (tasks set it), else the user text."""
    q = prompt.metadata.get("question")
    if isinstance(q, str) and q.strip():
        return q
    if prompt.text is not None:
        return prompt.text
    users = [m["content"] for m in prompt.as_messages() if m.get("role") == "user"]
    return users[-1] if users else prompt.as_messages()[-1]["content"]


def apply_template(prompt: Prompt, template: str, templates: dict[str, str], pid: str) -> Prompt:
    """``prompt`` re-asked under ``template`` (the last user turn is replaced in a chat)."""
    if template == ON_POLICY:
        return dataclasses.replace(prompt, id=pid)
    content = templates[template].format(question=question_of(prompt))
    if prompt.messages is None:
        return dataclasses.replace(prompt, id=pid, text=content)
    messages = [dict(m) for m in prompt.messages]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    messages[last_user]["content"] = content
    return dataclasses.replace(prompt, id=pid, messages=messages)


_WORD = re.compile(r"\w+|[^\w\s]")


def similarity(a: str, b: str) -> float:
    """Similarity of two responses in [0, 1]: ``difflib`` ratio over their lowercased word and
    punctuation tokens (1 for equal token lists, 0 for no token in common)."""
    ta, tb = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    if not ta and not tb:
        return 1.0
    return difflib.SequenceMatcher(None, ta, tb, autojunk=False).ratio()


def diversity_report(texts: Sequence[str], answers: Sequence[str | None],
                     threshold: float) -> tuple[dict[str, Any], list[int | None]]:
    """The group's diversity figure and, per candidate, the earlier candidate it nearly duplicates."""
    n = len(texts)
    sims = {(i, j): similarity(texts[i], texts[j]) for i in range(n) for j in range(i + 1, n)}
    dup_of: list[int | None] = [None] * n
    for j in range(n):
        dup_of[j] = next((i for i in range(j) if sims[(i, j)] >= threshold), None)
    given = [a for a in answers if a is not None]
    report = {
        "n": n,
        "answered": len(given),
        "distinct_answers": len(set(given)),
        "mean_pairwise_similarity": round(sum(sims.values()) / len(sims), 4) if sims else None,
        "near_duplicates": sum(d is not None for d in dup_of),
    }
    return report, dup_of


class DiverseGenerator:
    """``diverse``: a temperature ladder crossed with prompt templates, with a diversity figure.

    Options: ``temperatures`` (the ladder; it replaces ``params.temperature``; empty keeps it),
    ``template_temperatures`` (``{template: temperature}``: that template always samples at that
    temperature instead of its ladder step, e.g. low-temperature structured "voters" next to
    high-temperature on-policy samples),
    ``template_weight_sets`` (``{template: weight set}``: that template samples from a weight set
    registered with the sampler, e.g. the voters from ``"teacher"`` (:meth:`tao_core.teacher.Teacher.attach`);
    unnamed templates sample from ``"policy"``),
    ``templates`` (names from :data:`TEMPLATES`, ``"default"`` for the task's own prompt, or keys
    of ``extra_templates``), ``extra_templates`` (``{name: "... {question} ..."}``),
    ``near_duplicate`` (similarity at or above which a candidate is marked a near-duplicate of an
    earlier one), ``extract`` / ``pattern`` / ``field`` (how answers are read for the count of
    distinct answers; see ``majority-vote``).

    Candidate ``j`` of a group gets template ``j mod T`` and ladder step ``(j + j div T) mod K``,
    so a group of ``n`` covers up to ``T * K`` distinct (template, temperature) pairs.
    """

    name = "diverse"

    def __init__(self, model: LoadedModel, temperatures: Sequence[float] = (0.7, 1.0, 1.3),
                 templates: Sequence[str] = (ON_POLICY, "steps", "json", "plain"),
                 extra_templates: dict[str, str] | None = None, near_duplicate: float = 0.9,
                 extract: str = "number", pattern: str | None = None, field: str | None = None,
                 template_temperatures: dict[str, float] | None = None,
                 template_weight_sets: dict[str, str] | None = None) -> None:
        from tao_plugins.scorers.majority import AnswerExtractor

        self.lm = model
        self.sampler = sampler_for(model)
        self.templates = {**TEMPLATES, **(extra_templates or {})}
        for name, t in (extra_templates or {}).items():
            if not isinstance(t, str) or "{question}" not in t:
                raise TaoInputError(f"diverse generator: extra template {name!r} must be a string containing "
                                    f"'{{question}}', got {t!r}")
        if not templates:
            raise TaoInputError("diverse generator: give at least one template")
        unknown = [t for t in templates if t != ON_POLICY and t not in self.templates]
        if unknown:
            raise TaoInputError(f"diverse generator: unknown template(s) {unknown}; available: "
                                f"{[ON_POLICY, *self.templates]}")
        self.template_order = list(templates)
        self.temperatures = [float(t) for t in temperatures]
        if any(t < 0 for t in self.temperatures):
            raise TaoInputError(f"diverse generator: temperatures must be >= 0, got {list(temperatures)}")
        self.template_temperatures = {str(k): float(v) for k, v in (template_temperatures or {}).items()}
        stray = sorted(set(self.template_temperatures) - set(self.template_order))
        if stray:
            raise TaoInputError(f"diverse generator: template_temperatures names {stray}, which are not among the "
                                f"templates in use {self.template_order}")
        if any(t < 0 for t in self.template_temperatures.values()):
            raise TaoInputError(f"diverse generator: template_temperatures must be >= 0, got "
                                f"{self.template_temperatures}")
        self.template_weight_sets = self._weight_sets(template_weight_sets)
        if not 0.0 < near_duplicate <= 1.0:
            raise TaoInputError(f"diverse generator: near_duplicate must be in (0, 1], got {near_duplicate!r}")
        self.near_duplicate = float(near_duplicate)
        self.extractor = AnswerExtractor(extract, pattern, field, where="diverse generator")

    def _weight_sets(self, given: dict[str, str] | None) -> dict[str, str]:
        """``template_weight_sets`` checked: templates in use, weight set names as strings."""
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise TaoInputError(f"diverse generator: template_weight_sets must be a table of template -> weight set "
                                f"name, got {given!r}")
        stray = sorted(set(map(str, given)) - set(self.template_order))
        if stray:
            raise TaoInputError(f"diverse generator: template_weight_sets names template(s) {stray}, which are not "
                                f"among the templates in use {self.template_order}")
        bad = {k: v for k, v in given.items() if not isinstance(v, str) or not v}
        if bad:
            raise TaoInputError(f"diverse generator: template_weight_sets values must be weight set names "
                                f"(\"policy\", \"teacher\", ...), got {bad}")
        return {str(k): v for k, v in given.items()}

    def slots(self, n: int, default_temperature: float) -> list[tuple[str, float]]:
        """The (template, temperature) of each of a group's ``n`` candidates."""
        ladder = self.temperatures or [default_temperature]
        t, k = len(self.template_order), len(ladder)
        slots = [(self.template_order[j % t], ladder[(j + j // t) % k]) for j in range(n)]
        return [(name, self.template_temperatures.get(name, temp)) for name, temp in slots]

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        params.validate()
        slots = self.slots(params.n, params.temperature)
        combos = list(dict.fromkeys(slots))
        groups: list[list[Candidate | None]] = [[None] * params.n for _ in prompts]
        for ci, (template, temp) in enumerate(combos):
            where = [j for j, s in enumerate(slots) if s == (template, temp)]
            asked = [apply_template(p, template, self.templates, f"{p.id}::{template}@{temp:g}") for p in prompts]
            sub = dataclasses.replace(params, n=len(where), temperature=temp,
                                      seed=None if params.seed is None else params.seed + ci)
            weight_set = self.template_weight_sets.get(template, POLICY)
            for pi, got in enumerate(self.sampler.sample(asked, sub, weight_set=weight_set)):
                for j, c in zip(where, got, strict=True):
                    groups[pi][j] = c
        out = []
        for p, group in zip(prompts, groups, strict=True):
            cands = [c for c in group if c is not None]
            own_ids = self.lm.prompt_token_ids(p)
            answers = [self.extractor(c.text) for c in cands]
            report, dup_of = diversity_report([c.text for c in cands], answers, self.near_duplicate)
            for j, (c, (template, temp)) in enumerate(zip(cands, slots, strict=True)):
                c.prompt_id, c.index, c.generator, c.template = p.id, j, self.name, template
                weight_set = self.template_weight_sets.get(template, POLICY)
                meta = {"template": template, "temperature": temp,
                        "off_policy": template != ON_POLICY or weight_set != POLICY,
                        "answer": answers[j], "diversity": dict(report)}
                if weight_set != POLICY:
                    meta["weight_set"] = weight_set
                if meta["off_policy"]:
                    meta["policy_prompt_token_ids"] = own_ids
                if dup_of[j] is not None:
                    meta["near_duplicate_of"] = dup_of[j]
                c.metadata = {**c.metadata, **meta}
            out.append(cands)
        return out


@tao_core.hookimpl
def tao_register_generators(register):
    register("sample", SampleGenerator, aliases=("iid",))
    register("diverse", DiverseGenerator)

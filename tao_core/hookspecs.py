"""The hooks a tao plugin can implement.

A plugin is an importable module (or any object) named under the ``tao`` entry-point group in its
package's ``pyproject.toml``::

    [project.entry-points.tao]
    my-plugin = "my_package.tao_plugin"

It implements any of the hooks below as plain functions marked ``@tao_core.hookimpl``. Each hook
receives one argument, ``register(name, obj, *, aliases=())``, calls it once per component and
returns None. tao owns the registry: names are unique across all plugins, an alias resolves to the
same entry, and a config, the CLI or the Python API looks a component up by name or alias.

- ``register`` checks each call: a name (and every alias) is a non-empty string without spaces,
  ``aliases`` is a tuple or list, and ``obj`` is what the hook's kind needs (a callable factory, an
  ``Objective``, a ``click.Command``); otherwise it raises ``tao_core.PluginError`` naming the
  plugin and the name. Call ``register`` only while the hook runs.
- What a hook registers is kept only if the hook returns normally: one that raises (even
  ``SystemExit``), returns a value or makes a bad ``register`` call registers nothing of that
  kind, and the reason, naming the plugin, is shown by ``tao plugins`` and ``tao --help``. The
  plugin's other hooks and every other plugin keep working.
- A name two plugins register is an error naming both whenever it is used (their other names
  keep working); a command named like a built-in ``tao`` command is an error of the plugin, and
  the built-in wins.

Ordering: tao calls each plugin's implementation of a hook on its own (so that a failure is that
plugin's alone), in the order pluggy calls hooks: implementations marked
``@tao_core.hookimpl(tryfirst=True)`` first, ``trylast=True`` last, and otherwise the plugin
registered last first. Order never settles a duplicate name (that stays an error until one plugin
renames it), but when two registrations clash the one called first keeps its other names and
aliases, and order decides when a hook's side effects (imports, logging) happen. Hook wrappers
(``wrapper=True``, ``hookwrapper=True``) are not supported: such an implementation is an error
of its plugin and registers nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("tao")
hookimpl = pluggy.HookimplMarker("tao")


class Register(Protocol):
    """The callback every hook receives: ``register(name, obj, *, aliases=())``."""

    def __call__(self, name: str, obj: Any, *, aliases: tuple[str, ...] | list[str] = ()) -> None: ...


@hookspec
def tao_register_generators(register: Register) -> None:
    """Register generators: they turn prompts into groups of candidates (stage 1 of a round).

    :param register: call ``register(name, factory, aliases=(...))`` once per generator.

    ``factory(model: tao_core.LoadedModel, **options) -> Generator`` is called once per run with
    the loaded model and the keywords of ``[generate.options]``. A ``Generator``
    (``tao_core.generators.Generator``) has a ``name`` and a method
    ``generate(prompts: list[Prompt], params: SamplingParams) -> list[list[Candidate]]`` that
    returns one group of ``params.n`` candidates per prompt, in prompt order, each with its token
    ids and sampled log-probs. A generator decides what to ask (templates, temperatures, how
    many); for the tokens it calls the model's sampler,
    ``tao_core.sampler.sampler_for(model).sample(prompts, params)``, and it marks each candidate's
    ``generator`` (and ``template``) so that scorers and reports can tell candidates apart. A
    config picks a generator with ``[generate] generator = "name"``; unset, the task's
    ``default_generator`` is used.

    Example::

        import tao_core
        from tao_core.sampler import sampler_for


        class Twice:
            name = "twice"

            def __init__(self, model):
                self.sampler = sampler_for(model)

            def generate(self, prompts, params):
                groups = self.sampler.sample(prompts, params)
                for group in groups:
                    for candidate in group:
                        candidate.generator = self.name
                return groups


        @tao_core.hookimpl
        def tao_register_generators(register):
            register("twice", Twice, aliases=("2x",))
    """


@hookspec
def tao_register_scorers(register: Register) -> None:
    """Register scorers: reward models, verifiers, judges, rules (stage 2 of a round).

    :param register: call ``register(name, factory, aliases=(...))`` once per scorer.

    ``factory(**options) -> Scorer`` is called once per run with the keywords of
    ``[score.options]``. A ``Scorer`` (``tao_core.scorer.Scorer``) has the attributes ``name`` and
    ``version`` and a method ``score(prompt: Prompt, candidates: list[Candidate]) -> list[Score]``
    that returns exactly one ``Score`` per candidate, in order: ``Score.ok(value)``, or
    ``Score.abstain(reason)`` / ``Score.error(reason)``, never a silent 0. Pointwise, pairwise and
    listwise scorers share this protocol: each sees the whole group. A scorer whose score of a
    candidate does not depend on the rest of the group sets ``pointwise = True`` so that the score
    cache keys it per candidate; bump ``version`` whenever its scores change meaning. tao calls
    ``score`` through a guard: an exception, a wrong result or a call past ``score.timeout_s``
    becomes ``error`` scores naming the scorer, and the run goes on. A config picks a scorer with
    ``[score] scorer = "name"``; unset, the task's ``default_scorer`` is used.

    Example::

        import tao_core
        from tao_core import Score


        class Length:
            name = "length"
            version = "1"
            pointwise = True

            def score(self, prompt, candidates):
                return [Score.ok(len(c.text)) if c.text else Score.abstain("empty completion")
                        for c in candidates]


        @tao_core.hookimpl
        def tao_register_scorers(register):
            register("length", Length)
    """


@hookspec
def tao_register_advantages(register: Register) -> None:
    """Register advantage estimators: a group's scores in, one advantage per candidate out.

    :param register: call ``register(name, estimator, aliases=(...))`` once per estimator.

    ``estimator(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor``: ``rewards`` and
    ``mask`` have shape ``[groups, n]``, one row per prompt; ``mask`` is True where the candidate
    has an ``ok`` score. It returns advantages of the same shape, 0 wherever ``mask`` is False, and
    0 for a whole group with fewer than two ``ok`` candidates (it carries no comparison; the trainer
    counts it as skipped). A config picks one with ``[train] advantage = "name"``; unset, the
    objective's own ``advantage`` is used.

    Example::

        import tao_core
        import torch


        def centered(rewards, mask):
            m = mask.to(rewards.dtype)
            count = m.sum(1, keepdim=True)
            mean = (rewards * m).sum(1, keepdim=True) / count.clamp(min=1)
            keep = mask & (count >= 2)
            return torch.where(keep, rewards - mean, torch.zeros_like(rewards))


        @tao_core.hookimpl
        def tao_register_advantages(register):
            register("centered", centered)
    """


@hookspec
def tao_register_objectives(register: Register) -> None:
    """Register training objectives (stage 3 of a round): policy losses with their defaults.

    :param register: call ``register(name, objective, aliases=(...))`` once per objective.

    ``objective`` is an instance, not a factory: a ``tao_core.objectives.Objective`` (or any object
    with a callable ``loss``). It names its loss ``loss(batch, hidden, weight, cfg) -> LossOutput``
    over a packed ``TrainBatch``, the final hidden states of the completion tokens (``[N, H]``) and
    the head weight (``[V, H]``), plus its default advantage estimator (``advantage``, a registered
    name), whether it needs a reference model, which candidates of each group it trains on
    (``select``) and its defaults for the loss settings. Build the loss on
    ``tao_kernels.linear_logprob`` or ``tao_kernels.linear_policy_loss`` so that the full
    ``[tokens, vocab]`` logits never exist. A config picks one with ``[train] objective = "name"``;
    unset, the task's ``default_objective`` is used.

    Example::

        import tao_core
        import tao_kernels
        from tao_core.objectives import LossOutput, Objective


        def weighted_nll(batch, hidden, weight, cfg):
            lp = tao_kernels.linear_logprob(hidden, weight, batch.targets)
            return LossOutput(-(batch.advantages * lp).mean())


        @tao_core.hookimpl
        def tao_register_objectives(register):
            register("weighted_nll", Objective("weighted_nll", weighted_nll, advantage="group_norm"))
    """


@hookspec
def tao_register_tasks(register: Register) -> None:
    """Register tasks: where the prompts come from and how a run is evaluated.

    :param register: call ``register(name, factory, aliases=(...))`` once per task.

    ``factory(**options) -> Task`` is called with the keywords of ``task_options``. A ``Task``
    (``tao_core.tasks.Task``) has a ``name``, an evaluation ``metric``, ``max_new_tokens``, the
    registered names ``default_generator``, ``default_scorer`` and ``default_objective``, and
    methods ``train_prompts(limit)`` (unlabeled training prompts), ``eval_examples(limit)`` (the
    held-out labeled split, disjoint from them), ``check(example, completion) -> float`` (1.0
    correct, 0.0 wrong) and ``reference(prompt) -> str | None`` (the label ``tao sft`` trains on,
    None for a label-free task). The factory may list packaged run configs in a ``recipes``
    attribute, ``{name: path relative to its module}``, which ``tao demo NAME`` runs. A config
    names its task with ``task = "name"``.

    Example::

        import tao_core
        from tao_core import Prompt
        from tao_core.tasks import EvalExample

        CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima"}


        class Capitals:
            name = "capitals"
            metric = "accuracy"
            max_new_tokens = 16
            default_generator = "sample"
            default_scorer = "majority-vote"
            default_objective = "grpo"

            def _prompt(self, country):
                return Prompt(id=country, text=f"What is the capital of {country}?", task=self.name)

            def train_prompts(self, limit=None):
                return [self._prompt(c) for c in list(CAPITALS)[:2]][:limit]

            def eval_examples(self, limit=None):
                held_out = list(CAPITALS)[2:]
                return [EvalExample(self._prompt(c), CAPITALS[c]) for c in held_out][:limit]

            def check(self, example, completion):
                return float(example.reference.lower() in completion.lower())

            def reference(self, prompt):
                return CAPITALS.get(prompt.id)


        @tao_core.hookimpl
        def tao_register_tasks(register):
            register("capitals", Capitals, aliases=("geo",))
    """


@hookspec
def tao_register_commands(register: Register) -> None:
    """Register CLI commands under ``tao``.

    :param register: call ``register(name, command, aliases=(...))`` once per command.

    ``command`` is a ``click.Command`` or ``click.Group``; ``name`` is the command name under ``tao``
    and a group nests: ``register("rm", rm_group)`` with ``rm_group`` holding ``train`` gives
    ``tao rm train``. A name of a built-in ``tao`` command (``run``, ``demo``, ``plugins``, ...) is
    an error of the plugin and the built-in wins. Import heavy modules inside the command, not at
    the top of the plugin, so that ``tao --help`` stays fast.

    Example::

        import click
        import tao_core


        @click.command("hello")
        @click.argument("who", default="world")
        def hello(who):
            click.echo(f"hello {who}")


        @tao_core.hookimpl
        def tao_register_commands(register):
            register("hello", hello)
    """

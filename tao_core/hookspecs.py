"""The hooks a tao plugin can implement.

A plugin is a module or object registered under the ``tao`` entry-point group, e.g. in its
``pyproject.toml``::

    [project.entry-points.tao]
    my-plugin = "my_package.tao_plugin"

and it implements any of the hooks below with ``@tao_core.hookimpl``. Every hook receives a
``register(name, obj, *, aliases=())`` callback and returns None; tao owns the registry, so names
are unique across all plugins and aliases resolve to the same entry.

- ``register`` checks each call: a name (and every alias) is a non-empty string without spaces,
  ``aliases`` is a tuple or list, and ``obj`` is what the hook's kind needs (a callable factory, an
  ``Objective``, a ``click.Command``); otherwise it raises ``tao_core.PluginError`` naming the
  plugin and the name.
- What a hook registers is kept only if the hook returns normally: one that raises (even
  ``SystemExit``), returns a value or makes a bad ``register`` call registers nothing, and the
  reason is shown by ``tao plugins`` and ``tao --help``.
- A name two plugins register is an error naming both whenever it is used (their other names
  keep working); a command named like a built-in ``tao`` command is an error of the plugin, and
  the built-in wins.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("tao")
hookimpl = pluggy.HookimplMarker("tao")


class Register(Protocol):
    def __call__(self, name: str, obj: Any, *, aliases: tuple[str, ...] | list[str] = ()) -> None: ...


@hookspec
def tao_register_generators(register: Register) -> None:
    """Register candidate generators (TAO stage 1).

    ``obj`` is a factory ``obj(model: tao_core.LoadedModel, **options) -> Generator``, where a
    ``Generator`` has ``generate(prompts: list[Prompt], params: SamplingParams)
    -> list[list[Candidate]]`` returning one group of ``params.n`` candidates per prompt, each with
    its token ids and sampled log-probs (see ``tao_core.Candidate``). Use
    ``tao_core.sampler.sampler_for(model)`` for the tokens: its ``sample(prompts, params)`` runs
    the model's declared sampler backend (the engine when it supports the model).

    Example::

        @tao_core.hookimpl
        def tao_register_generators(register):
            register("echo", EchoGenerator, aliases=("parrot",))
    """


@hookspec
def tao_register_scorers(register: Register) -> None:
    """Register scorers (TAO stage 2): reward models, verifiers, judges, rules.

    ``obj`` is a factory ``obj(**options) -> Scorer``. A ``Scorer`` has attributes ``name`` and
    ``version`` and a method ``score(prompt: Prompt, candidates: list[Candidate]) -> list[Score]``
    returning exactly one ``Score`` per candidate, in order: ``Score.ok(value)``, or
    ``Score.abstain(reason)`` / ``Score.error(reason)`` -- never a silent 0. Pointwise, pairwise and
    listwise scorers share this protocol: each sees the whole group. An exception raised by
    ``score`` becomes an ``error`` score for the group; the run goes on.

    Example::

        @tao_core.hookimpl
        def tao_register_scorers(register):
            register("length", LengthScorer)
    """


@hookspec
def tao_register_advantages(register: Register) -> None:
    """Register advantage estimators.

    ``obj`` is a function ``obj(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor``: both
    of shape ``[groups, n]``; ``mask`` is True where the candidate has an ``ok`` score. It returns
    one advantage per candidate (0 where masked). Example: ``register("group_norm", group_norm)``.
    """


@hookspec
def tao_register_objectives(register: Register) -> None:
    """Register training objectives (policy losses and recipes).

    ``obj`` is an ``Objective`` (see ``tao_core.objectives``): a small object naming its default
    advantage estimator, whether it needs a reference model, and a ``loss(batch, ...)`` function
    built on ``tao_kernels.linear_policy_loss`` or ``tao_kernels.linear_logprob``.
    """


@hookspec
def tao_register_tasks(register: Register) -> None:
    """Register task suites.

    ``obj`` is a factory ``obj(**options) -> Task`` (see ``tao_core.tasks.Task``): unlabeled
    training prompts, a held-out labeled evaluation split, a default generator and scorer, and an
    evaluation metric.
    """


@hookspec
def tao_register_commands(register: Register) -> None:
    """Register CLI commands.

    ``obj`` is a ``click.Command`` or ``click.Group``; ``name`` is the command name under ``tao``.
    A group nests: ``register("rm", rm_group)`` with ``rm_group`` holding ``train`` gives
    ``tao rm train``.
    """

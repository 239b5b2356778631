"""Built-in task suites.

Each task module in this package exposes a ``TASKS`` dict, ``{name: factory}`` (or
``{name: (factory, aliases)}``); this entry point registers every present module's dict. It also
registers the ``by-task`` scorer and generator (:mod:`tao_plugins.tasks.routing`) that the
``mixture`` task routes its prompts through.
"""

from __future__ import annotations

from tao_plugins.scorers import present_modules, register_tables

import tao_core

# Task modules of this package, registered in this order.
TASK_MODULES = ("sql", "arithmetic", "instructions", "mixture")


@tao_core.hookimpl
def tao_register_tasks(register):
    register_tables(register, present_modules(__name__, TASK_MODULES), "TASKS")


@tao_core.hookimpl
def tao_register_scorers(register):
    register_tables(register, present_modules(__name__, ("routing",)), "SCORERS")


@tao_core.hookimpl
def tao_register_generators(register):
    register_tables(register, present_modules(__name__, ("routing",)), "GENERATORS")

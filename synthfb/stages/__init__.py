"""Pipeline stages, one module per method.

Importing this package registers every built-in stage kind with the engine
(a stage class with a ``kind`` registers itself); the engine finds it
through the ``synthfb.stages`` entry point. ``STAGES`` maps the ``stage:``
names used in pipeline files to classes; a new method adds one module and
its import here.
"""

from __future__ import annotations

from ..engine.stage import STAGES
from . import backtranslation, constitutional, judge, onpolicy_pairs, realign, self_instruct  # noqa: F401 - register
# best-of-N, consistency checks, RSO (issue #14)
from . import best_of_n, consistency, rso  # noqa: F401,E402 - register
from .generate import GenerateStage
from .load import LoadStage
from . import kpdds  # noqa: F401,E402 - register (issue #14: KPDDS)

__all__ = ["STAGES", "GenerateStage", "LoadStage"]

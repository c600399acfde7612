"""Pipeline stages, one module per method.

``STAGES`` maps the ``stage:`` names used in pipeline files to classes; a new
method adds one module and one line here.
"""

from __future__ import annotations

from .generate import GenerateStage
from .load import LoadStage

STAGES = {cls.kind: cls for cls in (LoadStage, GenerateStage)}

__all__ = ["STAGES", "GenerateStage", "LoadStage"]

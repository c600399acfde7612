"""Pipeline stages, one module per method.

``STAGES`` maps the ``stage:`` names used in pipeline files to classes; a new
method adds one module and one line here.
"""

from __future__ import annotations

from .generate import GenerateStage
from .load import LoadStage
from .self_instruct import (AlpacaBootstrapStage, SelfInstructBootstrapStage, SelfInstructClassifyStage,
                            SelfInstructInstancesStage)
from .backtranslation import BacktranslateStage, SegmentsStage, SelfCurateStage, SourceTagStage
from .realign import RealignClassifyStage, RealignRewriteStage
from .constitutional import CAILabelStage, CAIReviseStage
from .judge import JudgePairsStage
from .onpolicy_pairs import OnPolicyPairsStage

STAGES = {cls.kind: cls for cls in (LoadStage, GenerateStage,
                                      SelfInstructBootstrapStage, SelfInstructClassifyStage, SelfInstructInstancesStage,
                                      AlpacaBootstrapStage, SegmentsStage, BacktranslateStage, SelfCurateStage,
                                      SourceTagStage, RealignClassifyStage, RealignRewriteStage,
                                      CAIReviseStage, CAILabelStage, JudgePairsStage, OnPolicyPairsStage)}

__all__ = ["STAGES", "GenerateStage", "LoadStage"]

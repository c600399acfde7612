"""Stages, pipelines and the runner (chunked execution, checkpoints, resume)."""

from .pipeline import Pipeline, PipelineError
from .runner import Runner, RunError, RunResult, StageFailed, run_pipeline
from .stage import Stage, StageContext

__all__ = ["Pipeline", "PipelineError", "Runner", "RunError", "RunResult", "Stage", "StageFailed", "StageContext", "run_pipeline"]

"""Stages, pipelines and the runner (chunked execution, checkpoints, resume)."""

from .pipeline import Pipeline, PipelineError
from .runner import Runner, RunError, RunResult, run_pipeline
from .stage import Stage, StageContext

__all__ = ["Pipeline", "PipelineError", "Runner", "RunError", "RunResult", "Stage", "StageContext", "run_pipeline"]

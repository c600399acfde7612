"""The RLAIF loop (``synthfb loop LOOP.yaml``): rounds of on-policy
generation -> judging -> preference pairs -> DPO (or reward model + PPO)
-> new policy, each round
generating with the checkpoint the previous one trained, optionally after an
SFT warm-up (a data pipeline such as seeds -> Self-Instruct, then SFT; its
checkpoint is the round-0 policy).

- :mod:`.config` the loop file, validated with jsonschema before any work;
- :mod:`.engines` engines started on first use, one policy engine at a time;
- :mod:`.warmup` the optional SFT warm-up before round 0;
- :mod:`.pairs` the round's pairs through the pipeline runner;
- :mod:`.round_data` what some methods build from those rows before
  training (``spin``: gold vs own sample; ``rft``: best-of-N winners);
- :mod:`.train` the round's DPO or RM + PPO, resumable from the last checkpoint;
- :mod:`.heldout` held-out win rate vs the round-0 policy (frozen judge, both
  orders, 95% bootstrap interval);
- :mod:`.card` the loop's summary and card (``OUT/README.md``);
- :mod:`.state` the loop folder and ``loop.json``;
- :mod:`.runner` :func:`run_loop`; :mod:`.cli` the ``loop`` subcommand.

Only light modules are imported here; torch and vLLM load when a loop runs.
"""

from __future__ import annotations

from .config import LoopConfig, LoopError, load_loop

__all__ = ["LoopConfig", "LoopError", "LoopResult", "load_loop", "run_loop"]


def __getattr__(name: str):
    if name in ("run_loop", "LoopResult"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)

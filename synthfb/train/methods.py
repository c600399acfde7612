"""The one registry of training methods, for ``synthfb train`` and ``synthfb loop``.

A :class:`Method` names a config dataclass, a train function, the dataset it
reads (kind and columns), how its result is evaluated and which metrics sum
it up. A *trainer* (``sft``, ``rm``, ``dpo``, ``kto``, ``ppo``) is one training run:
``synthfb train NAME --config FILE`` runs it. A *composite* method
(``rm_ppo``) is a sequence of trainers, each feeding the next (a reward model,
then PPO against it).

The loop (``method:`` in a loop file) runs any registered method that turns a
round's preference pairs into a new policy (``loop=True``): each step reads
its settings from its ``section`` of the loop file, and the loop fills in the
fields in ``loop_sets`` from what the step reads (``data``) and what it
produces (``produces``). Adding a trainer or a loop method is one entry here;
neither ``synthfb/train/cli.py`` nor ``synthfb/loop/`` names a method. A
trainer marked ``warmup`` (``sft``) can also run once before a loop's first
round (a loop file's ``sft:`` section): rows from a data pipeline -> the
round-0 policy.

This module is import-light: trainer modules (torch) load on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# What a trainer reads: SFT rows, preference pairs, or prompts to sample from.
DataKind = Literal["sft", "pairs", "prompts"]
# What a trainer writes: a policy (causal LM) or a reward model (sequence classifier).
Product = Literal["policy", "reward_model"]


@dataclass(frozen=True)
class Method:
    """One training method. For a trainer ``steps`` is empty; a composite
    method lists the trainers it runs, in order."""

    name: str
    help: str
    module: str = ""  # the trainer's module (imported on first use)
    config_name: str = ""  # its config dataclass
    train_name: str = ""  # its train function: f(cfg, rows=None) -> summary dict
    data: DataKind | None = None
    # the row columns it reads: each entry a column, or alternatives joined with '|' (an alternative may be
    # several columns joined with '+'); see missing_columns
    columns: tuple[str, ...] = ()
    produces: Product = "policy"
    evaluate: Callable[[dict, Any], float] | None = None  # (train summary, config) -> score on the training data
    evaluate_key: str = ""  # the metric name of that score
    metrics: tuple[tuple[str, str, str], ...] = ()  # (name, "first"|"last", metrics.jsonl key)
    record: tuple[str, ...] = ()  # config fields copied into the metrics
    headline: tuple[tuple[str, str], ...] = ()  # (short name, metric) for one-line summaries
    steps: tuple[str, ...] = ()  # composite: the trainers it runs
    loop: bool = False  # usable as a loop file's `method:`
    warmup: bool = False  # usable as a loop's warm-up phase before round 0 (`sft:` in a loop file)
    section: str = ""  # loop-file mapping with this trainer's settings
    loop_sets: tuple[str, ...] = ()  # config fields the loop sets (the user may not)
    loop_defaults: tuple[tuple[str, Any], ...] = ()  # config defaults inside the loop
    reward_from: str = ""  # field that receives the reward model an earlier step produced
    title: str = ""  # for log lines
    # --- what a loop method needs of a round besides its trainers (issue #14; synthfb/loop/round_data.py) ---
    # a loop-layer step that turns the pairs pipeline's output into the trainer's rows, by name, with its
    # settings in the loop-file section of the same name (``spin_pairs``: gold vs own sample; ``best_of_n``)
    round_data: str = ""
    history: int = 0  # earlier rounds whose round data the policy step also trains on (SPIN: 1; -1: all)
    self_judge: bool = False  # the round's judge is the round's policy (the loop sets `judge: policy`)
    round_stages: tuple[str, ...] = ()  # stage kinds the pairs pipeline may end with (empty: any that fits)
    # where the policy step starts: "round" (the round's policy) or "initial" (the loop's `policy`, the base
    # model, every round: Humpback fine-tunes each M_t from the base on seed + A_5^(t-1))
    policy_start: Literal["round", "initial"] = "round"
    # the pairs stages before the last run once, before round 0, into a fixed candidate set that every round's
    # last stage reads again (Humpback: M_yx writes the candidates once, each round's model re-rates them all);
    # the method also needs the loop's `sft:` warm-up, whose rows are mixed into each round's training rows
    fixed_candidates: bool = False
    cite: tuple[str, ...] = ()  # the papers a loop card cites for this method

    @property
    def is_trainer(self) -> bool:
        return not self.steps

    def _attr(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module, __package__), name)

    @property
    def config(self) -> type:
        """The config dataclass (imports the trainer module, i.e. torch)."""
        if not self.is_trainer:
            raise TypeError(f"{self.name} is a composite method ({' + '.join(self.steps)}); it has no single config")
        return self._attr(self.config_name)

    def train(self, cfg: Any, rows: list[dict] | None = None) -> dict[str, Any]:
        """Run the trainer; its summary dict (``steps``, ``history``, ``last``, ``seconds``, ...)."""
        return self._attr(self.train_name)(cfg, rows)

    def missing_columns(self, columns: list[str]) -> list[str]:
        """The entries of ``self.columns`` that rows with ``columns`` do not
        satisfy (an entry is satisfied by any one of its '|' alternatives,
        an alternative by all of its '+' columns)."""
        have = set(columns)
        return [spec for spec in self.columns
                if not any(set(alt.split("+")) <= have for alt in spec.split("|"))]

    def step_methods(self) -> list[Method]:
        """The trainers this method runs: itself, or a composite's steps."""
        return [METHODS[s] for s in self.steps] if self.steps else [self]


def _dpo_accuracy(out: dict, cfg: Any) -> float:
    from .dpo import preference_accuracy

    return preference_accuracy(out["model"], out["tokenizer"], out["examples"], cfg)


def _kto_accuracy(out: dict, cfg: Any) -> float:
    from .kto import label_accuracy

    return label_accuracy(out["model"], out["tokenizer"], out["examples"])


def _rm_accuracy(out: dict, cfg: Any) -> float:
    from .rm import pair_accuracy

    return pair_accuracy(out["model"], out["tokenizer"], out["examples"])


_RESUME = ("resume", "resume_from")
_LOSS = (("first_loss", "first", "loss"), ("final_loss", "last", "loss"))
_PAIRWISE = (*_LOSS, ("final_reward_accuracy", "last", "reward_accuracy"),
             ("final_reward_margin", "last", "reward_margin"))

METHODS: dict[str, Method] = {m.name: m for m in (
    Method(
        "sft", "supervised fine-tuning on prompt/completion or messages rows",
        module=".sft", config_name="SFTConfig", train_name="train_sft",
        data="sft", columns=("prompt+completion|messages",), metrics=_LOSS,
        headline=(("final_loss", "final_loss"),), title="SFT",
        warmup=True, loop_sets=("model", "dataset", "output_dir", *_RESUME),
        section="sft_round",  # its settings as a round's step (method rft); the warm-up's are `sft.train`
    ),
    Method(
        "rm", "reward model: Bradley-Terry on prompt/chosen/rejected (ranked lists: InstructGPT K-way or "
              "Plackett-Luce)",
        module=".rm", config_name="RMConfig", train_name="train_rm",
        data="pairs", columns=("prompt", "chosen", "rejected"), produces="reward_model",
        evaluate=_rm_accuracy, evaluate_key="pair_accuracy", metrics=_PAIRWISE,
        headline=(("pair_accuracy", "pair_accuracy"),), title="reward model",
        section="rm", loop_sets=("dataset", "output_dir", *_RESUME),
        # the loop's pairs carry no margin meant for the RM (a `margin` column there is the judge's)
        loop_defaults=(("margin_column", None),),
    ),
    Method(
        "dpo", "pairwise preference optimization: DPO, cDPO, IPO, hinge, R-DPO, SimPO, CPO, SLiC-HF, RRHF, ORPO",
        module=".dpo", config_name="DPOConfig", train_name="train_dpo",
        data="pairs", columns=("prompt", "chosen", "rejected"),
        evaluate=_dpo_accuracy, evaluate_key="pair_accuracy",
        metrics=(*_PAIRWISE, ("final_rewards_chosen", "last", "rewards_chosen"),
                 ("final_rewards_rejected", "last", "rewards_rejected")),
        headline=(("final_loss", "final_loss"),), title="DPO",
        loop=True, section="train", loop_sets=("model", "dataset", "output_dir", *_RESUME),
    ),
    Method(
        # the loop feeds it the round's pairs (split into desirable/undesirable rows); `synthfb train kto` also
        # reads unpaired prompt/completion/label rows
        "kto", "KTO on unpaired prompt/completion/label rows, or on preference pairs split into them",
        module=".kto", config_name="KTOConfig", train_name="train_kto",
        data="pairs", columns=("prompt", "chosen", "rejected"),
        evaluate=_kto_accuracy, evaluate_key="label_accuracy",
        metrics=(*_LOSS, ("final_kl", "last", "kl"), ("final_label_accuracy", "last", "label_accuracy")),
        headline=(("final_loss", "final_loss"),), title="KTO",
        loop=True, section="kto", loop_sets=("model", "dataset", "output_dir", *_RESUME),
    ),
    Method(
        "ppo", "PPO against a reward model or a Python reward function",
        module=".ppo", config_name="PPOConfig", train_name="train_ppo",
        data="prompts", columns=("prompt",),
        metrics=(("first_score_mean", "first", "score_mean"), ("final_score_mean", "last", "score_mean"),
                 ("final_reward_mean", "last", "reward_mean"), ("final_kl", "last", "kl"),
                 ("final_clipfrac", "last", "clipfrac"), ("final_eos_fraction", "last", "eos_fraction"),
                 ("final_response_length", "last", "response_length")),
        record=("rollout_backend",),
        headline=(("first_score", "first_score_mean"), ("final_score", "final_score_mean"), ("final_kl", "final_kl")),
        title="PPO", section="ppo",
        loop_sets=("model", "dataset", "output_dir", *_RESUME, "reward_model", "reward_function"),
        reward_from="reward_model",
    ),
    Method(
        "rm_ppo", "a reward model on the pairs, then PPO against it",
        steps=("rm", "ppo"), loop=True,
    ),
    # --- loop methods of issue #14 (helper F): each is a trainer plus what its rounds need ---
    Method(
        "spin", "SPIN (Chen et al. 2024): the gold SFT response (chosen) against the round's policy's own sample "
                "(rejected), DPO with the previous iterate as reference, on this round's and the previous round's "
                "pairs",
        steps=("dpo",), loop=True, round_data="spin_pairs", history=1,
        cite=("Chen et al. 2024, Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models, "
              "arXiv:2401.01335 (ICML 2024)",),
    ),
    Method(
        "self_rewarding", "Self-Rewarding (Yuan et al. 2024): the policy samples N answers and judges them itself "
                          "with the additive 5-point rubric (judge_pairs), best vs worst above a score gap, DPO; the "
                          "new model is the next round's policy and judge",
        steps=("dpo",), loop=True, self_judge=True, round_stages=("judge_pairs",),
        cite=("Yuan et al. 2024, Self-Rewarding Language Models, arXiv:2401.10020",),
    ),
    Method(
        "rft", "rejection-sampling fine-tuning (RAFT, Dong et al. 2023; Llama 2): sample N per prompt, score them, "
               "SFT on each prompt's best (best_of_n), regenerate with the new policy",
        steps=("sft",), loop=True, round_data="best_of_n",
        cite=("Dong et al. 2023, RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment, "
              "arXiv:2304.06767",
              "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models (section 3.2.3, rejection "
              "sampling), arXiv:2307.09288"),
    ),
    Method(
        "humpback", "instruction backtranslation (Humpback, Li et al. 2023): a backward model M_yx (`backward:`) "
                    "writes an instruction for every segment once; each round's model (M_0 = the `sft:` warm-up on "
                    "the seed, then M_1, ...) rates all those candidates (self_curate), and the next model is SFT of "
                    "the base `policy` on the seed rows + the kept ones (A_5)",
        steps=("sft",), loop=True, round_data="humpback_union", self_judge=True, round_stages=("self_curate",),
        policy_start="initial", fixed_candidates=True,
        cite=("Li et al. 2023, Self-Alignment with Instruction Backtranslation, arXiv:2308.06259 (ICLR 2024)",),
    ),
)}


def trainers() -> dict[str, Method]:
    """Single training runs: the sub-commands of ``synthfb train``."""
    return {k: m for k, m in METHODS.items() if m.is_trainer}


def loop_methods() -> dict[str, Method]:
    """Methods a loop file's ``method:`` may name (a round's pairs -> a new policy)."""
    return {k: m for k, m in METHODS.items() if m.loop}


def warmup_methods() -> dict[str, Method]:
    """Trainers a loop may run once before round 0 (``sft: {method: ...}``):
    rows from a data pipeline -> the round-0 policy."""
    return {k: m for k, m in METHODS.items() if m.warmup}


def loop_sections() -> dict[str, Method]:
    """Loop-file section -> the trainer whose settings it holds (``train`` -> dpo, ``rm``, ``ppo``)."""
    return {s.section: s for m in loop_methods().values() for s in m.step_methods()}


def round_data_methods() -> dict[str, Method]:
    """Loop methods whose rounds turn the pairs pipeline's output into training rows in the loop layer."""
    return {k: m for k, m in loop_methods().items() if m.round_data}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; expected one of {sorted(METHODS)}") from None


def _check_registry() -> None:
    for m in METHODS.values():
        for s in m.steps:
            assert s in METHODS and METHODS[s].is_trainer, f"{m.name}: step {s!r} is not a registered trainer"
        if m.loop:
            steps = m.step_methods()
            assert steps[-1].produces == "policy", f"{m.name}: a loop method's last step must produce the policy"
            assert all(s.section for s in steps), f"{m.name}: every step needs a loop-file section"
        if m.warmup:
            assert m.is_trainer and m.produces == "policy" and m.data == "sft", \
                f"{m.name}: a warm-up method is a trainer that turns SFT rows into a policy"


_check_registry()

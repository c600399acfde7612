"""PPO for language models (RLHF / RLAIF), after Ouyang et al. 2022 and the
"N+ implementation details of RLHF with PPO" (Huang et al. 2024).

One iteration (one optimizer "step" in ``max_steps``) is four named steps,
called in order by the short loop in :func:`train_ppo`:

1. :func:`rollout`: save the policy as an HF folder and sample completions
   for a batch of prompts through one of our Generators (vLLM: the engine is
   rebuilt from the saved checkpoint each rollout, which is what the CPU build
   allows; or the transformers backend, which is much faster to reload for
   tiny models), keeping the token ids the Generator sampled (and its
   log-probs of them: vLLM), so nothing is re-tokenized; a Generator that
   returns no ids (an OpenAI-compatible server, a scripted fake) has its text
   tokenized instead (EOS appended when the policy stopped);
2. :func:`score`: one score per completion from the reward model
   (:class:`synthfb.rank.reward_model.RewardScorer`, the scorer the rankers
   use, tokenizing as the RM trainer does) or a Python function; optional
   normalisation (:class:`ScoreNormalizer`) and a penalty for completions
   that never emitted EOS. :func:`evaluate` then runs
   the rollout policy and the reference over the sampled tokens (old
   log-probs, reference log-probs, values);
3. :func:`advantages` (pure tensor math): per-token reward
   ``-kl_coef * (log pi_old - log pi_ref)`` plus the score on the last
   generated token (the EOS when the policy stopped; never a pad), GAE
   (:func:`compute_gae`), whitening; value targets = A + V;
4. :func:`update`: ``ppo_epochs`` passes of shuffled minibatches with the
   clipped policy loss and the clipped value loss (value head on the
   policy's last hidden state, or a value network initialised from the reward
   model: ``value_init``), plus, with ``ptx_coef > 0``, the pretraining
   log-likelihood term of PPO-ptx on a stream of ``ptx_dataset`` rows
   (Ouyang et al. 2022, Eq. 2).

Checkpoints and resuming go through the same helpers as the SFT/RM/DPO
trainers (:func:`synthfb.train.loop.checkpoint` / :func:`~synthfb.train.loop.restore`);
the value head travels as ``value_head.pt`` next to the weights.

Layout of a rollout batch: prompts left-padded to width P, responses
right-padded to width R, so response token j sits at column P + j for every
row.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ..rank.reward_model import RewardScorer
from . import loop
from .collate import Tokenizer, collate_sft, load_rows, pad
from .config import TrainConfig, _f
from .logprobs import hidden_states, last_token_index, position_ids_from_mask, token_logps


@dataclass
class PPOConfig(TrainConfig):
    """PPO (``synthfb train ppo``). ``max_steps`` counts PPO iterations (rollouts)."""

    reward_model: str | None = _f(None, "reward model checkpoint (from `synthfb train rm`)", path=True)
    reward_function: str | None = _f(None, "Python reward `module:function` or `file.py:function`, called as f(prompts, completions) -> list of floats")
    ref_model: str | None = _f(None, "frozen reference model for the KL penalty; none = the starting model", path=True)
    rollout_backend: Literal["vllm", "transformers"] = _f("vllm", "Generator used for rollouts (reloaded from the saved policy each rollout)")
    rollout_options: dict = _f({}, "extra options for the rollout Generator (e.g. kv_cache_gib, max_model_len)")
    rollout_batch_size: int = _f(16, "prompts per rollout", ge=1)
    samples_per_prompt: int = _f(1, "completions sampled per prompt", ge=1)
    max_new_tokens: int = _f(64, "max generated tokens per completion", ge=1)
    temperature: float = _f(1.0, "sampling temperature for rollouts", ge=0)
    top_p: float = _f(1.0, "nucleus sampling for rollouts", gt=0, le=1)
    ppo_epochs: int = _f(4, "passes over each rollout", ge=1)
    kl_coef: float = _f(0.05, "per-token KL penalty coefficient", ge=0)
    gamma: float = _f(1.0, "discount", ge=0, le=1)
    lam: float = _f(0.95, "GAE lambda", ge=0, le=1)
    cliprange: float = _f(0.2, "policy ratio clip", gt=0)
    cliprange_value: float = _f(0.2, "value clip around the rollout values", gt=0)
    vf_coef: float = _f(0.1, "value loss weight", ge=0)
    whiten_advantages: bool = _f(True, "normalize advantages to mean 0, std 1 per rollout")
    score_normalization: Literal["none", "running", "batch", "initial"] = _f(
        "none", "normalise the reward scores before the KL penalty and GAE: `running` = (s - mean) / std over every "
                "score seen so far (kept in checkpoints); `batch` = over this rollout; `initial` = with the mean and std "
                "of the first rollout, frozen (Ziegler et al. 2019 normalise the reward on samples of the initial "
                "policy); `none` = raw scores. The logged score_mean/score_std stay raw")
    score_clip: float | None = _f(None, "clip the (normalised) scores to [-score_clip, score_clip]; none = no clipping",
                                  gt=0)
    missing_eos_penalty: float | None = _f(None, "subtract this from the score of completions that did not end with EOS "
                                                 "(after normalisation and clipping)")
    value_init: Literal["zero", "reward_model"] = _f(
        "zero", "value function: `zero` = a linear head on the policy's last hidden state, initialised at 0; "
                "`reward_model` = a copy of the reward model (trunk and scalar head) reading the policy's tokens, so "
                "V(x, y_<t) starts as the RM's score of the prefix (InstructGPT's recipe, Ouyang et al. 2022 App. "
                "C.4); needs `reward_model` with the policy's tokenizer, and memory for a second RM and its optimizer "
                "state")
    ptx_dataset: str | None = _f(None, "PPO-ptx: pretraining or SFT rows mixed into every minibatch: `text` rows "
                                       "(log-likelihood of every token) or SFT rows (`prompt` + `completion`, or "
                                       "`messages`: completion / assistant tokens); used when ptx_coef > 0")
    ptx_coef: float = _f(0.0, "PPO-ptx gamma: adds ptx_coef * (mean token NLL of a ptx minibatch) to each PPO "
                              "minibatch loss (Ouyang et al. 2022, Eq. 2: + gamma E_pretrain[log pi(x)]; the paper's "
                              "gamma is 27.8 with 8x more pretraining examples than RL episodes); 0 = plain PPO, "
                              "ptx_dataset is then not read", ge=0)
    ptx_batch_size: int | None = _f(None, "ptx sequences per PPO minibatch (run in micro-batches of batch_size); none = "
                                          "the PPO minibatch size, batch_size * grad_accum (the paper uses 8x)", ge=1)
    batch_size: int = _f(8, "sequences per micro-batch; a PPO minibatch is batch_size * grad_accum sequences", ge=1)
    learning_rate: float = _f(1e-6, "peak learning rate (AdamW)", gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("constant", "learning-rate decay after warmup")
    max_steps: int | None = _f(10, "PPO iterations (rollouts) to run; none = num_epochs passes over the prompts", ge=1)

    def check(self) -> None:
        if not (self.reward_model or self.reward_function):
            raise ValueError("set `reward_model` or `reward_function`")
        if self.ptx_coef > 0 and not self.ptx_dataset:
            raise ValueError(f"ptx_coef is {self.ptx_coef} but no `ptx_dataset` is set (PPO-ptx needs pretraining or "
                             "SFT rows)")
        if self.value_init == "reward_model" and not self.reward_model:
            raise ValueError("value_init: reward_model needs `reward_model` (a checkpoint to copy the value network "
                             "from)")


# --- math -------------------------------------------------------------------

def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation (Schulman et al. 2016) over (B, T) tensors.

    ``mask`` marks the real tokens of each row (one contiguous span, e.g. a
    right-padded response); the value after the last real token is 0 (the
    episode ends). Returns ``(advantages, returns)``, zero outside the mask.
    """
    mask = mask.to(rewards.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        nv = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nv - values[:, t]
        last = delta + gamma * lam * last * nxt
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    m = masked_mean(x, mask)
    var = masked_mean((x - m) ** 2, mask)
    return ((x - m) * torch.rsqrt(var + eps)) * mask


def place_score(token_rewards: torch.Tensor, scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Add each row's score at its last real response token (EOS if present), never on padding."""
    idx = last_token_index(response_mask)
    out = token_rewards.clone()
    rows = torch.arange(out.shape[0], device=out.device)
    ok = idx >= 0
    out[rows[ok], idx[ok]] += scores[ok].to(out.dtype)
    return out


def ppo_losses(new_logps, old_logps, advantages, values, old_values, returns, mask, cliprange, cliprange_value):
    """Clipped policy and value losses as masked *sums* plus statistic sums (per token)."""
    ratio = torch.exp(new_logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg = torch.maximum(pg1, pg2)
    vclip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (vclip - returns) ** 2
    vf = 0.5 * torch.maximum(vf1, vf2)
    m = mask.to(pg.dtype)
    with torch.no_grad():
        stats = {
            "clipfrac": float(((pg2 > pg1).float() * m).sum()),
            "vf_clipfrac": float(((vf2 > vf1).float() * m).sum()),
            "ratio": float((ratio * m).sum()),
            "ratio_max_dev": float(((ratio - 1).abs() * m).max()),
            "approx_kl": float((0.5 * (new_logps - old_logps) ** 2 * m).sum()),
        }
    return (pg * m).sum(), (vf * m).sum(), stats


# --- rollout batch ---------------------------------------------------------

def rollout_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict:
    """Left-padded prompts + right-padded responses (see the module doc)."""
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    ids_p = pad(prompt_ids, pad_id, "left")
    mask_p = pad([[1] * len(p) for p in prompt_ids], 0, "left")
    ids_r = pad([r if r else [pad_id] for r in response_ids], pad_id, "right")[:, :R]
    mask_r = pad([[1] * len(r) if r else [0] for r in response_ids], 0, "right")[:, :R]
    return {"input_ids": torch.cat([ids_p, ids_r], 1), "attention_mask": torch.cat([mask_p, mask_r], 1),
            "response_mask": mask_r, "P": P}


def policy_forward(model, value_head, batch: dict, with_values: bool = True):
    """Per-response-token log-probs (N, R), values (N, R) and entropies (N, R)."""
    ids, am, P = batch["input_ids"], batch["attention_mask"], batch["P"]
    R = ids.shape[1] - P
    h = hidden_states(model, ids, am)
    hs = h[:, P - 1: P - 1 + R]  # the state from which response token j is chosen
    logits = model.get_output_embeddings()(hs).float()
    lse = torch.logsumexp(logits, -1)
    tgt = ids[:, P:]
    lp = logits.gather(-1, tgt[..., None])[..., 0] - lse
    with torch.no_grad():
        ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    if not with_values:
        v = None
    elif isinstance(value_head, RewardValueModel):
        v = value_head(ids, am, P, R)
    else:
        v = value_head(hs.to(value_head.weight.dtype))[..., 0].float()
    return lp, v, ent


class RewardValueModel(torch.nn.Module):
    """A value network initialised from a reward model (``value_init: reward_model``).

    V(x, y_<t) is the reward model's scalar head on its own last hidden state
    at the position from which response token t is chosen, i.e. the RM's score
    of the prefix (x, y_<t) read as :func:`synthfb.train.rm.reward_scores`
    reads a sequence's score (position ids from the attention mask). Ouyang et
    al. 2022 (App. C.4) initialise the value function from the RM; TRL's PPO
    does the same with a separate value model.
    """

    def __init__(self, reward_model):
        super().__init__()
        head = getattr(reward_model, "score", None)
        if not isinstance(head, torch.nn.Module):
            raise ValueError(f"value_init: reward_model needs a decoder reward model with a `score` head; "
                             f"{type(reward_model).__name__} has none")
        self.rm = reward_model

    def forward(self, input_ids, attention_mask, P: int, R: int) -> torch.Tensor:
        """(N, R) values of the response positions of a rollout batch (prompt width P)."""
        h = self.rm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
        return self.rm.score(h[:, P - 1: P - 1 + R])[..., 0].float()


def make_value_function(cfg: PPOConfig, model, tok, dev) -> torch.nn.Module:
    """The value function ``cfg.value_init`` asks for: a zero-initialised linear
    head on the policy's hidden state, or a :class:`RewardValueModel` loaded from
    ``cfg.reward_model`` (its tokenizer must be the policy's: it reads the
    policy's token ids)."""
    if cfg.value_init == "zero":
        vhead = torch.nn.Linear(model.config.hidden_size, 1).to(dev)
        torch.nn.init.zeros_(vhead.weight)
        torch.nn.init.zeros_(vhead.bias)
        return vhead
    from transformers import AutoModelForSequenceClassification

    rm_tok = loop.load_tokenizer(cfg.reward_model)
    if rm_tok.get_vocab() != tok.get_vocab():
        raise ValueError(f"value_init: reward_model: {cfg.reward_model} has a different tokenizer from the policy "
                         f"{cfg.model}; the value network reads the policy's token ids, so they must share one")
    rm = AutoModelForSequenceClassification.from_pretrained(cfg.reward_model, num_labels=1,
                                                            dtype=getattr(torch, cfg.dtype)).to(dev)
    rm.config.pad_token_id = tok.pad_token_id
    rm.eval()  # no dropout, as the policy: the first minibatch reproduces the rollout values
    if cfg.gradient_checkpointing:
        rm.gradient_checkpointing_enable()
    return RewardValueModel(rm)


# --- reward normalisation ---------------------------------------------------

class ScoreNormalizer:
    """``score_normalization`` and ``score_clip`` of :class:`PPOConfig` as a
    function of a rollout's raw scores (N,) -> normalised scores (N,).

    ``running``: mean and (population) std of every score seen so far, this
    rollout included, merged batch by batch (Chan et al. 1979's parallel
    update, in float64); ``batch``: of this rollout; ``initial``: of the first
    rollout, then frozen; ``none``: unchanged. A std below 1e-8 counts as
    1e-8. ``state_dict`` / ``load_state_dict`` carry the statistics across a
    resume.
    """

    def __init__(self, mode: str = "none", clip: float | None = None):
        self.mode, self.clip = mode, clip
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n = x.numel()
        if n == 0:
            return
        mb = float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        tot = self.count + n
        delta = mb - self.mean
        self.mean += delta * n / tot
        self.m2 += m2b + delta * delta * self.count * n / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.double()
        if self.mode == "batch":
            mean, std = float(x.mean()), float(x.std(unbiased=False)) if x.numel() > 1 else 0.0
        elif self.mode == "running" or (self.mode == "initial" and self.count == 0):
            self.update(x)
            mean, std = self.mean, self.std
        elif self.mode == "initial":
            mean, std = self.mean, self.std
        else:
            mean, std = 0.0, 1.0
        y = (x - mean) / max(std, 1e-8)
        if self.clip is not None:
            y = y.clamp(-self.clip, self.clip)
        return y.to(raw.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, st: dict) -> None:
        self.count, self.mean, self.m2 = int(st["count"]), float(st["mean"]), float(st["m2"])


# --- PPO-ptx ------------------------------------------------------------------

def ptx_examples(rows: list[dict], tok, max_length: int | None, where: str = "ptx_dataset") -> list[dict]:
    """``input_ids`` + ``loss_mask`` per ptx row: a ``text`` row is a document
    (the tokenizer's special tokens, EOS appended, every token in the loss);
    other rows are SFT rows, tokenized as ``synthfb train sft`` does (loss on
    the completion / assistant tokens). Cut to ``max_length`` tokens."""
    from ..data.io import InputError

    T = Tokenizer(tok, max_length)
    eos = tok.eos_token_id
    out = []
    for i, r in enumerate(rows):
        try:
            if isinstance(r.get("text"), str):
                ids = list(tok(r["text"])["input_ids"])
                if eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)
                ids = ids[:max_length] if max_length else ids
                if len(ids) < 2:
                    raise InputError(f"row {i}: `text` has fewer than 2 tokens; nothing to predict")
                out.append({"input_ids": ids, "loss_mask": [1] * len(ids)})
            else:
                if "text" in r and r["text"] is not None:
                    raise InputError(f"row {i}: `text` must be a string, got {type(r['text']).__name__}")
                out.append(T.sft_example(r, i))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    if not out:
        raise InputError(f"{where}: no rows")
    return out


class PtxStream:
    """The PPO-ptx minibatches: ``take(k)`` returns the next ``k`` example indices
    of an endless stream that walks the data in a fresh seeded permutation per
    pass. The stream is a pure function of (seed, cursor); the cursor travels in
    checkpoints, so a resumed run continues it."""

    def __init__(self, examples: list[dict], seed: int, cursor: int = 0):
        self.examples, self.seed, self.cursor = examples, seed, cursor
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, p: int) -> list[int]:
        if self._perm is None or self._perm[0] != p:
            g = torch.Generator().manual_seed(self.seed * 1000003 + 7919 * (p + 1))
            self._perm = (p, torch.randperm(len(self.examples), generator=g).tolist())
        return self._perm[1]

    def take(self, k: int) -> list[int]:
        n = len(self.examples)
        out = []
        for c in range(self.cursor, self.cursor + k):
            out.append(self._order(c // n)[c % n])
        self.cursor += k
        return out


def ptx_nll(model, items: list[dict], pad_id: int, dev) -> tuple[torch.Tensor, float]:
    """(summed NLL over the loss tokens, their number) of SFT-style examples
    under ``model`` (right-padded; the first token of a row has no context and
    is not predicted)."""
    b = collate_sft(items, pad_id, "right")
    ids, am, lm = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["loss_mask"].to(dev)
    lm[:, 0] = 0
    lp = token_logps(model, ids, am, lm)
    return -(lp * lm).sum(), float(lm.sum())


def _ptx_tokens(ex: dict) -> int:
    return sum(ex["loss_mask"][1:])


# --- reward ----------------------------------------------------------------

def load_reward_function(spec: str) -> Callable[[list, list[str]], list[float]]:
    """``module:function`` or ``path/file.py:function``."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"reward_function {spec!r}: expected `module:function` or `file.py:function`")
    if mod_name.endswith(".py"):
        s = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
        if s is None or s.loader is None:
            raise ValueError(f"reward_function: cannot load {mod_name}")
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward_function: {mod_name} has no function {fn_name!r}")
    return fn


def RewardModelScorer(path: str, dtype: str = "float32", device=None, batch_size: int = 16) -> RewardScorer:
    """PPO's ``reward_fn`` for a reward model checkpoint: the shared
    :class:`~synthfb.rank.reward_model.RewardScorer` (the ``reward_model``
    ranker's scorer), called as ``f(prompts, completions) -> list of floats``.

    A completion after a chat prompt is scored as the assistant turn; after a
    string prompt as its continuation plus EOS; truncated with the limits the
    RM was trained with (exactly as ``synthfb train rm`` tokenized its pairs).
    """
    return RewardScorer.from_pretrained(path, dtype=dtype, device=device, batch_size=batch_size)


# --- rollouts --------------------------------------------------------------

def default_generator_factory(cfg: PPOConfig) -> Callable[[str, int], Any]:
    """``factory(checkpoint_dir, seed) -> Generator`` for ``cfg.rollout_backend``."""

    def make(path: str, seed: int):
        from ..llm import load_generator

        opts = dict(cfg.rollout_options)
        opts.setdefault("seed", seed)
        opts.setdefault("progress", False)
        opts.setdefault("dtype", cfg.dtype)
        return load_generator(cfg.rollout_backend, path, **opts)

    return make


@dataclass
class Sample:
    """One sampled completion as the Generator returned it."""

    prompt: Any
    text: str
    stopped: bool                         # finish_reason == "stop"
    token_ids: list[int] | None = None    # the sampled ids (None: the Generator gives none)
    logprobs: list[float] | None = None   # the engine's log-prob of each sampled id (vLLM)
    prompt_ids: list[int] | None = None   # the prompt as the Generator tokenized it


def generate_samples(gen, prompts: list, cfg: PPOConfig) -> list[Sample]:
    """``cfg.samples_per_prompt`` samples per prompt through the Generator
    protocol, in prompt order, with the engine's token ids and log-probs."""
    from ..llm.types import GenerationRequest, SamplingParams

    sp = SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
    reqs = [GenerationRequest(messages=p, params=sp, token_logprobs=True) if isinstance(p, list)
            else GenerationRequest(prompt=p, params=sp, token_logprobs=True) for p in prompts]
    out = []
    for p, res in zip(prompts, gen.generate(reqs)):
        for c in res.completions:
            out.append(Sample(p, c.text, c.finish_reason == "stop", getattr(c, "token_ids", None),
                              getattr(c, "logprobs", None), getattr(res, "prompt_token_ids", None)))
    return out


def sample(gen, prompts: list, cfg: PPOConfig) -> list[tuple[Any, str, bool]]:
    """(prompt, completion text, stopped) per sample (:func:`generate_samples` without the ids)."""
    return [(s.prompt, s.text, s.stopped) for s in generate_samples(gen, prompts, cfg)]


def _prompt_of(row: dict, i: int):
    from ..data.io import InputError

    p = row.get("prompt")
    if p is None and isinstance(row.get("messages"), list):
        p = [m for m in row["messages"] if m.get("role") != "assistant"] or None
    if p is None:
        raise InputError(f"row {i}: PPO rows need a `prompt` (string or messages); got columns {sorted(row)}")
    return p


# --- the four steps of one PPO iteration -------------------------------------

@dataclass
class Rollout:
    """One rollout: N = prompts x ``samples_per_prompt`` samples, in sampling order."""

    prompts: list            # the prompt of each sample (string or messages)
    completions: list[str]   # the sampled text
    prompt_ids: list[list[int]]    # prompt tokens exactly as the Generator tokenized them (no truncation)
    response_ids: list[list[int]]  # sampled tokens (<= max_new_tokens), + EOS when the policy stopped
    has_eos: torch.Tensor    # (N,) bool: the response ends with EOS
    seconds: float = 0.0
    engine_logprobs: list[list[float] | None] | None = None  # the engine's log-probs of response_ids, where given
    engine_ids: list[bool] | None = None  # per sample: response_ids are the engine's own (not re-tokenized text)

    def __len__(self) -> int:
        return len(self.completions)


def rollout(model, tok, prompts: list, cfg: PPOConfig, factory: Callable[[str, int], Any], step: int,
            rollout_dir: Path) -> Rollout:
    """Step 1: sample ``cfg.samples_per_prompt`` completions per prompt from the
    current weights (saved to ``rollout_dir``, read by ``factory(rollout_dir,
    cfg.seed + step)``), and tokenize them for the policy."""
    t0 = time.perf_counter()
    shutil.rmtree(rollout_dir, ignore_errors=True)
    model.save_pretrained(rollout_dir, safe_serialization=True)
    tok.save_pretrained(rollout_dir)
    gen = factory(str(rollout_dir), cfg.seed + step)
    try:
        samples = generate_samples(gen, prompts, cfg)
    finally:
        close = getattr(gen, "close", None)
        if close:
            close()
        del gen
        gc.collect()
    seconds = time.perf_counter() - t0
    T = Tokenizer(tok)  # for Generators that return no ids: prompts as the Generator tokenizes them
    eos = tok.eos_token_id
    gen_cfg = getattr(model, "generation_config", None)
    stops = {eos, *_as_list(getattr(gen_cfg, "eos_token_id", None))} - {None}
    p_ids, r_ids, eos_flags, lps, own = [], [], [], [], []
    for s in samples:
        p_ids.append(list(s.prompt_ids) if s.prompt_ids is not None else T.prompt_ids(s.prompt))
        if s.token_ids is not None:  # the engine's own ids: no re-tokenization
            ids = list(s.token_ids)
            eos_flags.append(s.stopped and bool(ids) and ids[-1] in stops)
            lps.append(list(s.logprobs) if s.logprobs is not None and len(s.logprobs) == len(ids) else None)
            own.append(True)
        else:
            ids = list(tok(s.text, add_special_tokens=False)["input_ids"])[: cfg.max_new_tokens]
            if s.stopped and eos is not None:
                ids = ids[: cfg.max_new_tokens] + [eos]
            eos_flags.append(bool(ids) and ids[-1] == eos)
            lps.append(None)
            own.append(False)
        r_ids.append(ids)
    return Rollout([s.prompt for s in samples], [s.text for s in samples], p_ids, r_ids, torch.tensor(eos_flags),
                   seconds, lps, own)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


def engine_logprob_gap(ro: Rollout, logprobs: torch.Tensor) -> float | None:
    """Mean |engine log-prob - policy log-prob| over the response tokens that
    have an engine log-prob (None if none do): how far the rollout engine's
    numbers are from the trainer's for the same ids (dtype, kernels); the
    trainer's own log-probs are the ones PPO uses as pi_old."""
    if not ro.engine_logprobs:
        return None
    tot, n = 0.0, 0
    for i, lp in enumerate(ro.engine_logprobs):
        if lp:
            tot += float((torch.tensor(lp) - logprobs[i, :len(lp)].cpu()).abs().sum())
            n += len(lp)
    return tot / n if n else None


def score(ro: Rollout, reward_fn: Callable[[list, list[str]], list[float]],
          missing_eos_penalty: float | None = None,
          normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: ``(raw, scores)``, (N,) float32: ``reward_fn(prompts, completions)``
    and the same through ``normalize`` (a :class:`ScoreNormalizer`) minus
    ``missing_eos_penalty`` where the response has no EOS."""
    raw = torch.tensor([float(x) for x in reward_fn(ro.prompts, ro.completions)])
    if len(raw) != len(ro):
        raise ValueError(f"reward function returned {len(raw)} scores for {len(ro)} completions")
    scores = raw.clone() if normalize is None else normalize(raw)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ro.has_eos).float()
    return raw, scores


def _micro_batch(ro: Rollout, rows: list[int], pad_id: int, dev) -> dict:
    b = rollout_batch([ro.prompt_ids[i] for i in rows], [ro.response_ids[i] for i in rows], pad_id)
    return loop.to_device(b, dev)


@dataclass
class Evaluated:
    """The rollout under the rollout-time weights, (N, R) each, zero past each response."""

    logprobs: torch.Tensor      # log pi_old(y_t | x, y_<t)
    ref_logprobs: torch.Tensor  # log pi_ref(y_t | x, y_<t)
    values: torch.Tensor        # V(x, y_<t)
    mask: torch.Tensor          # 1.0 on real response tokens


@torch.no_grad()
def evaluate(model, value_head, ref, ro: Rollout, batch_size: int, pad_id: int, dev) -> Evaluated:
    """Old (rollout-policy) log-probs and values and reference log-probs of the
    sampled tokens, in micro-batches of ``batch_size``."""
    N = len(ro)
    old_lp, old_v, ref_lp, masks = [], [], [], []
    for s in range(0, N, batch_size):
        b = _micro_batch(ro, list(range(s, min(s + batch_size, N))), pad_id, dev)
        lp, v, _ = policy_forward(model, value_head, b)
        rl, _, _ = policy_forward(ref, None, b, with_values=False)
        old_lp.append(lp), old_v.append(v), ref_lp.append(rl), masks.append(b["response_mask"].float())
    # pad every micro-batch's response dim to a common R for the GAE pass
    R = max(m.shape[1] for m in masks)

    def cat(ts):
        return torch.cat([torch.nn.functional.pad(t, (0, R - t.shape[1])) for t in ts])

    return Evaluated(cat(old_lp), cat(ref_lp), cat(old_v), cat(masks))


@dataclass
class Advantages:
    """Output of :func:`advantages`, (N, R) each."""

    kl: torch.Tensor          # log pi_old - log pi_ref on the mask
    rewards: torch.Tensor     # per-token shaped rewards
    advantages: torch.Tensor  # GAE, whitened if asked
    returns: torch.Tensor     # value targets (before whitening)


def advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor, *, kl_coef: float, gamma: float = 1.0, lam: float = 0.95,
               whiten: bool = True) -> Advantages:
    r"""Step 3, pure tensor math on (N, R) response-token tensors (``scores`` is (N,)).

    With m_t the response mask, T_i the last real token of row i and
    kl_t = (log pi_old(y_t) - log pi_ref(y_t)) m_t:

    - KL-shaped reward (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2, with
      the KL spread per token as in Huang et al. 2024, "The N+ Implementation
      Details of RLHF with PPO", arXiv:2403.17031):
      r_t = -kl_coef * kl_t + [t = T_i] * score_i  (the score on the EOS when
      the policy stopped, never on a pad: :func:`place_score`);
    - GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using
      Generalized Advantage Estimation", eq. 16) with V = 0 after the last
      real token (the episode ends):
      delta_t = r_t + gamma * V_{t+1} m_{t+1} - V_t,
      A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1};
    - value targets G_t = A_t + V_t, taken *before* whitening (as in the
      reference implementation of Huang et al. 2024 / TRL);
    - whitening over the real tokens of the whole rollout:
      A <- (A - mean(A)) / sqrt(var(A) + 1e-8) (:func:`masked_whiten`;
      the mean is not added back).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = place_score(-kl_coef * kl, scores.to(mask.device), mask)
    adv, ret = compute_gae(rewards, values * mask, mask, gamma, lam)
    if whiten:
        adv = masked_whiten(adv, mask)
    return Advantages(kl, rewards, adv, ret)


def update(model, value_head, opt, ro: Rollout, ev: Evaluated, adv: Advantages, cfg: PPOConfig, step: int,
           pad_id: int, dev, ptx: PtxStream | None = None) -> dict[str, float]:
    r"""Step 4: ``cfg.ppo_epochs`` passes over the rollout in shuffled minibatches
    of ``batch_size * grad_accum`` sequences (``batch_size`` per backward), one
    optimizer step per minibatch (the scheduler is not stepped here).

    Per token, with ratio rho_t = exp(log pi(y_t) - log pi_old(y_t)) (Schulman
    et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, as a loss)
    and the value clipped around the rollout values (the PPO2 baselines
    implementation; Huang et al. 2024):

    - pg_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - cliprange, 1 + cliprange));
    - vf_t = 0.5 max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, +-cliprange_value) - G_t)^2);
    - minibatch loss = sum_t (pg_t + vf_coef vf_t) / (real tokens in the minibatch),
      gradients clipped to ``max_grad_norm`` over policy + value head;
    - PPO-ptx (``ptx`` given and ``ptx_coef`` > 0; Ouyang et al. 2022, Eq. 2):
      + ptx_coef * (summed NLL / loss tokens) of the next ``ptx_batch_size``
      rows of the ptx stream, in the same optimizer step. Eq. 2 adds
      gamma E_pretrain[log pi(x)] to the objective; we average the NLL over
      tokens rather than sum it per sequence, so gamma does not scale with the
      documents' length (as DeepSpeed-Chat and OpenRLHF do). With
      ``ptx_coef`` 0 nothing of this runs: the update is plain PPO, bit for bit.

    Returns the loss sums and per-minibatch statistics (see :func:`train_ppo`'s metrics).
    The shuffle is a pure function of (seed, step), so a resumed run repeats it.
    """
    N = len(ro)
    mask, old_lp, old_v = ev.mask, ev.logprobs, ev.values
    A, ret = adv.advantages, adv.returns
    params = list(model.parameters()) + list(value_head.parameters())
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    mb = cfg.batch_size * cfg.grad_accum
    use_ptx = ptx is not None and cfg.ptx_coef > 0
    ptx_bs = cfg.ptx_batch_size or mb
    sums: dict[str, float] = {}
    first: dict[str, float] | None = None
    n_mb = 0
    pg_tot = vf_tot = 0.0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(N, generator=g).tolist()
        for s in range(0, N, mb):
            sel = perm[s:s + mb]
            ntok = float(mask[sel].sum())
            mstats: dict[str, float] = {}
            for u in range(0, len(sel), cfg.batch_size):
                ui = sel[u:u + cfg.batch_size]
                b = _micro_batch(ro, ui, pad_id, dev)
                r = b["response_mask"].shape[1]
                lp, v, ent = policy_forward(model, value_head, b)
                m = mask[ui, :r]
                pg, vf, st = ppo_losses(lp, old_lp[ui, :r], A[ui, :r], v, old_v[ui, :r], ret[ui, :r], m,
                                        cfg.cliprange, cfg.cliprange_value)
                ((pg + cfg.vf_coef * vf) / max(ntok, 1.0)).backward()
                pg_tot += float(pg.detach())
                vf_tot += float(vf.detach())
                st["entropy"] = float((ent * m).sum())
                for k, x in st.items():
                    mstats[k] = max(mstats.get(k, 0.0), x) if k == "ratio_max_dev" else mstats.get(k, 0.0) + x
            nll_mb = None
            if use_ptx:
                rows = ptx.take(ptx_bs)
                ptok = float(sum(_ptx_tokens(ptx.examples[i]) for i in rows))
                nll_mb = 0.0
                for u in range(0, len(rows), cfg.batch_size):
                    nll, _ = ptx_nll(model, [ptx.examples[i] for i in rows[u:u + cfg.batch_size]], pad_id, dev)
                    (cfg.ptx_coef * nll / max(ptok, 1.0)).backward()
                    nll_mb += float(nll.detach()) / max(ptok, 1.0)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            norm = {k: (x if k == "ratio_max_dev" else x / max(ntok, 1.0)) for k, x in mstats.items()}
            if nll_mb is not None:
                norm["ptx_nll"] = nll_mb  # mean NLL per ptx loss token, before this minibatch's step
            if first is None:
                first = norm
            for k, x in norm.items():
                sums[k] = max(sums.get(k, 0.0), x) if k == "ratio_max_dev" else sums.get(k, 0.0) + x
            n_mb += 1
    total_tok = float(mask.sum())
    out = {"pg_loss": pg_tot / (total_tok * cfg.ppo_epochs), "vf_loss": vf_tot / (total_tok * cfg.ppo_epochs),
           "first_minibatch_ratio": first["ratio"] if first else None,
           "first_minibatch_ratio_max_dev": first["ratio_max_dev"] if first else None,
           "first_minibatch_clipfrac": first["clipfrac"] if first else None}
    if use_ptx:
        out["first_minibatch_ptx_nll"] = first["ptx_nll"] if first else None
    out.update({k: (x if k == "ratio_max_dev" else x / max(n_mb, 1)) for k, x in sums.items()})
    return out


# --- the loop --------------------------------------------------------------

@loop.owns_output
def train_ppo(cfg: PPOConfig, rows: list[dict] | None = None, reward_fn: Callable | None = None,
              generator_factory: Callable[[str, int], Any] | None = None) -> dict:
    """Run PPO; the policy ends up in ``cfg.output_dir`` (value head in ``value_head.pt``)."""
    loop.seed_all(cfg.seed)
    rows = load_rows(cfg.dataset) if rows is None else rows  # data errors before anything is written or loaded
    prompts = [_prompt_of(r, i) for i, r in enumerate(rows)]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = loop.device_of(cfg)
    tok = loop.load_tokenizer(cfg.model)
    pad_id = tok.pad_token_id
    ptx = (PtxStream(ptx_examples(load_rows(cfg.ptx_dataset), tok, cfg.max_length, f"ptx_dataset {cfg.ptx_dataset}"),
                     cfg.seed)
           if cfg.ptx_coef > 0 else None)  # its data errors too before any model loads
    if reward_fn is None:
        reward_fn = (load_reward_function(cfg.reward_function) if cfg.reward_function
                     else RewardModelScorer(cfg.reward_model, cfg.dtype, dev))
    factory = generator_factory or default_generator_factory(cfg)

    model = loop.load_causal_lm(cfg.model, cfg)
    model.eval()  # no dropout: the first minibatch must reproduce the rollout log-probs
    ref = loop.load_causal_lm(cfg.ref_model or cfg.model, cfg).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    vhead = make_value_function(cfg, model, tok, dev)
    norm = (ScoreNormalizer(cfg.score_normalization, cfg.score_clip)
            if cfg.score_normalization != "none" or cfg.score_clip is not None else None)
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * len(prompts) / cfg.rollout_batch_size))
    opt, sched = loop.make_optimizer(list(model.parameters()) + list(vhead.parameters()), cfg, total)

    def restore_extra(d: Path, st: dict) -> None:
        vhead.load_state_dict(torch.load(d / "value_head.pt"))
        if ptx is not None:
            ptx.cursor = int(st.get("ptx_cursor", 0))
        if norm is not None and "score_normalizer" in st:
            norm.load_state_dict(st["score_normalizer"])

    def extra_state() -> dict:
        st: dict[str, Any] = {}
        if ptx is not None:
            st["ptx_cursor"] = ptx.cursor
        if norm is not None:
            st["score_normalizer"] = norm.state_dict()
        return st

    step = loop.restore(cfg, model, opt, sched, extra=restore_extra)
    log = loop.MetricsLog(out, step)
    n_batches = math.ceil(len(prompts) / cfg.rollout_batch_size)
    rollout_dir = out / "rollout-policy"
    t_start = time.perf_counter()
    last: dict = {}
    while step < total:
        e, k = divmod(step, n_batches)
        idx = loop.epoch_batches(len(prompts), cfg.rollout_batch_size, cfg.seed, e)[k]
        ro = rollout(model, tok, [prompts[i] for i in idx], cfg, factory, step, rollout_dir)
        raw, scores = score(ro, reward_fn, cfg.missing_eos_penalty, norm)
        ev = evaluate(model, vhead, ref, ro, cfg.batch_size, pad_id, dev)
        adv = advantages(scores, ev.logprobs, ev.ref_logprobs, ev.values, ev.mask, kl_coef=cfg.kl_coef,
                         gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages)
        gap = engine_logprob_gap(ro, ev.logprobs)
        t1 = time.perf_counter()
        stats = update(model, vhead, opt, ro, ev, adv, cfg, step, pad_id, dev, ptx)
        sched.step()
        step += 1
        N = len(ro)
        seq_kl = adv.kl.sum(-1)
        last = {
            "step": step, "score_mean": float(raw.mean()), "score_std": float(raw.std()) if N > 1 else 0.0,
            "reward_mean": float((scores.to(dev) - cfg.kl_coef * seq_kl).mean()), "kl": float(seq_kl.mean()),
            "response_length": float(ev.mask.sum()) / N, "eos_fraction": float(ro.has_eos.float().mean()),
            "pg_loss": stats.pop("pg_loss"), "vf_loss": stats.pop("vf_loss"),
            "lr": sched.get_last_lr()[0], "rollout_s": ro.seconds, "train_s": time.perf_counter() - t1,
            **stats,
        }
        if norm is not None:
            last["score_normalized_mean"] = float(scores.mean())
        if ptx is not None:
            last["ptx_loss"] = cfg.ptx_coef * last["ptx_nll"]
        if gap is not None:
            last["engine_logprob_gap"] = gap
        if step % cfg.logging_steps == 0 or step == total:
            log.write(last)
        loop.checkpoint(cfg, out, step, total, model, tok, opt, sched, extra_state=extra_state(),
                        extra=lambda d: torch.save(vhead.state_dict(), d / "value_head.pt"))
    shutil.rmtree(rollout_dir, ignore_errors=True)
    loop.save_final(out, model, tok, cfg)
    torch.save(vhead.state_dict(), out / "value_head.pt")
    return {"steps": step, "last": last, "history": log.history, "seconds": time.perf_counter() - t_start,
            "model": model, "value_head": vhead, "tokenizer": tok}


__all__ = ["Advantages", "Evaluated", "PPOConfig", "PtxStream", "RewardModelScorer", "RewardValueModel", "Rollout",
           "Sample", "ScoreNormalizer", "advantages", "compute_gae", "engine_logprob_gap", "evaluate",
           "generate_samples", "make_value_function", "place_score", "ppo_losses", "ptx_examples", "ptx_nll", "rollout",
           "score", "train_ppo", "update"]

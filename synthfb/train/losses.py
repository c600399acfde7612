"""Preference objectives: pure functions on sequence log-probs, one per method.

Every function returns **per-example** losses of shape (B,); the trainers sum
them and divide by the number of examples of the optimizer step. Notation
(the SimPO paper's Table 3, Meng et al. 2024, arXiv 2405.14734, whose table
of objectives this module follows, each row checked against its own paper):

- ``*_logps``: summed token log-probs of a response, log pi(y|x) (s(y));
- ``*_lengths``: response token counts |y|; s(y)/|y| is the mean (a(y));
- ``ref_*``: the same under the frozen reference policy; rho(y) = s(y) - s_ref(y).

Which objective needs what:

=========  =========================================  ==========  ============
objective  function                                   reference   lengths
=========  =========================================  ==========  ============
DPO/cDPO   :func:`sigmoid_loss`                       yes         no
IPO        :func:`ipo_loss`                           yes         (see doc)
hinge      :func:`hinge_loss` (RSO hinge-norm)        yes         no
R-DPO      :func:`rdpo_loss`                          yes         yes
KTO        :func:`kto_loss` (+ :func:`kto_kl`)        yes         no
SimPO      :func:`simpo_loss`                         no          yes
CPO        :func:`cpo_loss`                           no          no
SLiC-HF    :func:`slic_loss`                          no          no
RRHF       :func:`rrhf_loss`                          no          yes
ORPO       :func:`orpo_loss`                          no          yes
=========  =========================================  ==========  ============

Where TRL 1.16 implements an objective differently from its paper, the
function's docstring says how, and which one we follow (the paper, unless
stated); ``tests/test_trl_parity.py`` pins the relation on a tiny model.
:func:`dpo_loss` is the older single entry point of the DPO trainer
(sigmoid / cDPO, ipo, hinge, simpo by ``loss_type``), kept for callers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_LN2 = math.log(2.0)


def _soft_logistic(z: Tensor, label_smoothing: float | Tensor) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss of a
    Bradley-Terry margin z with a soft label p(chosen) = 1 - eps."""
    eps = label_smoothing
    if isinstance(eps, (int, float)) and eps == 0:
        return -F.logsigmoid(z)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# -- reference-based ----------------------------------------------------------------------------------------------

def sigmoid_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                 beta: float, label_smoothing: float | Tensor = 0.0) -> Tensor:
    """DPO: ``-log sigmoid(beta * (rho_w - rho_l))``.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
    is Secretly a Reward Model" (arXiv 2305.18290), Eq. 7. With
    ``label_smoothing`` eps > 0 it is conservative DPO (cDPO; Mitchell 2023,
    "A note on DPO with noisy preferences & relationship to IPO"):
    ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, a soft label
    p(chosen) = 1 - eps (a float, or one value per example). TRL 1.16's
    ``loss_type="sigmoid"`` equals the eps = 0 case (its sigmoid has no label
    smoothing).
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return _soft_logistic(beta * h, label_smoothing)


def ipo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> Tensor:
    """IPO: ``(h - 1/(2 beta))^2`` with h = rho_w - rho_l and beta in the role of tau.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences" (arXiv 2310.12036), Eq. 17. With lengths, each
    log-ratio is divided by its response length first (h = rho_w/|y_w| -
    rho_l/|y_l|): TRL 1.16's ``loss_type="ipo"`` does this (its code comment:
    confirmed with the IPO authors, though the paper does not state it). Our
    trainer passes the lengths, as TRL does; without them this is the
    paper's formula on summed log-probs.
    """
    rc, rr = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if chosen_lengths is not None:
        rc = rc / chosen_lengths.clamp(min=1)
    if rejected_lengths is not None:
        rr = rr / rejected_lengths.clamp(min=1)
    return (rc - rr - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
               beta: float) -> Tensor:
    """Hinge on reference log-ratios: ``relu(1 - beta * (rho_w - rho_l))``.

    This is RSO's "hinge-norm" loss (Liu et al. 2023, "Statistical Rejection
    Sampling Improves Preference Optimization", arXiv 2309.06657, §3) and
    TRL 1.16's ``loss_type="hinge"``. It is **not** SLiC-HF: SLiC-HF has no
    reference model and adds a likelihood term (see :func:`slic_loss`), though
    TRL's paper index files ``hinge`` under SLiC.
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return torch.relu(1 - beta * h)


def rdpo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float, alpha: float,
              label_smoothing: float | Tensor = 0.0) -> Tensor:
    """R-DPO: ``-log sigmoid(beta rho_w - beta rho_l + (alpha |y_w| - alpha |y_l|))``.

    Park, Rafailov, Ermon, Finn 2024, "Disentangling Length from Quality in
    Direct Preference Optimization" (arXiv 2403.19159), §4, the
    length-regularised DPO loss. **Sign:** the SimPO paper's Table 3 prints
    ``- (alpha|y_w| - alpha|y_l|)``; we follow Park et al., who derive R-DPO
    from the length-penalised objective max E[r(x, y) - alpha |y|] - beta KL.
    Its optimum gives r = beta log(pi/pi_ref) + alpha |y| + const, so the
    length term enters the Bradley-Terry margin with a **plus**: a longer
    chosen response already earns margin, so the policy gains nothing by
    lengthening. ``label_smoothing`` as in cDPO (0 = the paper).
    Not in TRL 1.16 (its ``ld_alpha`` is LD-DPO, a different method).
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    z = beta * h + (alpha * chosen_lengths - alpha * rejected_lengths)
    return _soft_logistic(z, label_smoothing)


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z_ref: the batch estimate of KL(pi || pi_ref), a scalar.

    As TRL 1.16's ``KTOTrainer`` computes it: the mean over the batch of
    ``log pi(y'|x) - log pi_ref(y'|x)`` on *mismatched* pairs (prompt i with
    the completion of another row of the batch), detached (no gradient flows
    through the reference point; Ethayarajh et al. 2024, §4.1) and clamped at
    0 (a KL is never negative). Unscaled: the loss multiplies it by beta.
    """
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(*, policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor | float, beta: float,
             lambda_w: float = 1.0, lambda_l: float = 1.0) -> Tensor:
    """KTO on unpaired rows: desirable ``lambda_w (1 - sigmoid(beta r - beta kl))``,
    undesirable ``lambda_l (1 - sigmoid(beta kl - beta r))``, r = log pi - log pi_ref.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization" (arXiv 2402.01306), Eq. 7 (the human-aware loss
    lambda_y - v(x, y) with value v = lambda_D sigma(beta(r - z_ref)) or
    lambda_U sigma(beta(z_ref - r))); the constant lambda_y is written as
    lambda_y * 1 so every row's loss lies in [0, lambda_y], as TRL 1.16's
    ``loss_type="kto"`` does (``desirable_weight`` = lambda_w,
    ``undesirable_weight`` = lambda_l). ``kl``: :func:`kto_kl`, the detached
    batch estimate of z_ref (unscaled). ``desirable``: bool (B,). When policy
    and reference agree (r = kl = 0) every row's loss is lambda/2.
    """
    d = desirable.to(torch.bool)
    r = policy_logps - ref_logps
    win = lambda_w * (1 - torch.sigmoid(beta * r - beta * kl))
    lose = lambda_l * (1 - torch.sigmoid(beta * kl - beta * r))
    return torch.where(d, win, lose)


# -- reference-free -----------------------------------------------------------------------------------------------

def simpo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor | None,
               rejected_lengths: Tensor | None, beta: float, gamma: float,
               label_smoothing: float | Tensor = 0.0) -> Tensor:
    """SimPO: ``-log sigmoid(beta a(y_w) - beta a(y_l) - gamma)``, a = mean token log-prob.

    Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward" (arXiv 2405.14734), Eq. 6. The paper uses beta 2.0
    to 2.5 and a target margin gamma with gamma/beta around 0.5 (Table 8:
    beta 2.0 / gamma 1.0 for Llama-3-Base). Leave the lengths None if the
    log-probs are already means. TRL 1.16's ``CPOTrainer(loss_type="simpo")``
    computes the same thing as ``-log sigmoid(beta (a_w - a_l - gamma/beta))``
    but **only with cpo_alpha=0**: its default cpo_alpha=1.0 adds an NLL term.
    ``label_smoothing`` as in cDPO (0 = the paper).
    """
    a_w = chosen_logps if chosen_lengths is None else chosen_logps / chosen_lengths.clamp(min=1)
    a_l = rejected_logps if rejected_lengths is None else rejected_logps / rejected_lengths.clamp(min=1)
    return _soft_logistic(beta * a_w - beta * a_l - gamma, label_smoothing)


def cpo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, beta: float, lam: float,
             label_smoothing: float | Tensor = 0.0) -> Tensor:
    """CPO: ``-log sigmoid(beta s(y_w) - beta s(y_l)) - lam s(y_w)``.

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the
    Boundaries of LLM Performance in Machine Translation" (arXiv 2401.08417):
    L_prefer (Eq. 3, DPO with a uniform reference) plus the NLL term on the
    preferred response (L_CPO = L_prefer + L_NLL, §3; lam = 1 in the paper).
    **TRL 1.16 deviates** (``CPOTrainer(loss_type="sigmoid", cpo_alpha=lam)``):
    its NLL is the token-mean cross-entropy over all chosen tokens of the
    batch, not the sequence sum per example; the two agree when lam =
    cpo_alpha * B / (chosen tokens in the batch). We follow the paper (sum).
    ``label_smoothing`` as in cDPO (0 = the paper).
    """
    return _soft_logistic(beta * chosen_logps - beta * rejected_logps, label_smoothing) - lam * chosen_logps


def slic_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, delta: float, lam: float) -> Tensor:
    """SLiC-HF: ``max(0, delta - s(y_w) + s(y_l)) - lam s(y_w)``.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback" (arXiv 2305.10425), §2 (the rank calibration loss with a
    cross-entropy regulariser), as the SimPO paper's Table 3 writes it: no
    reference model. SLiC-HF regularises towards the SFT target y_ref; like
    Table 3 we use the chosen response (our rows have no separate SFT
    target). TRL 1.16 has no SLiC-HF; its DPO ``hinge`` is a different loss
    (:func:`hinge_loss`), and ``CPOTrainer(loss_type="hinge")`` is relu(1 -
    beta(s_w - s_l)) + a token-mean NLL, i.e. delta = 1/beta scaled by beta.
    """
    return torch.relu(delta - chosen_logps + rejected_logps) - lam * chosen_logps


def rrhf_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
              lam: float) -> Tensor:
    """RRHF for one pair: ``max(0, -a(y_w) + a(y_l)) - lam s(y_w)``.

    Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with
    Human Feedback without tears" (arXiv 2304.05302): the ranking loss over
    length-normalised log-probs (Eqs. 1-2) plus the fine-tuning loss on the
    best response (Eq. 3), L = L_rank + L_ft (Eq. 4, lam = 1 there); with two
    responses the ranking sum has one term. The SimPO paper's Table 3 adds
    the weight lam. Not in TRL 1.16.
    """
    a_w = chosen_logps / chosen_lengths.clamp(min=1)
    a_l = rejected_logps / rejected_lengths.clamp(min=1)
    return torch.relu(a_l - a_w) - lam * chosen_logps


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(*, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
              lam: float) -> Tensor:
    """ORPO: ``-log p_w - lam log sigmoid(log odds(y_w) - log odds(y_l))``,
    p = exp(s(y)/|y|), odds = p / (1 - p).

    Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model" (arXiv 2403.07691): odds (Eq. 4), L_ORPO = L_SFT + lam
    L_OR (Eq. 6) with L_OR = -log sigmoid(log odds ratio) (Eq. 7); L_SFT is the
    mean token NLL of the chosen response, -log p_w = -a(y_w). The log-odds
    are computed as a - log(1 - exp(a)) for stability. **TRL 1.16 deviates**
    (``ORPOTrainer``, beta = lam): its NLL is the token-mean cross-entropy
    over the prompt *and* response tokens of all chosen rows of the batch
    (its code comment says so); its odds-ratio term equals ours. We follow
    the paper (response tokens, per example).
    """
    a_w = chosen_logps / chosen_lengths.clamp(min=1)
    a_l = rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (a_w - _log1mexp(a_w)) - (a_l - _log1mexp(a_l))
    return -a_w - lam * F.logsigmoid(log_odds)


# -- the DPO trainer's original entry point -----------------------------------------------------------------------

LEGACY_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | Tensor = 0.0,
    *,
    gamma: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """Per-example losses (B,) of ``loss_type``: ``sigmoid`` (DPO; cDPO with
    ``label_smoothing``, :func:`sigmoid_loss`), ``ipo`` (:func:`ipo_loss` on the
    log-probs as given), ``hinge`` (:func:`hinge_loss`) or ``simpo``
    (:func:`simpo_loss` with margin ``gamma``; the lengths average summed
    log-probs, the reference is ignored and may be None)."""
    if loss_type == "simpo":
        return simpo_loss(chosen_logps=policy_chosen_logps, rejected_logps=policy_rejected_logps,
                          chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, beta=beta, gamma=gamma,
                          label_smoothing=label_smoothing)
    if loss_type not in LEGACY_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LEGACY_LOSS_TYPES)}")
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    if loss_type == "sigmoid":
        return sigmoid_loss(*args, label_smoothing=label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(*args)
    return hinge_loss(*args)

"""Data cards written only from what a run recorded.

``build_card(run_dir)`` reads ``run.json`` (stages, models, prompts, sampling,
counts, drop reasons, failures, versions) and the output dataset, and returns
the card metadata (validated against ``data_cards/card_metadata.schema.json``)
and the README text rendered from ``data_cards/card.md.jinja``. Numbers in
the card are recomputed from the dataset where they can be (row counts,
lengths, scores), and taken from the run record otherwise.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.shipped import shipped_dir

CARDS_DIR = shipped_dir("data_cards")
SCHEMA_PATH = CARDS_DIR / "card_metadata.schema.json"
TEMPLATE_PATH = CARDS_DIR / "card.md.jinja"

# Method citations by stage kind (prefix match), for the card's references.
CITATIONS: dict[str, str] = {
    "self_instruct": "Wang et al. 2022, Self-Instruct: Aligning Language Models with Self-Generated Instructions, arXiv:2212.10560",
    "alpaca": "Taori et al. 2023, Stanford Alpaca: An Instruction-following LLaMA model, github.com/tatsu-lab/stanford_alpaca",
    "backtranslation": "Li et al. 2023, Self-Alignment with Instruction Backtranslation, arXiv:2308.06259",
    "backward_pairs": "Li et al. 2023, Self-Alignment with Instruction Backtranslation, arXiv:2308.06259",
    "source_tag": "Li et al. 2023, Self-Alignment with Instruction Backtranslation, arXiv:2308.06259",
    "realign": "Fan et al. 2024, Reformatted Alignment, arXiv:2402.12219",
    "constitutional": "Bai et al. 2022, Constitutional AI: Harmlessness from AI Feedback, arXiv:2212.08073",
    "cai": "Bai et al. 2022, Constitutional AI: Harmlessness from AI Feedback, arXiv:2212.08073",
    "judge": "Yuan et al. 2024, Self-Rewarding Language Models, arXiv:2401.10020",
    "onpolicy": "Jiang et al. 2023, LLM-Blender: Ensembling LLMs with Pairwise Ranking and Generative Fusion, arXiv:2306.02561; "
                "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward, arXiv:2405.14734",
    # issue #14: best-of-N, consistency checks, RSO
    "best_of_n": "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models (rejection sampling, section 3.2.3), "
                 "arXiv:2307.09288; Dong et al. 2023, RAFT: Reward rAnked FineTuning for Generative Foundation Model "
                 "Alignment, arXiv:2304.06767",
    "consistency": "Zhang et al. 2024, TableLLM: Enabling Tabular Data Manipulation by LLMs in Real Office Usage "
                   "Scenarios (cross-way validation), arXiv:2403.19318",
    "rso": "Liu et al. 2024, Statistical Rejection Sampling Improves Preference Optimization, arXiv:2309.06657",
    # issue #14 (helper F)
    "kpdds": "Huang et al. 2024, Key-Point-Driven Data Synthesis with its Enhancement on Mathematical Reasoning, "
             "arXiv:2403.02333 (AAAI 2025)",
}
VLLM_CITATION = "Kwon et al. 2023, Efficient Memory Management for Large Language Model Serving with PagedAttention, arXiv:2309.06180"
TEXT_COLUMNS = ("instruction", "input", "output", "response", "prompt", "completion", "chosen", "rejected")
SCORE_COLUMNS = ("score", "score_chosen", "score_rejected", "score_margin", "margin", "p_chosen", "rating")


def _column_notes(stages: list[dict[str, Any]], cols: list[str]) -> list[dict[str, str]]:
    """What the preference stages' metadata columns mean, in the unit of the
    stage that wrote them (the last such stage). ``score_margin`` is
    ``score_chosen - score_rejected``; no trainer reads it unless its config
    names it (``margin_column``)."""
    notes: dict[str, dict[str, str]] = {}
    for s in stages:
        kind, cfg = s.get("kind"), s.get("config") or {}
        where = f"{s.get('index', 0):02d}-{kind}"
        if kind == "judge_pairs":
            unit = "judge points on the additive 0-5 rubric (mean of the judge's samples per response)"
        elif kind == "onpolicy_pairs":
            unit = ("pairwise wins of the ranker (max_wins aggregation)" if cfg.get("aggregate") == "max_wins" else
                    "mean logit gap of the ranker over the full comparison matrix (max_logits aggregation)")
        elif kind == "cai_label":
            unit = "2p-1 of the CAI soft label p = p_chosen (score_chosen = p, score_rejected = 1 - p)"
            notes["p_chosen"] = {"column": "p_chosen", "stage": where, "note": (
                "probability that `chosen` is preferred (soft label from the feedback model's option log-probs, "
                "both orders); trainers use it only with `soft_label_column: p_chosen`")}
        elif kind == "rso_pairs":  # issue #14
            unit = {"reward_model": "the reward model's logit gap (Bradley-Terry log-odds that chosen beats rejected)",
                    "judge": "judge points on the additive 0-5 rubric"}.get(
                cfg.get("scorer"), "log-odds units: the gap between logit P(beats a baseline sample) of chosen and of "
                                   "rejected, from the pairwise judge in both orders (RSO's pointwise reward)")
        else:
            continue
        notes["score_margin"] = {"column": "score_margin", "stage": where, "note": (
            f"score_chosen - score_rejected; unit: {unit}; metadata, read by no trainer unless a config names it "
            f"(`margin_column`)")}
    return [notes[c] for c in ("score_margin", "p_chosen") if c in notes and c in cols]


def _agreement_rates(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage that cross-checks answers (counters ``agreement_checked``
    and ``agreed``, e.g. ``consistency``): how many checked rows agreed."""
    out = []
    for s in stages:
        c = s.get("counts") or {}
        if "agreement_checked" in c:
            n, ok = int(c["agreement_checked"]), int(c.get("agreed", 0))
            out.append({"index": s.get("index"), "kind": s.get("kind"), "checked": n, "agreed": ok,
                        "rate": round(ok / n, 4) if n else None})
    return out


def _sampling(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model stage, its sampling settings as configured (``sampling``
    and any non-empty ``*_sampling`` mapping) and ``n``; a stage whose config
    has none (e.g. one that only scores) gets an empty mapping."""
    out = []
    for s in stages:
        if not s.get("model"):
            continue
        cfg = s.get("config") or {}
        settings = {k: v for k, v in cfg.items() if isinstance(v, dict)
                    and (k == "sampling" or (k.endswith("_sampling") and v))}
        out.append({"index": s.get("index"), "kind": s.get("kind"), "settings": settings, "n": cfg.get("n")})
    return out


class CardError(ValueError):
    """The run folder cannot be carded (unfinished run, bad metadata)."""


@dataclass
class Card:
    """Card metadata (the README's YAML header), body text and plot files."""

    metadata: dict[str, Any]
    body: str
    plots: dict[str, bytes] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        header = yaml.safe_dump(self.metadata, sort_keys=False, allow_unicode=True)
        return f"---\n{header}---\n\n{self.body}"


def size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
    for b, name in bounds:
        if n < b:
            return name
    return "n>100M"


def _as_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(m, dict) and "content" in m for m in v):
        return "\n".join(str(m["content"]) for m in v)
    return None


def _summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    return {"count": len(s), "min": s[0], "median": statistics.median(s), "mean": round(statistics.fmean(s), 3),
            "max": s[-1]}


def _hist_png(values: dict[str, list[float]], title: str, xlabel: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    for name, xs in values.items():
        # one filled outline per series, not a patch per bin; fixed margins instead of tight_layout's extra draw
        # (together half the time: the card is written at the end of every run)
        ax.hist(xs, bins=min(30, max(5, len(set(xs)))), alpha=0.6, label=f"{name} (n={len(xs)})",
                histtype="stepfilled")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.9, bottom=0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _methods(kinds: list[str]) -> list[str]:
    return [k for k in kinds if k not in ("load",)]


def _citations(kinds: list[str], backends: set[str]) -> list[str]:
    out: list[str] = []
    for k in kinds:
        for prefix, cite in CITATIONS.items():
            if k.startswith(prefix) and cite not in out:
                out.append(cite)
    if backends & {"vllm", "vllm-cpu"}:
        out.append(VLLM_CITATION)
    return out


def _prompt_files(stage: dict[str, Any], pipeline_dir: Path) -> list[dict[str, str]]:
    """The prompt templates a stage used, for the card: the run records
    each one (config field, file as the pipeline names it, sha256), found
    again the way the run found it (beside the pipeline, or shipped). A
    file's text is copied only when it still has the hash the run recorded;
    otherwise (changed or gone) the text is left empty. No other file is
    ever read into the card."""
    from ..llm.prompts import PROMPTS_DIR, find_file

    out = []
    for rec in stage.get("templates") or []:
        if not isinstance(rec, dict) or not isinstance(rec.get("field"), str):
            continue
        text = ""
        name = rec.get("file")
        if isinstance(name, str) and name:
            try:
                raw = find_file(name, pipeline_dir, "prompt template", shipped=(PROMPTS_DIR,), want="file").read_text(
                    encoding="utf-8")
                if hashlib.sha256(raw.encode()).hexdigest() == rec.get("sha256"):
                    text = raw
            except (OSError, ValueError, UnicodeDecodeError):
                text = ""
        out.append({"stage": f"{stage['index']:02d}-{stage['kind']}", "field": rec["field"],
                    "file": str(rec.get("file") or ""), "sha256": str(rec.get("sha256") or ""), "text": text})
    return out


def load_run(run_dir: Path) -> tuple[dict[str, Any], Any]:
    import datasets

    manifest_path = run_dir / "run.json"
    if not manifest_path.exists():
        raise CardError(f"{run_dir}: no run.json; not a synthfb run folder")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("status") != "finished":
        raise CardError(f"{run_dir}: the run has not finished (status {manifest.get('status')!r}); resume it first")
    ds = datasets.load_from_disk(str(run_dir / "dataset"))
    return manifest, ds


def build_card(run_dir: str | Path, *, license: str | None = None, pretty_name: str | None = None,
               data_path: str = "data/train-*.parquet") -> Card:
    """Build the card for a finished run (metadata validated against the schema)."""
    import warnings

    import jinja2
    import jsonschema

    run_dir = Path(run_dir)
    manifest, ds = load_run(run_dir)
    stages = manifest["stages"]
    kinds = [s["kind"] for s in stages]
    n = len(ds)
    cols = ds.column_names
    pipeline_dir = Path(manifest.get("source") or ".").parent

    models: dict[tuple, dict[str, Any]] = {}
    for s in stages:
        m = s.get("model")
        if m:
            key = (m["name"], m.get("revision"))
            entry = models.setdefault(key, {**m, "roles": []})
            role = s.get("role") or ("generator" if s["kind"] not in ("judge",) else "judge")
            if role not in entry["roles"]:
                entry["roles"].append(role)
    model_list = list(models.values())
    license_ = license or manifest.get("license")
    unknown_license_models = []
    from ..llm.models import model_license

    for m in model_list:
        # recorded at run time; runs from before that kept the checkpoint's path instead
        m["license"] = m.get("license") or (model_license(m["path"]) if m.get("path") else None)
        if m["license"] is None:
            unknown_license_models.append(m["name"])
    if unknown_license_models:
        warnings.warn(f"license unknown for model(s) {unknown_license_models}; check their terms before publishing",
                      stacklevel=2)

    # lengths (words) and scores recomputed from the dataset itself
    lengths: dict[str, list[float]] = {}
    for c in cols:
        if c in TEXT_COLUMNS:
            xs = [len(t.split()) for t in (_as_text(v) for v in ds[c]) if t is not None]
            if xs:
                lengths[c] = xs
    scores = {c: [float(v) for v in ds[c] if isinstance(v, (int, float))] for c in cols if c in SCORE_COLUMNS}
    scores = {c: xs for c, xs in scores.items() if xs}
    finish: dict[str, int] = {}
    if "provenance" in cols:
        for prov in ds["provenance"]:
            if prov:
                fr = prov[-1].get("finish_reason") or "unknown"
                finish[fr] = finish.get(fr, 0) + 1
    plots: dict[str, bytes] = {}
    if lengths:
        plots["plots/lengths.png"] = _hist_png(lengths, "Length distribution", "words per field")
    if scores:
        plots["plots/scores.png"] = _hist_png(scores, "Score distribution", "value")

    is_pref = {"chosen", "rejected"} <= set(cols)
    tags = ["synthetic", "synthfb"] + [k.replace("_", "-") for k in _methods(kinds)]
    tags.append("preference" if is_pref else "sft")
    source_datasets = []
    for s in stages:
        if s["kind"] == "load":
            source_datasets.append(f"local:{Path(str(s['config'].get('path'))).name}")
    feats = ds.features._to_yaml_list()
    metadata: dict[str, Any] = {
        "license": license_ or "other",
        "pretty_name": pretty_name or manifest["pipeline"],
        "task_categories": ["text-generation"],
        "language": ["en"],
        "size_categories": [size_category(n)],
        "source_datasets": source_datasets or ["original"],
        "annotations_creators": ["machine-generated"],
        "language_creators": ["machine-generated"],
        "tags": tags,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_path}]}],
        "dataset_info": {"features": feats, "splits": [{"name": "train", "num_bytes": int(ds.data.nbytes),
                                                              "num_examples": n}]},
    }
    if not license_:
        metadata["license_details"] = "no license was set in the pipeline (`license:`); ask the dataset's author"
    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(metadata, schema)
    except jsonschema.ValidationError as e:
        raise CardError(f"card metadata invalid at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}") from e

    prompts = [p for s in stages for p in _prompt_files(s, pipeline_dir)]
    backends = {m.get("backend") for m in model_list}
    limitations = []
    total_fail = sum(len(s.get("failures") or []) for s in stages)
    if total_fail:
        limitations.append(f"{total_fail} input row(s) failed for good and are not in the dataset (reasons in the run record).")
    if finish.get("length"):
        limitations.append(f"{finish['length']} of {n} rows were cut off at max_tokens (finish_reason=length).")
    if unknown_license_models:
        limitations.append(f"License of model(s) {', '.join(unknown_license_models)} is not recorded; check before reuse.")
    limitations.append("All text was written by language models and was not reviewed by people; it can be wrong, "
                       "biased or unsafe.")
    facts = {
        "pipeline": manifest["pipeline"],
        "description": (manifest.get("description") or "").strip(),
        "num_rows": n,
        "columns": cols,
        "stages": stages,
        "parse_rates": [{"index": s["index"], "kind": s["kind"], **s["parse"],
                         "logprobs": bool((s.get("counts") or {}).get("scored_from_logprobs"))}
                        for s in stages if isinstance(s.get("parse"), dict)],
        "column_notes": _column_notes(stages, cols),
        "agreement_rates": _agreement_rates(stages),
        "sampling": _sampling(stages),
        "models": model_list,
        "prompts": prompts,
        "length_stats": {c: _summary(xs) for c, xs in lengths.items()},
        "score_stats": {c: _summary(xs) for c, xs in scores.items()},
        "finish_reasons": finish,
        "seed": manifest.get("seed"),
        "chunk_size": manifest.get("chunk_size"),
        "versions": manifest.get("versions", {}),
        "citations": _citations(kinds, backends),
        "limitations": limitations,
        "plots": sorted(plots),
        "started": manifest.get("started"),
        "finished": manifest.get("finished"),
        "config_yaml": yaml.safe_dump(manifest.get("config", {}), sort_keys=False, allow_unicode=True),
    }
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    body = env.from_string(TEMPLATE_PATH.read_text()).render(**facts, metadata=metadata)
    return Card(metadata=metadata, body=body, plots=plots, facts=facts)

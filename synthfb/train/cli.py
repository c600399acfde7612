"""``synthfb train {sft,rm,dpo,ppo} --config FILE``.

Hook it into the main parser with ``add_train_parser(subparsers)``. Each
trainer's config dataclass is the reference for its YAML keys and doubles as
the ``--help`` text.
"""

from __future__ import annotations

import argparse
import json
import sys


def _trainers():
    from .dpo import DPOConfig, train_dpo
    from .ppo import PPOConfig, train_ppo
    from .rm import RMConfig, train_rm
    from .sft import SFTConfig, train_sft

    return {"sft": (SFTConfig, train_sft), "rm": (RMConfig, train_rm), "dpo": (DPOConfig, train_dpo),
            "ppo": (PPOConfig, train_ppo)}


_HELP = {
    "sft": "supervised fine-tuning on prompt/completion or messages rows",
    "rm": "reward model: Bradley-Terry on prompt/chosen/rejected (Plackett-Luce for ranked lists)",
    "dpo": "preference optimization: DPO, cDPO, IPO, hinge, SimPO",
    "ppo": "PPO against a reward model or a Python reward function",
}


def _config_classes():
    # import-light: the dataclasses live with the trainers, which import torch
    return {k: v[0] for k, v in _trainers().items()}


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    cls, fn = _trainers()[args.trainer]
    try:
        cfg = load_config(cls, args.config)
    except ConfigError as e:
        print(f"synthfb: error: {e}", file=sys.stderr)
        return 2
    for item in args.set or []:
        key, _, raw = item.partition("=")
        import yaml

        try:
            cfg = load_config(cls, {**_asdict(cfg), key: yaml.safe_load(raw)}, where=f"--set {item}")
        except ConfigError as e:
            print(f"synthfb: error: {e}", file=sys.stderr)
            return 2
    summary = fn(cfg)
    last = {k: v for k, v in (summary.get("last") or {}).items() if isinstance(v, (int, float, str)) or v is None}
    print(json.dumps({"output_dir": cfg.output_dir, "steps": summary["steps"], "last": last}))
    return 0


def _asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


class _TrainerParser(argparse.ArgumentParser):
    """Builds the config-fields epilog only when help is printed (torch loads then)."""

    trainer_name: str | None = None

    def format_help(self) -> str:
        if self.trainer_name and self.epilog is None:
            self.epilog = "Config fields (YAML keys):\n" + _fields_help(self.trainer_name)
        return super().format_help()


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` with one sub-command per trainer to ``subparsers``."""
    p = subparsers.add_parser("train", help="train a model (sft, rm, dpo, ppo) from a YAML config",
                              description="Train on the datasets our pipelines emit. Config keys are the trainer's "
                                          "config fields; see `synthfb train TRAINER --help`.")
    sub = p.add_subparsers(dest="trainer", metavar="TRAINER", parser_class=_TrainerParser)
    for name, help_text in _HELP.items():
        q = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        q.trainer_name = name
        q.add_argument("--config", required=True, help="YAML file whose keys are the config fields below")
        q.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="override one config field (YAML value), e.g. --set max_steps=10; repeatable")
        q.set_defaults(func=_cmd_train)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    return p


def _fields_help(name: str) -> str:
    try:
        from .config import config_help

        return config_help(_config_classes()[name])
    except ImportError as e:  # torch missing: still answer --help
        return f"  (config fields unavailable: {e})"


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m synthfb.train.cli train sft --config X``)."""
    parser = argparse.ArgumentParser(prog="synthfb")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..data.io import InputError

    try:
        return args.func(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"synthfb: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``synthfb train {sft,rm,dpo,kto,ppo} --config FILE``.

Hook it into the main parser with ``add_train_parser(subparsers)``. The
sub-commands are the trainers of the method registry
(:mod:`synthfb.train.methods`, shared with ``synthfb loop``). Each trainer's
config dataclass is the reference for its YAML keys and doubles as the
``--help`` text.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from ..data import yamlio
    from .config import ConfigError, load_config
    from .methods import trainers

    method = trainers()[args.trainer]
    cls = method.config
    try:
        cfg = load_config(cls, args.config)
        overrides: dict = {}
        for item in args.set or []:
            key, eq, raw = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"--set {item}: expected FIELD=VALUE, e.g. --set max_steps=10")
            try:
                overrides[key] = yamlio.safe_load(raw)  # the one YAML reader: `1e-5` is a number, as in the file
            except yaml.YAMLError as e:
                raise ConfigError(f"--set {item}: {yamlio.describe(e)}") from None
        if overrides:  # checked together: `--set ranked=true --set center_rewards_coef=0` is valid in any order
            cfg = load_config(cls, {**_asdict(cfg), **overrides}, where="--set " + " ".join(args.set))
    except ConfigError as e:
        print(f"synthfb: error: {e}", file=sys.stderr)
        return 2
    summary = method.train(cfg)
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
    """Add ``train`` with one sub-command per trainer of the method registry
    (:mod:`synthfb.train.methods`) to ``subparsers``."""
    from .methods import trainers

    names = ", ".join(trainers())
    p = subparsers.add_parser("train", help=f"train a model ({names}) from a YAML config",
                              description="Train on the datasets our pipelines emit. Config keys are the trainer's "
                                          "config fields; see `synthfb train TRAINER --help`.")
    sub = p.add_subparsers(dest="trainer", metavar="TRAINER", parser_class=_TrainerParser)
    for name, method in trainers().items():
        help_text = method.help
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
        from .methods import trainers

        return config_help(trainers()[name].config)
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

"""``linrnn-config``: resolve, validate and print a run config; list presets and sizes."""
from __future__ import annotations

import argparse
import difflib
import sys

import yaml

from .config_loader import (ConfigError, config_to_dict, dump_config, list_model_presets, load_config,
                            load_model_config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="linrnn-config",
        description="Resolve a run config (YAML + key=value overrides), validate it and print it.",
    )
    parser.add_argument("config", nargs="?", help="run config YAML (omit with --presets)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied in order")
    parser.add_argument("--presets", action="store_true",
                        help="list the model presets with their parameter counts")
    parser.add_argument("--get", metavar="KEY",
                        help="print one resolved value (e.g. checkpoint.dir) instead of the whole config")
    args = parser.parse_intermixed_args(argv)  # flags may come between overrides
    try:
        if args.presets:
            from .models import count_parameters

            for name in list_model_presets():
                n = count_parameters(load_model_config(name))
                print(f"{name:32s} {n / 1e6:10.2f}M")
            return 0
        if args.config is None:
            parser.error("a config file is required (or --presets)")
        cfg = load_config(args.config, args.overrides)
        print(dump_config(cfg) if args.get is None else _value(cfg, args.get), end="")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _value(cfg: object, key: str) -> str:
    """``key``'s value as one YAML line (a plain string prints bare, for shell scripts)."""
    node: object = config_to_dict(cfg)
    done: list[str] = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            close = difflib.get_close_matches(part, list(node), n=1) if isinstance(node, dict) else []
            hint = f" (did you mean {'.'.join(done + close)!r}?)" if close else ""
            raise ConfigError(f"--get {key}: no such setting{hint} (see the keys linrnn-config prints)")
        node = node[part]
        done.append(part)
    if isinstance(node, str):
        return node + "\n"
    text = yaml.safe_dump(node, default_flow_style=True, sort_keys=False)
    return text.removesuffix("...\n")  # the end-of-document line YAML adds after a bare scalar


if __name__ == "__main__":
    sys.exit(main())

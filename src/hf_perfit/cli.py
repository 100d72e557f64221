"""The `perfit` command.

```
perfit federate --config recipes/smollm2-135m/perfit/config_demo.yaml [--key value ...]
perfit push --run outputs/perfit --repo_prefix my-org/perfit-flan8 [--private] [--clients client_0 client_3]
perfit plot --run outputs/perfit
perfit compare --runs outputs/demo/fedit outputs/demo/perfit [--output outputs/demo/comparison.md]
```

`federate` parses [`~hf_perfit.federated.config.FederatedConfig`] the way TRL's scripts parse their configs
(`trl.TrlParser`): YAML keys are the dataclass fields (TRL's own for the settings TRL declares), command-line flags
override them, and an unknown key in either place is an error naming the key to use. Every user error (bad value, missing file, output folder of another run) ends with a one-line
message and exit status 2 instead of a traceback; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS = ("federate", "push", "plot", "compare")
USAGE = (
    "usage: perfit {federate,push,plot,compare} [--config CONFIG.yaml] [--key value ...]\n\n"
    "  federate  run a federated job (FedIT, FedProx, local, PerFIT, ...) from a YAML config plus flags\n"
    "  push      push each client's personalized adapter of a finished run to its own Hub repo\n"
    "  plot      (re)draw a run's plots from its metrics.jsonl and adapters\n"
    "  compare   per-client table of several finished runs: base model and each run's personalized perplexity\n\n"
    "`perfit <command> --help` lists the keys of a command."
)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _parser(dataclass_type: type, prog: str):
    from .federated.config import ConfigParser

    return ConfigParser([dataclass_type], prog=prog)


def federate_parser(prog: str = "perfit federate"):
    """The `trl.TrlParser` of `perfit federate` (and of `recipes/perfit_sft.py`): `FederatedConfig`'s fields
    ([`hf_perfit.federated.config.federated_parser`])."""
    from .federated.config import federated_parser

    return federated_parser(prog)


def check_yaml_config(argv: Sequence[str]) -> None:
    """Read the `--config` file of `argv` (if any) as TrlParser will, and turn a YAML syntax error into a
    `ValueError` that names the file, line and column and says what is wrong (PyYAML's own exception is a
    multi-line traceback)."""
    import yaml

    argv = list(argv)
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        return
    try:
        with open(path, encoding="utf-8") as f:
            yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config file {path} does not exist; pass --config with the path of a YAML file."
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err}); save it as UTF-8 YAML.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        if context:
            context_mark = getattr(err, "context_mark", None)
            at = f" (line {context_mark.line + 1}, column {context_mark.column + 1})" if context_mark else ""
            problem = f"{problem}, {context}{at}"
        raise ValueError(
            f"config file {path}{where}: not valid YAML: {problem}. Each line is `key: value`; quote values that "
            "hold ':' or '#', close every [ ] and { }, and indent nested values consistently with spaces."
        ) from None


def parse_federate_args(argv: Sequence[str]):
    """Parse `perfit federate` arguments into a `FederatedConfig` (YAML from `--config`, then flags)."""
    (config,) = federate_parser().parse_args_and_config(list(argv))
    return config


def federate(argv: Sequence[str]) -> int:
    from .federated.simulation import run_federated

    config = parse_federate_args(argv)
    summary = run_federated(config)
    print(
        f"done: {config.num_rounds} rounds of {config.strategy}; mean personalized perplexity "
        f"{summary['mean_perplexity']:.3f}; results in {config.output_dir}/results.md"
    )
    return 0


def push(argv: Sequence[str]) -> int:
    from .hub import PushConfig, push_main

    (config,) = _parser(PushConfig, "perfit push").parse_args_and_config(list(argv))
    return int(push_main(config) or 0)


def plot(argv: Sequence[str]) -> int:
    from .federated.plots import plot_run

    parser = argparse.ArgumentParser(prog="perfit plot")
    parser.add_argument("--run", required=True, help="a federated run's output_dir")
    args = parser.parse_args(list(argv))
    for path in plot_run(args.run):
        print(path)
    return 0


def compare(argv: Sequence[str]) -> int:
    from ._io import atomic_write_text
    from .federated.results import comparison_table

    parser = argparse.ArgumentParser(prog="perfit compare")
    parser.add_argument("--runs", nargs="+", required=True, help="output_dir of each run; the first is the reference")
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args(list(argv))
    table = comparison_table(args.runs)
    print(table)
    if args.output:
        atomic_write_text(args.output, table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `perfit` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"perfit: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.\n\n{USAGE}", file=sys.stderr)
        return 2
    handler = {"federate": federate, "push": push, "plot": plot, "compare": compare}[command]
    try:
        return handler(rest)
    except SystemExit as done:  # argparse: --help (0) or a bad flag (2, message already printed)
        return done.code if isinstance(done.code, int) else 2
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"perfit {command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a Hub push that failed for good (hf_perfit.hub.HubPushError): says what was pushed
        if debug or type(err).__name__ != "HubPushError":
            raise
        print(f"perfit {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"perfit {command}: interrupted; a federated run continues from its last round with --resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

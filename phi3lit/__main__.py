"""`phi3lit COMMAND ...` (and `python -m phi3lit COMMAND ...`): the one entry point, its command table and the one
handler that turns the user's errors into one line.

One parser style: every command is either LightningCLI over the fit config (`phi3lit.cli`) or a typed function
whose signature and docstring are its options and `--help` (jsonargparse). It imports only what the command needs:
`ablate`, `analyze` and `--help` start in a second, without Lightning (about 6 s of imports).
"""

from __future__ import annotations

import sys
from pathlib import Path

from phi3lit.console import quiet
from phi3lit.errors import ConfigError, Phi3litError
from phi3lit.run.runfolder import release_run_folder, undo_unstarted_run


def main(args: list[str] | None = None) -> None:
    """Every subcommand runs under one handler: the user's input or environment gives one line, no traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    quiet(report_only=bool(argv) and argv[0] in ("plan", "data"))
    try:
        _dispatch(argv, args is None)
    except BaseException as e:
        undo_unstarted_run()  # a fit that failed before its first step leaves its run folder as it found it
        if not isinstance(e, Exception):  # Ctrl-C, exit: not an error of phi3lit's to explain
            raise
        known = _explained(e)  # the user's input or environment, not a bug: a message, no traceback
        if known is None and _is_parse_error(e):  # a value the parser refuses: its message, not 100 lines of usage
            command = argv[0] if argv else ""
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            helps = f"phi3lit {command} --help lists the options" if command in COMMANDS else "phi3lit --help"
            known = ConfigError(f"{detail} ({helps})")
        if known is None:
            raise
        print(f"phi3lit: {known.kind} error: {known}", file=sys.stderr)
        sys.exit(getattr(known, "exit_code", 2))
    finally:
        release_run_folder()  # a process that runs several fits (tests, notebooks) frees each folder it used


# The command table: name -> (what it runs, what it does). Trainer commands are LightningCLI's subcommands over
# the fit config; `data` and `plan` parse the same config without running; the others are typed functions, named
# by import path so that a command imports only what it needs (`ablate --help` starts without Lightning).
TRAINER = "lightning"  # fit, validate, test, predict
INSPECT = "inspect"  # data, plan: the fit config, parsed only
COMMANDS = {
    "fit": (TRAINER, "train LoRA adapters (the config's trainer, model and data); writes <run>/adapter at the end"),
    "validate": (TRAINER, "val loss of a checkpoint or adapter on the validation data"),
    "test": (TRAINER, "the same on data.test_file"),
    "predict": (TRAINER, "answer data.predict_file's prompts; writes <run>/predictions.jsonl"),
    "data": (INSPECT, "what the data becomes: counts, lengths, packing, and an example with its trained tokens "
             "marked (--show N|longest|truncated, --split train|val|test)"),
    "plan": (INSPECT, "parameter counts and a memory estimate for a config, without weights or a GPU"),
    "export": ("phi3lit.export.export:export", "a checkpoint as a stock peft adapter (fused or split) or a merged "
               "model"),
    "chat": ("phi3lit.export.chat:chat", "talk to an adapter or a merged model in the terminal"),
    "ablate": ("phi3lit.tools.sweep.ablate:ablate", "run a sweep file (experiments/*.yaml) of fit overrides and "
               "summarise it"),
    "analyze": ("phi3lit.tools.analysis.analyze:analyze", "what LoRA learned: spectra, subspace similarity and "
                "amplification of the saved adapters (CPU, no data)"),
    "eval": ("phi3lit.tools.evaluate:evaluate", "downstream scores on lm-evaluation-harness tasks (phi3lit_demo, MMLU, "
             "GSM8K, ...) of an adapter, a model or a checkpoint"),
    "tiny": ("phi3lit.tiny:tiny", "build a tiny Phi-3 of any tokenizer's vocabulary (random-init, or pretrained "
             "on the lab's world)"),
}  # fmt: skip
POSITIONAL = {"ablate", "analyze"}  # `ablate SWEEP`, `analyze FOLDER`; the others take --options only


def overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return (
        "usage: phi3lit COMMAND [--config FILE.yaml] [options]   (also: python -m phi3lit COMMAND ...)\n\n"
        "LoRA fine-tuning of Phi-3 with PyTorch Lightning.\n\ncommands:\n"
        f"{rows}\n\n"
        "phi3lit COMMAND --help lists a command's options; fit, validate, test, predict, data and plan take the same\n"
        "config (--print_config shows it resolved). Start offline: phi3lit fit --config configs/tiny.yaml"
    )


def _dispatch(argv: list[str], from_sys_argv: bool) -> None:
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(overview())
        return
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)} (phi3lit --help)")
    target, what = COMMANDS[command]
    if target == TRAINER:
        from phi3lit.cli import run_trainer_command

        run_trainer_command(None if from_sys_argv else argv)
        return
    if target == INSPECT:
        from phi3lit.cli import inspect_config

        print(inspect_config(command, argv[1:], what))
        return
    import importlib

    from jsonargparse import CLI

    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    positional = command in POSITIONAL
    result = CLI(function, args=argv[1:], as_positional=positional, prog=f"phi3lit {command}", exit_on_error=False)
    if isinstance(result, int) and not isinstance(result, bool):  # an exit status (ablate, analyze)
        if result:
            sys.exit(result)
    elif isinstance(result, str | Path):  # the folder written (export, tiny)
        print(f"[phi3lit] {command}: wrote {result}")


def _is_parse_error(e: BaseException) -> bool:
    from jsonargparse import ArgumentError

    return isinstance(e, ArgumentError)


def _explained(e: BaseException | None) -> BaseException | None:
    """The phi3lit error behind `e` (jsonargparse and Lightning wrap exceptions in their own)."""
    while e is not None:
        if isinstance(e, Phi3litError):
            return e
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    main()

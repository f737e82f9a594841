"""`phi3lit COMMAND ...` (and `python -m phi3lit COMMAND ...`): the entry point, one handler for every command.

It imports only what the command needs: `ablate`, `analyze`, `--help` and `--list` start in a second, without
Lightning (about 6 s of imports); fit, validate, test, predict, data and plan go through `phi3lit.cli` (LightningCLI).
"""

from __future__ import annotations

import sys

from phi3lit.console import quiet
from phi3lit.errors import ConfigError, Phi3litError
from phi3lit.runfolder import release_run_folder, undo_unstarted_run


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


COMMANDS = {  # name: what it does, for the top-level --help
    "fit": "train LoRA adapters (the config's trainer, model and data); writes <run>/adapter at the end",
    "validate": "val loss of a checkpoint or adapter on the validation data",
    "test": "the same on data.test_file",
    "predict": "answer data.predict_file's prompts; writes <run>/predictions.jsonl",
    "data": "what the data becomes: counts, lengths, packing, and an example with its trained tokens marked "
    "(--show N|longest|truncated, --split train|val|test)",
    "plan": "parameter counts and a memory estimate for a config, without weights or a GPU",
    "export": "a checkpoint as a stock peft adapter (fused or split) or a merged model",
    "chat": "talk to an adapter or a merged model in the terminal",
    "ablate": "run a sweep file (experiments/*.yaml) of fit overrides and summarise it",
    "analyze": "what LoRA learned: spectra, subspace similarity and amplification of the saved adapters (CPU, no data)",
    "tiny": "build a tiny random-init Phi-3 of any tokenizer's vocabulary, for offline dry runs",
}


def overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    return (
        "usage: phi3lit COMMAND [--config FILE.yaml] [options]   (also: python -m phi3lit COMMAND ...)\n\n"
        "LoRA fine-tuning of Phi-3 with PyTorch Lightning.\n\ncommands:\n"
        f"{rows}\n\n"
        "phi3lit COMMAND --help lists a command's options; fit, validate, test, predict, data and plan take the same\n"
        "config (--print_config shows it resolved). Start offline: phi3lit fit --config configs/tiny.yaml"
    )


def _function_cli(fn, name: str, args: list[str]):
    from jsonargparse import CLI

    return CLI(fn, args=args, as_positional=False, prog=f"phi3lit {name}")


def _data_options(argv: list[str]) -> tuple[list[str], int | str, str]:
    """`data`'s own options, taken out before the fit config is parsed: --show N|longest|truncated, --split."""
    show, split, rest, i = 0, "train", [], 0
    while i < len(argv):
        key, _, value = argv[i].partition("=")
        if key in ("--show", "--split") and argv[0] == "data":
            if not value:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if key == "--split":
                if value not in ("train", "val", "test"):
                    raise ConfigError(f"data --split must be train, val or test, got {value!r}")
                split = value
            elif value in ("longest", "truncated") or value.isdigit():
                show = int(value) if value.isdigit() else value
            else:
                raise ConfigError(f"data --show takes an example index, longest or truncated, got {value!r}")
        else:
            rest.append(argv[i])
        i += 1
    return rest, show, split


def _dispatch(argv: list[str], from_sys_argv: bool) -> None:
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(overview())
        return
    if command == "export":
        from phi3lit.export import export

        rest = argv[1:]
        for i, a in enumerate(rest):  # allow the plain flag `--merge` (jsonargparse booleans take a value)
            if a == "--merge" and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
                rest[i] = "--merge=true"
        out = _function_cli(export, "export", rest)
        print(f"[phi3lit] exported to {out}")
        return
    if command == "ablate":
        from phi3lit import ablate

        sys.exit(ablate.main(argv[1:]))
    if command == "analyze":
        from phi3lit import analyze

        sys.exit(analyze.main(argv[1:]))
    if command == "chat":
        from phi3lit.chat import chat

        _function_cli(chat, "chat", argv[1:])
        return
    if command == "tiny":
        from phi3lit.tiny import tiny

        _function_cli(tiny, "tiny", argv[1:])
        return
    from phi3lit.cli import Phi3LitCLI, RunConfig
    from phi3lit.data import ChatDataModule
    from phi3lit.model import Phi3LoRA

    if command in ("data", "plan"):  # the fit config, parsed without running: inspect before spending GPU hours
        argv, show, split = _data_options(argv)
        cli = Phi3LitCLI(
            Phi3LoRA,
            ChatDataModule,
            run=False,
            auto_configure_optimizers=False,
            args=argv[1:],
            parser_kwargs={"prog": f"phi3lit {command}", "description": COMMANDS[command], "exit_on_error": False},
        )
        if command == "data":
            from phi3lit.data import describe

            print(describe(cli.datamodule, split, show))
        else:
            from phi3lit.plan import plan_from_cli

            print(plan_from_cli(cli))
        return
    Phi3LitCLI(
        Phi3LoRA,
        ChatDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # `optimizer:` / `lr_scheduler:` are linked into the module instead
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        args=None if from_sys_argv else argv,
        parser_kwargs={"prog": "phi3lit", "exit_on_error": False},  # a refused value: one line (main's handler)
    )


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

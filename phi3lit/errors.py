"""The errors phi3lit explains instead of showing a traceback: the cause is the user's input or environment.

`python -m phi3lit` prints `phi3lit: <kind> error: <message>` and exits non-zero for these. Messages name the
config key (as a CLI path such as `model.lora.r`), the file and line, or the step, and say what to do.
"""


class Phi3litError(Exception):
    kind = "phi3lit"
    exit_code = 2


class ConfigError(Phi3litError, ValueError):
    """A config value that cannot work; the message starts with its CLI path."""

    kind = "config"


class CheckpointError(Phi3litError):
    """A checkpoint that cannot be read, or that does not match the run's config."""

    kind = "checkpoint"


class EnvironmentProblem(Phi3litError):
    """Something outside phi3lit: output folder, model weights, an optional package, the device."""

    kind = "environment"


class DataError(Phi3litError, ValueError):
    """Bad input data. The message names the file and the line or row."""

    kind = "data"


class BadExample(DataError):
    """One example breaks the content policy (`phi3lit.data.formats.BAD_KINDS`): an error or a counted skip, per
    `data.on_bad_example`."""

    def __init__(self, problem: str, message: str):
        super().__init__(message)
        self.problem = problem  # one of BAD_KINDS (not `kind`: that is the error family, "data")


class NonFiniteError(Phi3litError):
    """Loss or gradients became NaN/inf; training stopped before the bad step was applied."""

    kind = "training"
    exit_code = 3


def missing_model(name: str, error: Exception) -> EnvironmentProblem:
    """Explain a model or tokenizer that `from_pretrained` could not find."""
    first = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return EnvironmentProblem(
        f"model.pretrained={name!r}: cannot load it ({first}). The weights must be in a local folder "
        "(config.json + *.safetensors + tokenizer files) or downloadable from the Hugging Face Hub. Without "
        "network, download once elsewhere (huggingface-cli download <id> --local-dir DIR) and set "
        "model.pretrained=DIR."
    )

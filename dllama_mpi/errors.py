"""One exception type per domain; the CLI catches DllamaError once and prints one line (exit 2)."""


class DllamaError(Exception):
    """Base of every error a user can cause (bad file, bad option, impossible split...)."""

    exit_code = 2


class ModelFormatError(DllamaError):
    """A .m model file is malformed or unsupported."""


class TokenizerFormatError(DllamaError):
    """A .t tokenizer file is malformed or unsupported."""


class ConfigError(DllamaError):
    """Options that cannot work together or with this model (e.g. a node count that cannot split it)."""


class ConvertError(DllamaError):
    """An input to a converter (HF folder, GGUF file) is missing something or unsupported."""


class TemplateError(DllamaError):
    """A chat template failed to render."""


class RankFailure(DllamaError):
    """Another MPI rank failed or vanished."""

"""User-facing errors: the message names what is wrong and how to fix it."""

from pathlib import Path


class NanoseekError(Exception):
    """A problem with the user's input (config, file, checkpoint, request), not a bug.

    The CLI prints the message without a traceback and exits non-zero; the server maps it to a 400.
    """


class ConfigError(NanoseekError, ValueError):
    """An unknown or invalid configuration field."""


class CheckpointError(NanoseekError):
    """A checkpoint that cannot be loaded: missing files, missing/unexpected keys, shape mismatches."""


class ContextLengthError(NanoseekError):
    """A prompt (or prompt plus max_tokens) that does not fit the model's context window.

    `tokens` and `limit` (when known) say by how much, so a caller can word the fix its user has:
    the chat REPL's is /reset, eval's a model with a longer context."""

    def __init__(self, message: str, tokens: int | None = None, limit: int | None = None):
        super().__init__(message)
        self.tokens, self.limit = tokens, limit


class ChatTemplateError(NanoseekError):
    """A chat template that is missing, does not compile or fails to render (400 in the server)."""


def check_out_dir(path: str | Path, option: str) -> None:
    """Raise a NanoseekError, before any work is done, when `path` cannot become an output directory
    because it or a folder above it is a file. `option` is how the user set it ("out_dir", "--out"),
    so the message names what to change."""
    path = Path(path)
    spelled = f"{option} {path}" if option.startswith("-") else f"{option}={path}"
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is inside {p}, which is a file"
                raise NanoseekError(f"{spelled} {what}, not a directory: point {option} at a directory "
                                   "(a missing one is created)")
            return

"""nanoseek: the DeepSeek recipe in one small, readable PyTorch codebase.

    import nanoseek
    model = nanoseek.load_model("runs/small")          # an HF-format DeepSeek-V3/V2, Llama or Qwen2 directory
    from nanoseek import LLM, SamplingParams           # the inference engine

Bad input raises a NanoseekError (a bug does not): ConfigError, CheckpointError, ContextLengthError
and ChatTemplateError say which kind.
"""

from importlib import import_module

__version__ = "0.1.0"

# Public names, imported lazily so `import nanoseek` stays cheap and optional extras stay optional.
_EXPORTS = {
    "ModelConfig": "nanoseek.config",
    "Transformer": "nanoseek.model.transformer",
    "load_model": "nanoseek.checkpoint",
    "save_model": "nanoseek.checkpoint",
    "LLM": "nanoseek.inference.engine",
    "SamplingParams": "nanoseek.inference.sampling",
    "NanoseekError": "nanoseek.errors",
    "ConfigError": "nanoseek.errors",
    "CheckpointError": "nanoseek.errors",
    "ContextLengthError": "nanoseek.errors",
    "ChatTemplateError": "nanoseek.errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

"""One error type per failure class. Each message names the file, key, row or step and says how to fix it;
the ``rlfr`` command prints it on one line (the traceback behind ``--debug``) and exits with ``EXIT_ERROR``,
or ``EXIT_RESUMABLE`` when a run stopped on a signal after writing a checkpoint.

Every class derives from ``RlfrError`` and from the built-in type a caller would expect (a bad config value
is also a ``ValueError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

EXIT_ERROR = 2
EXIT_RESUMABLE = 75  # EX_TEMPFAIL (sysexits.h): try again, here with --resume


class RlfrError(Exception):
    """Base of every error rlfr raises on purpose."""


class ConfigError(RlfrError, ValueError):
    """A config file, override or value is wrong; the message names the key."""


class DataError(RlfrError, ValueError):
    """A data file or row that cannot be turned into examples; the message names file, row and field."""


class ModelLoadError(RlfrError, RuntimeError):
    """The model or tokenizer could not be loaded, or is not a decoder-only causal LM."""


class CheckpointError(RlfrError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or belongs to another model or run."""


class PickleRefusedError(RlfrError, ValueError):
    """A ``.bin`` / ``.pt`` file that holds pickled Python objects beyond plain tensors: never unpickled."""

    def __init__(self, path):
        super().__init__(
            f"{path} is not safetensors and holds pickled Python objects besides tensors; refused (rlfr reads "
            "such files with torch.load(weights_only=True) only, never running their code)"
        )


class FlowMismatchError(RlfrError, ValueError):
    """A flow directory that is incomplete, of another pairing convention, or models other latents."""


class RunDirError(RlfrError, RuntimeError):
    """An output directory that holds another run, or is in use by another process."""


class EngineUnavailableError(RlfrError, RuntimeError):
    """An optional sampling engine (vLLM) that is not installed or cannot run here; the message names the
    setting that asked for it and says what to install. rlfr never falls back to another engine."""


class VerifierError(RlfrError, RuntimeError):
    """The answer checker's worker pool broke and could not be rebuilt."""


class NonFiniteError(RlfrError, FloatingPointError):
    """A quantity went NaN or infinite; the message names it and the step."""

    def __init__(self, quantity: str, step: int | None = None, detail: str = ""):
        where = f" at step {step}" if step is not None else ""
        super().__init__(
            f"{quantity} is not finite{where}{': ' + detail if detail else ''}. The last checkpoint holds finite "
            "weights; lower the learning rate, or set policy.skip_nonfinite_batches to skip such batches"
        )
        self.quantity, self.step = quantity, step


class Interrupted(RlfrError):
    """The run stopped on SIGTERM / SIGINT after writing a checkpoint; rerun with --resume."""

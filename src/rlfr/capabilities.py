"""What this installation and machine can do, asked where a config is checked: the packages of the optional
experiment trackers, the platform that vLLM's sleep mode needs, and what ``model.dtype=auto`` means here.

The checks live this low (below ``rlfr.schema``) so that a config is refused when it is loaded, before any
model loads, without the schema importing the modules that use these features (``runtime.metrics`` makes
the trackers, ``policy.vllm_engine`` runs vLLM). Each check names the setting and says how to fix it.

- ``check_trackers(names)``: ``ConfigError`` for an unknown tracker or one whose package is missing, naming
  the pip extra (``TRACKER_PACKAGES``).
- ``sleep_mode_unavailable() -> str | None``: None when vLLM's sleep mode works here (CUDA), else why not.
- ``resolve_dtype(dtype, device) -> str``: ``model.dtype`` for a model on ``device``; the one place ``auto`` is
  resolved (bfloat16 on a CUDA device that supports it, float32 elsewhere).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from rlfr.errors import ConfigError

# tracker name -> (the module accelerate imports for it, the rlfr extra that installs it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", None),  # a core dependency
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet"),
}


def check_trackers(names: Sequence[str]) -> None:
    """Raise ``ConfigError`` for an unknown tracker or one whose package is not installed, naming the pip extra."""
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"report_to: unknown tracker {name!r}; valid: {', '.join(TRACKER_PACKAGES)}")
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"report_to={name} needs the {module!r} package, which is not installed: "
                f"pip install {module} (rlfr's {extra} extra), or drop {name} from report_to"
            )


def sleep_mode_unavailable() -> str | None:
    """None when vLLM's sleep mode works on this machine's platform (CUDA), else why not."""
    import torch  # lazy: loading a config (rlfr.schema imports this module) does not otherwise need torch

    if not torch.cuda.is_available():
        return "vLLM's sleep mode needs a CUDA GPU (on CPU it is a no-op)"
    return None


def resolve_dtype(dtype: str, device) -> str:
    """``model.dtype`` as the name of a torch dtype, for a model that will run on ``device`` (a ``torch.device``
    or its name): ``auto`` is bfloat16 on a CUDA device that supports it and float32 elsewhere (a CPU, or an
    older GPU, where float16 would need loss scaling); any other name is returned as it is."""
    if dtype != "auto":
        return dtype
    import torch  # lazy: as above

    cuda = (
        torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    return "bfloat16" if cuda else "float32"

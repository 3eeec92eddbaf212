"""What produced a result: package versions, so a results file can be reproduced."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("svdicl", "torch", "transformers", "tokenizers", "datasets", "gguf", "accelerate", "numpy")


def versions() -> dict[str, str | None]:
    """Python's and the relevant packages' versions (None if not installed), for results files."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found

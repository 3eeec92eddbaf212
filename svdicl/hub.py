"""Whether the Hugging Face Hub can be reached, asked once before a model or dataset download.

Offline (HF_HUB_OFFLINE set, or no route to huggingface.co), loaders look only in the local
Hugging Face cache instead of retrying the network for a minute.
"""

from __future__ import annotations

import os
import socket


def reachable(timeout: float = 3.0) -> bool:
    """True unless HF_HUB_OFFLINE is set or huggingface.co:443 does not answer within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True

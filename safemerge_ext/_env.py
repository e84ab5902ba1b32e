"""Reading on/off switches from the environment (imports only ``os``: the start-up hook uses it)."""

from __future__ import annotations

import os


def switched_on(name: str) -> bool:
    """Whether the variable ``name`` is set to anything but empty, 0, false, no or off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")

"""Progress on stderr for long-running commands (export's gate steps, `tfbn check`'s requests).

`progress_bar(total, desc, enabled)`: a tqdm bar on stderr that appears only once the
work has taken `DELAY` seconds, so quick runs print nothing. `enabled`: True forces it,
False (`--quiet`) silences it, None shows it only when stderr is a terminal (never in CI
logs or pipes).
"""

from __future__ import annotations

import sys

DELAY = 2.0  # seconds before a bar appears


def progress_bar(total: int | None, desc: str, enabled: bool | None = None, unit: str = "it"):
    from tqdm import tqdm

    stream = sys.stderr
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        disable=not enabled,
        delay=DELAY,
        leave=False,
        dynamic_ncols=True,
    )

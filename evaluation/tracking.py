"""An evaluation's results, added to the tracker run of the stage that wrote the checkpoint.

A stage trained with `tracking: wandb` or `tracking: tensorboard` names its run in `<stage dir>/tracking.json`
(prism.runtime). Evaluating its `model/` folder (`prism eval`, the matrix's eval nodes) reopens that run and adds
every metric of every task: to wandb's run summary, to TensorBoard as scalars at the stage's last logged step.
Keys are `eval/<suite>/<task>/<metric>`, with `<metric>_stderr`, `<metric>_ci95_low` and `<metric>_ci95_high`
where lmms-eval gives a standard error, and `eval/<suite>/<task>/n`. A `--limit N` evaluation writes under
`eval-limit<N>/` instead, so it never replaces a full evaluation's numbers. A checkpoint without a tracking.json
beside it (a Hub model, an untracked stage) is not logged anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prism.runtime import TRACKING_FILE, last_logged_step, reopen_trackers

Z_95 = 1.959963984540054  # two-sided 95% quantile of the normal distribution


def _finite(value: Any) -> float | None:
    """A row's number as a float, or None for a missing one (None, NaN, lmms-eval's "N/A")."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def summary_values(rows: Iterable[Mapping[str, Any]], suite: str, limit: int | None = None) -> dict[str, float]:
    """Tidy rows (evaluation.results) -> flat tracker keys: value, standard error and normal 95% interval per
    (task, metric), and n per task."""
    prefix = f"eval/{suite}" if limit is None else f"eval-limit{limit}/{suite}"
    values: dict[str, float] = {}
    for row in rows:
        task = f"{prefix}/{row['task']}"
        value, stderr, n = _finite(row["value"]), _finite(row.get("stderr")), _finite(row.get("n"))
        if value is None:
            continue
        key = f"{task}/{row['metric']}"
        values[key] = value
        if stderr is not None:
            values.update({f"{key}_stderr": stderr, f"{key}_ci95_low": value - Z_95 * stderr,
                           f"{key}_ci95_high": value + Z_95 * stderr})
        if n is not None:
            values[f"{task}/n"] = int(n)
    return values


def log_to_stage_trackers(checkpoint: Path | str, suite: str, rows: Iterable[Mapping[str, Any]],
                          limit: int | None = None) -> list[str]:
    """Add an evaluation of `checkpoint` to its stage's tracker runs; returns the trackers written ([] when the
    checkpoint's folder has no tracking.json beside it, or there is nothing to add)."""
    stage_dir = Path(checkpoint).parent
    if not (stage_dir / TRACKING_FILE).is_file():
        return []
    values = summary_values(rows, suite, limit)
    if not values:
        return []
    step = last_logged_step(stage_dir)
    written = []
    for tracker in reopen_trackers(stage_dir):
        try:
            tracker.summary(values, step)
            written.append(tracker.kind)
        finally:
            tracker.close()
    return written

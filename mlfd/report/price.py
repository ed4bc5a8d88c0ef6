"""The report's price section: a search's estimated cost (``mlfd tune --plan``'s model, saved at launch in
``OUT/price.json``) beside what the search measured, per study and in total."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mlfd.report.tables import _md_table


def _ratio(measured: float | None, estimate: float | None) -> str:
    if not measured or not estimate:
        return ""
    return f"{measured / estimate:.2f}"


def price_section(run_dir: Path, trials: pd.DataFrame | None = None) -> list[str]:
    """Markdown lines of the section (none when the search saved no estimate).

    Args:
        run_dir: A ``mlfd tune`` output directory.
        trials: Its trials.parquet (to count the trial-epochs that ran), if read.
    """
    from mlfd.tune.price import fmt_time, read_price

    price, measured = read_price(Path(run_dir))
    if price is None:
        return []
    measured = measured or {}
    studies = measured.get("studies", {})
    o = price.overheads
    total = measured.get("total_s")
    parts = [measured.get("ray_start_s"), measured.get("ray_stop_s"), measured.get("teachers_s"),
             *(v.get("wall_s") for v in studies.values())]
    rest = total - sum(parts) if total and None not in parts else None  # what the driver did before and between
    rows = [["driver start, pricing and the rest", fmt_time(o["driver_start"] + o["pricing"]),
             fmt_time(rest) if rest is not None else "", _ratio(rest, o["driver_start"] + o["pricing"])]]
    ray = measured["ray_start_s"] + measured.get("ray_stop_s", 0.0) if "ray_start_s" in measured else None
    for label, est, got in (("Ray start and stop", o["ray_start"], ray),
                            ("teacher prebuild", o["teachers"], measured.get("teachers_s"))):
        rows.append([label, fmt_time(est), fmt_time(got) if got is not None else "", _ratio(got, est)])
    for s in price.studies:
        got = studies.get(s.study, {}).get("wall_s")
        epochs = ""
        if trials is not None and "epochs" in trials.columns and "study" in trials.columns:
            ran = trials[trials["study"].astype(str) == s.study]["epochs"]
            epochs = f"; trial-epochs {s.trial_epochs:.1f} expected, {int(ran.sum())} ran" if len(ran) else ""
        rows.append([f"study {s.study} ({s.trials} trials, {s.concurrency} at once{epochs})", fmt_time(s.wall_s),
                     fmt_time(got) if got is not None else "", _ratio(got, s.wall_s)])
    rows.append(["**total** (the `mlfd tune` command)", fmt_time(price.wall_s), fmt_time(total) if total else "",
                 _ratio(total, price.wall_s)])
    md = ["## Price: estimate vs measured", "",
          f"Estimated at launch on {price.device} ({price.threads} thread(s) per trial, scheduler {price.scheduler}) "
          f"from a few timed batches per stage; the model is described in `mlfd/tune/price.py`. Expected "
          f"{price.device_hours:.3f} {price.device_unit}. Ratio: measured / estimate."
          + ("" if total else " The search has not finished: no measured total.")
          + (" Measured: the last `--resume` session only (its studies' trials that had finished before are not in "
             "its times)." if measured.get("resumed") else ""), "",
          _md_table(["", "estimate", "measured", "ratio"], rows), ""]
    return md

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
    rows = [["driver start and pricing", fmt_time(o["driver_start"] + o["pricing"]), "", ""],
            ["Ray start and stop", fmt_time(o["ray_start"]),
             fmt_time(measured["ray_start_s"] + measured.get("ray_stop_s", 0.0)) if "ray_start_s" in measured else "",
             ""],
            ["teacher prebuild", fmt_time(o["teachers"]),
             fmt_time(measured["teachers_s"]) if "teachers_s" in measured else "", ""]]
    for s in price.studies:
        got = studies.get(s.study, {}).get("wall_s")
        epochs = ""
        if trials is not None and "epochs" in trials.columns and "study" in trials.columns:
            ran = trials[trials["study"].astype(str) == s.study]["epochs"]
            epochs = f"; trial-epochs {s.trial_epochs:.1f} expected, {int(ran.sum())} ran" if len(ran) else ""
        rows.append([f"study {s.study} ({s.trials} trials, {s.concurrency} at once{epochs})", fmt_time(s.wall_s),
                     fmt_time(got) if got is not None else "", _ratio(got, s.wall_s)])
    total = measured.get("total_s")
    rows.append(["**total** (the `mlfd tune` command)", fmt_time(price.wall_s), fmt_time(total) if total else "",
                 _ratio(total, price.wall_s)])
    md = ["## Price: estimate vs measured", "",
          f"Estimated at launch on {price.device} ({price.threads} thread(s) per trial, scheduler {price.scheduler}) "
          f"from a few timed batches per stage; the model is described in `mlfd/tune/price.py`. Expected "
          f"{price.device_hours:.3f} {price.device_unit}. Ratio: measured / estimate."
          + ("" if total else " The search has not finished: no measured total."), "",
          _md_table(["", "estimate", "measured", "ratio"], rows), ""]
    return md

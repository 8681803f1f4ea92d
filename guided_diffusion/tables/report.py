"""A table run's outputs: table.md in the paper's layout, table.json, and the paper's plot where it has one.

Rows run with several seeds show each seed's FID and their spread; a claim (the paper's "A beats B") holds
here only when the gap exceeds the larger run-to-run spread measured on either row.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from guided_diffusion.infra.atomic_io import atomic_write, atomic_write_text
from guided_diffusion.tables.plan import Plan

COLUMNS = (("fid", "FID", ".2f"), ("sfid", "sFID", ".2f"), ("inception_score", "IS", ".2f"),
           ("precision", "precision", ".3f"), ("recall", "recall", ".3f"))


def _fmt(value: Any, spec: str) -> str:
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def summarize(plan: Plan, state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per table row (seeds merged): mean of each metric, each seed's FID, the FID spread (max - min)."""
    out: dict[str, dict[str, Any]] = {}
    infos = {**state.get("row_info", {}), **plan.rows}  # rows of earlier --rows calls into the same dir too
    for row in plan.table.rows:
        runs = [(info["seed"], state["rows"].get(name)) for name, info in infos.items()
                if info["row"] == row.name]
        if not runs:
            continue
        found = [(seed, r) for seed, r in runs if r]
        entry: dict[str, Any] = {"label": row.label, "method": row.method, "x": row.x, "runs": len(runs),
                                 "paper": dict(row.paper), "seeds": [seed for seed, _ in found]}
        for key, _, _ in COLUMNS:
            values = [r[key] for _, r in found if r.get(key) is not None]
            entry[key] = sum(values) / len(values) if values else None
        fids = [r["fid"] for _, r in found if r.get("fid") is not None]
        entry["fid_by_seed"] = fids
        entry["fid_spread"] = max(fids) - min(fids) if len(fids) > 1 else None
        entry["params"] = next((r.get("params") for _, r in found if r.get("params")), None)
        walls = [r.get("wall_s") for _, r in found if r.get("wall_s") is not None]
        entry["wall_s"] = sum(walls) / len(walls) if walls else None
        entry["pool"] = next((info["pool"] for info in infos.values()
                              if info["row"] == row.name and "pool" in info), None)
        histograms = [r["class_histogram"] for _, r in found if r.get("class_histogram")]
        entry["class_histogram"] = histograms[0] if histograms else None
        out[row.name] = entry
    return out


def judge_claims(plan: Plan, rows: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each paper ordering: the FID gap here and whether it exceeds the measured run-to-run spread."""
    spreads = [r["fid_spread"] for r in rows.values() if r.get("fid_spread") is not None]
    spread = max(spreads) if spreads else None
    verdicts = []
    for claim in plan.table.claims:
        better, worse = rows.get(claim.better, {}), rows.get(claim.worse, {})
        if better.get("fid") is None or worse.get("fid") is None:
            verdict, gap = "not run", None
        else:
            gap = worse["fid"] - better["fid"]
            if spread is None:
                verdict = "holds (spread not measured)" if gap > 0 else "reversed (spread not measured)"
            elif abs(gap) <= spread:
                verdict = "within the spread"
            else:
                verdict = "holds" if gap > 0 else "reversed"
        verdicts.append({"better": claim.better, "worse": claim.worse, "gap": gap, "spread": spread,
                         "verdict": verdict})
    return verdicts


def render_markdown(plan: Plan, state: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]],
                    verdicts: Sequence[Mapping[str, Any]], commands: Sequence[str]) -> str:
    """The table in the paper's layout (`rows` from summarize, `verdicts` from judge_claims), our numbers
    beside the paper's, then the claims, the stages not done and the commands."""
    table = plan.table
    sample = plan.settings["sample"]
    lines = [f"# {table.title}", "", f"Source of the paper's numbers: {table.source}. Mode: {plan.mode}; "
             f"{plan.settings['steps']} training steps; seeds {', '.join(map(str, plan.seeds))}; samples: "
             f"{sample['num_samples']} at {sample['timestep_respacing']} steps.", ""]
    if table.note:
        lines += [table.note, ""]
    header = ["row", *(label for _, label, _ in COLUMNS), "params", "pool", "wall s", "FID by seed",
              "paper FID"]
    histogram = any(r.get("class_histogram") for r in rows.values())
    if histogram:
        header.append("samples per class 0-9")
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows.values():
        cells = [row["label"], *(_fmt(row.get(key), spec) for key, _, spec in COLUMNS),
                 f"{row['params']:,}" if row.get("params") else "n/a",
                 f"{row['pool']:,}" if row.get("pool") else "", _fmt(row.get("wall_s"), ".0f"),
                 " / ".join(_fmt(f, ".2f") for f in row["fid_by_seed"]) or "n/a",
                 _fmt(row["paper"].get("fid"), ".2f")]
        if histogram:
            cells.append(" ".join(map(str, row["class_histogram"])) if row.get("class_histogram") else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if verdicts:
        lines += ["", "The paper's orderings here (FID; spread: the largest seed-to-seed FID range):", ""]
        for v in verdicts:
            gap = "" if v["gap"] is None else f": gap {v['gap']:.2f}, spread {_fmt(v['spread'], '.2f')}"
            lines.append(f"- {rows.get(v['better'], {}).get('label', v['better'])} better than "
                         f"{rows.get(v['worse'], {}).get('label', v['worse'])}: **{v['verdict']}**{gap}")
    unfinished = {k: v for k, v in state["stages"].items() if v["status"] != "done"}
    if unfinished:
        notes = [f"{k} ({v['status']}{': ' + v['error'] if v.get('error') else ''})"
                 for k, v in unfinished.items()]
        lines += ["", "Not done: " + "; ".join(notes)]
    lines += ["", "Commands, in order:", "", *(f"    {c}" for c in commands), ""]
    return "\n".join(lines)


def plot_table(plan: Plan, rows: Mapping[str, Mapping[str, Any]], path: str) -> bool:
    """FID against the table's x (rho, student size), ours with seed range bars and the paper's; False when
    the table has no plot or no row has both an x and an FID."""
    if not plan.table.plot:
        return False
    points = sorted((r["x"], r["fid"], r["fid_by_seed"], r["paper"].get("fid")) for r in rows.values()
                    if r.get("x") is not None and r.get("fid") is not None)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [p[0] for p in points]
    low = [p[1] - min(p[2]) for p in points]
    high = [max(p[2]) - p[1] for p in points]
    ax.errorbar(xs, [p[1] for p in points], yerr=[low, high], marker="o", capsize=3,
                label=f"here ({plan.mode})")
    paper = [(p[0], p[3]) for p in points if p[3] is not None]
    if paper:
        ax.plot([p[0] for p in paper], [p[1] for p in paper], "s--", label="paper")
    if plan.table.plot.get("x_log"):
        ax.set_xscale("log")
    ax.set_xlabel(str(plan.table.plot.get("x_label", "x")))
    ax.set_ylabel("FID")
    ax.set_title(plan.table.title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return True


def write_reports(plan: Plan, state: Mapping[str, Any], commands: Sequence[str]) -> None:
    """Rewrite table.md, table.json and (where the paper has one) table.png in the table dir, atomically."""
    rows = summarize(plan, state)
    verdicts = judge_claims(plan, rows)
    payload = {"table": plan.table.name, "title": plan.table.title, "source": plan.table.source,
               "settings": plan.settings, "rows": rows, "claims": verdicts, "commands": list(commands)}
    atomic_write_text(plan.out / "table.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(plan.out / "table.md", render_markdown(plan, state, rows, verdicts, commands))
    plot_table(plan, rows, str(plan.out / "table.png"))

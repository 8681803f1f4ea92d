"""Plot the digits benchmark's FID-over-steps curves from its results.json (matplotlib, Agg backend).

    python benchmarks/plot_results.py DIR/results.json [--out DIR/fid_over_steps.png]

One line per trained method (digits-FID of its EMA samples at each evaluated step), with the shipped teacher
and the real-data floor as horizontal references. Called by benchmarks/digits_results.py after every method.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from guided_diffusion.infra.checkpoint import atomic_write_bytes  # noqa: E402

# Horizontal reference lines (labelled with their rows' labels): row name -> line style.
REFERENCE_LINES = {"teacher": "--", "teacher_ddim8": "-.", "real_train": ":"}


def curve_points(row: Mapping[str, Any]) -> tuple[list[int], list[float]]:
    """Steps and digits-FIDs of a row's curve, sorted by step, leaving out points without a finite FID."""
    points = sorted(
        (int(p["step"]), float(p["fid"])) for p in row.get("curve", []) if p.get("fid") is not None
    )
    return [s for s, _ in points], [f for _, f in points]


def plot_fid_over_steps(results: Mapping[str, Any], path: str | Path) -> bool:
    """Write the FID-over-steps PNG atomically; False (nothing written) when no row has a curve point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("rows", {})
    curves = {name: curve_points(row) for name, row in rows.items() if row.get("curve")}
    curves = {name: pts for name, pts in curves.items() if pts[0]}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, fids) in sorted(curves.items()):
        ax.plot(steps, fids, marker="o", label=rows[name].get("label", name))
    for name, style in REFERENCE_LINES.items():
        row = rows.get(name, {})
        if row.get("fid") is not None:
            label = f"{row.get('label', name)}: {row['fid']:.2f}"
            ax.axhline(row["fid"], linestyle=style, color="gray", linewidth=1, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("digits-FID (lower is better)")
    if all(f > 0 for _, fids in curves.values() for f in fids):
        ax.set_yscale("log")
    ax.set_title("Digits: FID of EMA samples over training steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), str(path))
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI: re-plot a results.json; exit 2 with a one-line message on a missing or unreadable file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json written by benchmarks/digits_results.py")
    parser.add_argument("--out", default=None, help="PNG path (default: fid_over_steps.png beside the JSON)")
    args = parser.parse_args(argv)
    src = Path(args.results)
    try:
        results = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {src}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else src.with_name("fid_over_steps.png")
    if not plot_fid_over_steps(results, out):
        print(f"error: {src} has no FID-over-steps points to plot", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run one paper table: every row's commands as the seed README writes them, resumable, printed as the paper.

    python scripts/run_table.py --list
    python scripts/run_table.py dkdm-rho [--ranks N] [--rows rho-0.01,rho-0.4] [--dry_run]
    python scripts/run_table.py dkdm-rho --digits [--seeds 0,1] [--jobs 4]   # on the digits teacher
    python scripts/run_table.py tccd-main --smoke                    # seconds on a CPU (CI)

Output in --out (default experiments/tables/<table>[-digits|-smoke]): table.md, table.json, table.png where
the paper has a plot, logs/ of every command, state.json. Run the same command again to resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from guided_diffusion.tables.plan import build_plan  # noqa: E402
from guided_diffusion.tables.runner import TableRunner  # noqa: E402
from guided_diffusion.tables.spec import TableError, load_table, table_names  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run one table of the DKDM, TCCD or RDD paper.")
    p.add_argument("table", nargs="?", help="a table name (--list) or a table YAML")
    p.add_argument("--list", action="store_true", help="name the tables and exit")
    p.add_argument("--ranks", type=int, default=1, help="processes per stage (mpiexec -n, torchrun)")
    p.add_argument("--rows", default="", help="comma-separated rows to run (default: all)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each row runs once per seed")
    p.add_argument("--seed_rows", default="",
                   help="comma-separated rows run with every seed (the spread); the others with the first")
    p.add_argument("--steps", type=int, default=0, help="training steps of every row (default: the scale's)")
    p.add_argument("--jobs", type=int, default=1, help="stages run side by side once their inputs are done")
    p.add_argument("--dry_run", action="store_true", help="print every command without running any")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--digits", action="store_true", help="every row on the shipped digits teacher")
    scale.add_argument("--smoke", action="store_true", help="digits rows at a few steps (a CPU check)")
    p.add_argument("--out", default=None, help="table dir (default experiments/tables/<table>[-<mode>])")
    args = p.parse_args(argv)
    if not args.list and not args.table:
        p.error("name a table (or --list)")
    try:
        args.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in table_names():
            table = load_table(name)
            print(f"{name:16s} {len(table.rows):2d} rows  {table.title}")
        return 0
    mode = "digits" if args.digits else "smoke" if args.smoke else "full"
    try:
        table = load_table(args.table)
        out = Path(args.out or f"experiments/tables/{table.name}{'' if mode == 'full' else '-' + mode}")
        rows = [r for r in args.rows.split(",") if r]
        seed_rows = [r for r in args.seed_rows.split(",") if r]
        plan = build_plan(table, mode, out, args.seeds, args.ranks, rows, args.steps, seed_rows)
        runner = TableRunner(plan, jobs=args.jobs)
        if args.dry_run:
            runner.dry_run()
            return 0
        return runner.run()
    except TableError as exc:
        print(f"run_table.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Summarise a mutmut run per module: killed / survived / no tests / timeout, and every survivor by name.

Reads the `<module>.py.meta` files mutmut writes beside its mutated copies (mutants/), naming each exit code
with mutmut's own table; the kill rate counts timeouts as killed (the mutant hung the tests) and "no tests"
as survived (nothing exercised it). With
`--equivalent FILE` (lines `mutant-name<TAB>reason`), listed survivors count as equivalent: out of the kill
rate's denominator and out of the survivors still to account for.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import sys
from collections import Counter
from datetime import date
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = ("killed", "timeout", "caught by type check")  # statuses the kill rate counts as killed
SURVIVED = ("survived", "no tests")


def status(code: int | None) -> str:
    """mutmut's exit code of one mutant run as mutmut's own word for it."""
    return status_by_exit_code[code]


def read_equivalent(path: Path | None) -> dict[str, str]:
    """Mutant name -> the one-line reason it cannot change behaviour."""
    if path is None:
        return {}
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, sep, reason = line.partition("\t")
            if not sep or not reason.strip():
                raise ValueError(f"{path}:{number}: expected 'mutant-name<TAB>reason', got {line!r}")
            out[name.strip()] = reason.strip()
    return out


def summarize(mutants_dir: Path, equivalent: dict[str, str] | None = None) -> dict[str, dict]:
    """Per source module: counts of each status (survivors listed in `equivalent` as "equivalent") and the
    names of the survivors not accounted for."""
    equivalent = equivalent or {}
    modules: dict[str, dict] = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        module = meta.relative_to(mutants_dir).as_posix()[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        words = {k: status(c) for k, c in codes.items()}
        listed = {k for k, w in words.items() if k in equivalent and w in SURVIVED}
        words.update(dict.fromkeys(listed, "equivalent"))
        counts = Counter(words.values())
        killed = sum(counts[w] for w in KILLED)
        checked = killed + sum(counts[w] for w in SURVIVED)
        modules[module] = {
            "counts": dict(counts), "total": len(codes), "killed": killed,
            "rate": killed / checked if checked else None,
            "survivors": sorted(k for k, w in words.items() if w in SURVIVED),
        }
    return modules


def mutant_diffs(mutants_dir: Path, module: str) -> dict[str, str]:
    """Each mutant of `module` as its changed lines (`- original` / `+ mutated`), read from mutmut's copy,
    where every mutant is a function `<name>__mutmut_<n>` beside `<name>__mutmut_orig`."""
    tree = ast.parse((mutants_dir / module).read_text())
    functions = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name, node.name = node.name, "f"  # the def lines then differ only where a mutant changed them
            functions[name] = ast.unparse(node).splitlines()
    prefix = module[: -len(".py")].replace("/", ".") + "."
    out = {}
    for name, body in functions.items():
        base, _, number = name.rpartition("__mutmut_")
        if not base or not number.isdigit() or base + "__mutmut_orig" not in functions:
            continue
        changed = [line for line in difflib.ndiff(functions[base + "__mutmut_orig"], body)
                   if line[:2] in ("- ", "+ ")]
        out[prefix + name] = " | ".join(line[:2] + line[2:].strip() for line in changed)
    return out


def render(modules: dict[str, dict], diffs: dict[str, str] | None = None) -> str:
    """The report as markdown: one table row per module, then each module's survivors."""
    lines = [f"# Mutation report ({date.today().isoformat()}, `bash tools/mutants.sh`)", "",
             "Kill rate: killed / (killed + survived + no tests); equivalent and unchecked mutants are out.",
             "",
             "| module | mutants | killed | equivalent | survived | no tests | not checked | kill rate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for module, m in modules.items():
        c = m["counts"]
        rate = "n/a" if m["rate"] is None else f"{100 * m['rate']:.1f}%"
        cells = [m["total"], m["killed"], *(c.get(k, 0) for k in ("equivalent", "survived", "no tests",
                                                                 "not checked")), rate]
        lines.append(f"| {module} | " + " | ".join(map(str, cells)) + " |")
    for module, m in modules.items():
        if m["survivors"]:
            lines += ["", f"## {module}: {len(m['survivors'])} survivors", ""]
            lines += [f"- `{name}`" + (f": `{diffs[name]}`" if diffs and name in diffs else "")
                      for name in m["survivors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mutants", type=Path, help="mutmut's mutants/ folder")
    p.add_argument("--out", type=Path, help="write the markdown report here (default: print it)")
    p.add_argument("--diffs", action="store_true", help="show each survivor's changed lines")
    p.add_argument("--equivalent", type=Path, help="mutant-name<TAB>reason lines: survivors shown equivalent")
    args = p.parse_args(argv)
    if not args.mutants.is_dir():
        print(f"mutation_report.py: error: {args.mutants} is not a mutmut mutants/ folder", file=sys.stderr)
        return 2
    modules = summarize(args.mutants, read_equivalent(args.equivalent))
    diffs = {}
    if args.diffs:
        for module, m in modules.items():
            if m["survivors"]:
                diffs.update(mutant_diffs(args.mutants, module))
    text = render(modules, diffs)
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tools/mutation_report.py on a hand-made mutmut folder: statuses, kill rate, equivalents, survivor diffs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "mutation_report", Path(__file__).resolve().parents[1] / "tools" / "mutation_report.py")
mutation_report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mutation_report)

MUTATED = '''
def x_f__mutmut_orig(a):
    return a + 1

def x_f__mutmut_1(a):
    return a - 1

def x_f__mutmut_2(a):
    return a + 2
'''


def _folder(tmp_path: Path) -> Path:
    pkg = tmp_path / "mutants" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(MUTATED)
    codes = {"pkg.mod.x_f__mutmut_1": 1, "pkg.mod.x_f__mutmut_2": 0, "pkg.mod.x_f__mutmut_3": 33,
             "pkg.mod.x_f__mutmut_4": 36, "pkg.mod.x_f__mutmut_5": None}
    (pkg / "mod.py.meta").write_text(json.dumps({"exit_code_by_key": codes}))
    return tmp_path / "mutants"


def test_counts_rate_equivalents_and_diffs(tmp_path):
    mutants = _folder(tmp_path)
    m = mutation_report.summarize(mutants)["pkg/mod.py"]
    assert m["counts"] == {"killed": 1, "survived": 1, "no tests": 1, "timeout": 1, "not checked": 1}
    assert m["rate"] == pytest.approx(2 / 4) and m["survivors"] == ["pkg.mod.x_f__mutmut_2",
                                                                     "pkg.mod.x_f__mutmut_3"]
    listed = tmp_path / "eq.tsv"
    listed.write_text("# name<TAB>reason\npkg.mod.x_f__mutmut_2\tsame output\n")
    m = mutation_report.summarize(mutants, mutation_report.read_equivalent(listed))["pkg/mod.py"]
    assert m["counts"]["equivalent"] == 1 and m["rate"] == pytest.approx(2 / 3)
    assert m["survivors"] == ["pkg.mod.x_f__mutmut_3"]
    diffs = mutation_report.mutant_diffs(mutants, "pkg/mod.py")
    assert diffs["pkg.mod.x_f__mutmut_2"] == "- return a + 1 | + return a + 2"
    listed.write_text("pkg.mod.x_f__mutmut_2 no tab\n")
    with pytest.raises(ValueError, match=r"eq.tsv:1: expected 'mutant-name<TAB>reason'"):
        mutation_report.read_equivalent(listed)

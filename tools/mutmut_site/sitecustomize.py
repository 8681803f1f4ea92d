"""Mutation runs only (tools/mutants.sh puts this folder on PYTHONPATH) for scripts that a test starts.

- Their mutated code's trampoline reads mutmut's config from pyproject.toml in the working directory, and
  tests start scripts in other folders: the config is loaded once from MUTMUT_ROOT, the scratch checkout.
- While mutmut maps tests to the functions they call ("stats"), a script's calls happen outside the test's
  process; they are written to MUTMUT_HITS_DIR at exit, and tests/conftest.py adds them to the test's.
"""

import atexit
import os

_root = os.environ.get("MUTMUT_ROOT")
if _root and os.environ.get("MUTANT_UNDER_TEST"):
    _cwd = os.getcwd()
    try:
        os.chdir(_root)
        from mutmut.configuration import config

        config()
    finally:
        os.chdir(_cwd)
    _hits = os.environ.get("MUTMUT_HITS_DIR")
    if _hits and os.environ["MUTANT_UNDER_TEST"] == "stats":
        from mutmut.state import state

        def _dump() -> None:
            with open(os.path.join(_hits, f"hits-{os.getpid()}.txt"), "a") as f:
                f.write("\n".join(sorted(state()._stats)) + "\n")

        atexit.register(_dump)
        _exit = os._exit

        def _dump_then_exit(status: int) -> None:  # the scripts end with os._exit (run_setup.run_script)
            _dump()
            _exit(status)

        os._exit = _dump_then_exit

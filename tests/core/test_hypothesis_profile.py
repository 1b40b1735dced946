"""CI=true selects the derandomized hypothesis profile (tests/conftest.py): a CI failure reproduces."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import tests.conftest; from hypothesis import settings; "
         "print(settings._current_profile, settings.default.derandomize, settings.default.print_blob)")


def _profile(ci):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_ci_runs_derandomized_and_elsewhere_fresh_examples():
    assert _profile("true") == ["ci", "True", "True"]
    assert _profile(None) == ["dev", "False", "True"]

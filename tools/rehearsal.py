"""Regenerate docs/full-scale.md: run the dress rehearsal of a full-scale run (tests/test_full_scale.py) and write
its transcript, each command as a user types it and what it printed.

    .venv/bin/python tools/rehearsal.py [OUT]        # OUT: default docs/full-scale.md

About two minutes on 2 CPU cores; nothing is downloaded (the test makes every file it uses)."""
import os, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs" / "full-scale.md").resolve()
    env = dict(os.environ, ANYMAL_REHEARSAL_TRANSCRIPT=str(out), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--durations=1", "tests/test_full_scale.py"], cwd=REPO,
                       env=env)
    if r.returncode: sys.exit(f"the rehearsal failed (exit {r.returncode}): {out} not written")
    print(f"wrote {out}")

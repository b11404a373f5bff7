"""(Re)generate the golden files of a script and show how they change.

    python -m tests.golden dpo                 # show the diff against tests/golden/dpo.*.json
    python -m tests.golden dpo --write         # ... and write the new files
    python -m tests.golden dpo --only loss     # only the loss functions (instant); --only run: the run

Loss goldens come from tests/references/<script>.py (LOSSES); the run golden runs algos/<script>.py with
the arguments in RUN (a few seconds). Never regenerate to make a failing test pass without saying why in
the commit message: a changed golden value is a changed algorithm.
"""

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from tests.golden import GOLDEN_DIR, build_loss_goldens, build_run_golden, dumps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="the script's name in algos/, e.g. dpo")
    parser.add_argument("--write", action="store_true", help="write the files (default: only show the diff)")
    parser.add_argument("--only", choices=["loss", "run"], help="only the loss goldens, or only the run golden")
    options = parser.parse_args()

    goldens = {} if options.only == "run" else build_loss_goldens(options.script)
    if options.only != "loss":
        with tempfile.TemporaryDirectory() as tmp:
            goldens[f"{options.script}.run.json"] = build_run_golden(options.script, Path(tmp))

    for name, golden in goldens.items():
        path = GOLDEN_DIR / name
        old = path.read_text().splitlines(keepends=True) if path.exists() else []
        new = dumps(golden).splitlines(keepends=True)
        diff = list(difflib.unified_diff(old, new, f"a/tests/golden/{name}", f"b/tests/golden/{name}"))
        print(f"{name}: " + ("unchanged" if not diff else f"{len(diff)} diff lines" if old else "new file"))
        sys.stdout.writelines(diff[:400])
        if len(diff) > 400:
            print(f"... {len(diff) - 400} more diff lines")
        if options.write and diff:
            path.write_text("".join(new))
            print(f"wrote {path}")
    if not options.write:
        print("(nothing written: add --write to write these files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

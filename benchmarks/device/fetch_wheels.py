"""Download, here, the wheels the GPU check needs and the GPU machine's image lacks, into .whl/ at the
repo root (git-ignored; the device tool carries it with `carry: [".whl"]`, at most 64 MiB in all).

    python benchmarks/device/fetch_wheels.py            # for the image's Python 3.12 on x86-64 Linux

The image (benchmarks/device/README.md) has torch, triton, transformers, accelerate, pandas, pyarrow,
xxhash, rich and matplotlib; it lacks what is listed below. Versions: requirements.txt's pins, TRL and
Liger as benchmarks/requirements*.txt name them, the others as this venv resolved them. All are pure
Python (multiprocess's wheel is per Python version, hence --python-version); check.py installs only
those the image lacks.
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = [
    "tyro==1.0.17", "docstring-parser==0.18.0", "typeguard==4.6.1",  # bench_kernels.py's command line
    "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",  # TRL's columns and DPOTrainer
    "liger-kernel==0.8.5",  # Liger's columns
]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python (3.12 when last read)")
    parser.add_argument("--dest", default=str(ROOT / ".whl"))
    args = parser.parse_args()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", args.python_version, "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", args.dest, *WHEELS]
    subprocess.run(command, check=True)
    wheels = sorted(Path(args.dest).glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.dest} (the device tool carries at most 64 MiB)")

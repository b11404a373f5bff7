"""The GPU check, in one call on a bare GPU machine (see benchmarks/device/README.md):

    bash benchmarks/device/check.sh                                  # writes to $OUT
    python benchmarks/device/check.py --dry-run --out /tmp/check     # CPU, tiny shapes, seconds

Stages, each a subprocess with its own log, in order of what matters most, so a slow stage cannot
starve the others of the time budget (--budget seconds for all; the sweep gets what is left):
1. wheels: installs the .whl/ wheels whose packages the machine's image lacks into /tmp/site (no
   network there; benchmarks/device/fetch_wheels.py downloads them here);
2. tests: tests/test_kernels.py with the compiled Triton kernels (TRITON_INTERPRET=0);
3. dpo: benchmarks/device/dpo_step.py, one DPO step of a Qwen2.5-0.5B-shaped model, fused vs unfused vs TRL;
4. sweep: benchmarks/bench_kernels.py on the GPU shapes, bf16 and fp32, against eager, torch.compile,
   Liger and TRL where they import, with the device copy's bandwidth and the issue's targets.
Writes check.json (versions, each stage's status, seconds and log) and the stages' own files to --out.
--dry-run runs the same stages on the CPU with tiny shapes and the Triton interpreter, so the script
is exercised by tests/test_device_check.py between GPU runs.
"""

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = Path("/tmp/site")

# The GPU sweep: the shapes from the smallest vocabulary to the largest (16384 x 151936).
GPU_SHAPES = ["8192x32000", "8192x128256", "16384x151936"]


def stage(name, command, out, deadline, env=None):
    """Run one stage, its output to <out>/<name>.log; returns its record for check.json."""
    timeout = deadline - time.monotonic()
    if timeout < 10:
        return dict(status="skipped: no time left in the budget")
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s (the budget's end)"
    print(f"{name}: {status} in {time.monotonic() - start:.0f} s", flush=True)
    return dict(status=status, seconds=round(time.monotonic() - start, 1), log=f"{name}.log", command=command)


def install_wheels(out):
    """Install the carried wheels of packages the image lacks (keeping the image's own torch, triton,
    transformers, etc.); return what was installed and what was already there."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return dict(status="skipped: no .whl/ folder (run benchmarks/device/fetch_wheels.py here first)")
    missing, present = [], []
    for wheel in wheels:
        name = wheel.name.split("-")[0]
        try:
            present.append(f"{name} {importlib.metadata.version(name)} (the image's)")
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    if missing:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--upgrade", "--target", str(SITE), *map(str, missing)]
        result = subprocess.run(command, capture_output=True, text=True)
        (out / "wheels.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            return dict(status=f"failed (exit {result.returncode})", log="wheels.log")
    return dict(status="ok", installed=[w.name for w in missing], present=present)


def versions(env):
    """The versions that the stages will see (with /tmp/site on the path)."""
    code = ("import json, importlib.metadata as m, torch\n"
            "v = {}\n"
            "for n in ['torch', 'triton', 'transformers', 'trl', 'liger-kernel', 'tyro', 'datasets', 'accelerate']:\n"
            "    try: v[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: v[n] = None\n"
            "v['cuda'] = torch.cuda.get_device_name() if torch.cuda.is_available() else None\n"
            "print(json.dumps(v))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else dict(error=result.stderr[-500:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/device",
                        help="output folder (default: $OUT, else benchmarks/results/device)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks the script")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all stages (the sweep gets what is left)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    record = dict(dry_run=args.dry_run, budget_s=args.budget)

    if args.dry_run:
        record["wheels"] = dict(status="skipped: --dry-run uses this machine's environment")
    else:
        record["wheels"] = install_wheels(out)
        if SITE.exists():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    print(f"wheels: {record['wheels']['status']}", flush=True)
    record["versions"] = versions(env)
    print(f"versions: {record['versions']}", flush=True)

    # The dry run keeps the interpreter and runs a few fast tests; the GPU runs them all, compiled.
    test_env = dict(env, TRITON_INTERPRET="1" if args.dry_run else "0")
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    record["tests"] = stage("tests", tests + (["-k", "linear_logprobs_errors"] if args.dry_run else []), out,
                            deadline, test_env)
    if (out / "tests.log").exists():
        summary = re.findall(r"^=* ?(\d+ (?:passed|failed).*?)=*$", (out / "tests.log").read_text(), re.M)
        record["tests"]["summary"] = summary[-1].strip() if summary else None

    dpo = [sys.executable, "benchmarks/device/dpo_step.py", "--out", str(out)]
    record["dpo"] = stage("dpo", dpo + (["--dry-run", "--steps", "1"] if args.dry_run else []), out, deadline, env)

    sweep = [sys.executable, "benchmarks/bench_kernels.py", "--out-dir", str(out), "--isolate", "False"]
    if args.dry_run:
        sweep += ["--shapes", "64x500", "--dtypes", "fp32", "--repeats", "1", "--hidden", "32",
                  "--methods", "kernels", "eager", "unfused", "matmuls", "liger", "copy"]
    else:
        sweep += ["--shapes", *GPU_SHAPES, "--dtypes", "bf16", "fp32", "--repeats", "5"]
    record["sweep"] = stage("sweep", sweep, out, deadline, env)

    (out / "check.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out}/check.json", flush=True)
    failed = [name for name in ("tests", "dpo", "sweep") if record[name]["status"] != "ok"]
    sys.exit(f"stages not ok: {failed}" if failed else 0)


if __name__ == "__main__":
    main()

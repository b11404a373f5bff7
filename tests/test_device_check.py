"""benchmarks/device/check.py --dry-run: the GPU check's stages, on the CPU with tiny shapes, so the script
cannot rot between GPU runs (it runs on a GPU machine only when one is lent). TRL and Liger need not be
installed: their columns then say why they were skipped."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/device/check.py", "--dry-run", "--out", str(tmp_path),
                             "--budget", "170"], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((tmp_path / "check.json").read_text())
    assert record["dry_run"] and record["versions"]["torch"]
    for name in ("tests", "dpo", "sweep"):
        assert record[name]["status"] == "ok", (name, (tmp_path / record[name]["log"]).read_text()[-2000:])
    assert "passed" in record["tests"]["summary"] and "failed" not in record["tests"]["summary"]

    dpo = json.loads((tmp_path / "dpo_step.json").read_text())["results"]
    for variant in ("fused", "unfused"):
        assert dpo[variant]["tokens_per_s"] > 0
    # The same random model, batch and loss: the fused and unfused paths start from the same DPO loss (ln 2).
    assert abs(dpo["fused"]["first_loss"] - dpo["unfused"]["first_loss"]) < 1e-5
    assert "trl" in dpo and ("tokens_per_s" in dpo["trl"] or "skipped" in dpo["trl"])

    for part, methods in (("logits", {"kernels", "eager", "liger", "copy"}), ("linear", {"kernels", "unfused", "matmuls", "liger"})):
        sweep = json.loads((tmp_path / f"kernels_{part}_cpu.json").read_text())
        rows = {row["method"]: row for row in sweep["rows"]}
        assert set(rows) == methods
        assert rows["kernels"]["ms"] > 0 and rows["kernels"]["max_grad_err"] < 1e-4
        assert "CUDA" in rows["liger"]["skipped"]
        assert sweep["targets"] and "not measured" in sweep["targets"][0]

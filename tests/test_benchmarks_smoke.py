"""Smoke tests of the evidence benchmarks: each ``--quick`` mode runs end to end and prints its tables.

They check that the scripts run (training, evaluation, tables, JSON, plots), not the numbers: the quick modes train
for a handful of steps. Each takes well under a minute on two cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "python-docs"

SHIPPED = REPO / "examples" / "data" / "tinyshakespeare.txt"
HAS_DATA = (DATA / "train.jsonl").exists() and (DATA / "validation.jsonl").exists()


def text_arguments(script: str) -> list[str]:
    """The scripts default to ../shared/data/python-docs (JSONL); where it is absent (a fresh CI machine), they read
    the text shipped in examples/data instead (any text file works)."""
    if HAS_DATA:
        return []
    text = str(SHIPPED)
    if script == "recall.py":
        return ["--haystack", text, "--eval-haystack", text]
    if script.endswith("train_stability.py"):
        return ["--train", text]
    return ["--train", text, "--validation", text]


def run_benchmark(script: str, *args: str) -> str:
    """Runs ``benchmarks/<script>`` offline with ``args``; asserts it succeeded and returns its output."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_quick(script: str, out: Path) -> str:
    return run_benchmark(script, "--quick", "--out", str(out), *text_arguments(script))


def test_recall_quick(tmp_path):
    stdout = run_quick("recall.py", tmp_path)
    for name in ("Titans MAC", "Titans MAG", "Titans MAL", "Titans LMM", "Mistral (SWA)", "Llama (full)"):
        assert name in stdout
    assert "### mqar: accuracy" in stdout and "### passkey: accuracy" in stdout
    assert "| model" in stdout
    report = json.loads((tmp_path / "recall.json").read_text())
    assert {r["task"] for r in report["results"]} == {"mqar", "passkey"}
    assert (tmp_path / "recall.png").stat().st_size > 0


def test_lm_quality_quick(tmp_path):
    stdout = run_quick("lm_quality.py", tmp_path)
    for name in ("Titans MAC", "Titans MAG", "Titans MAL", "Titans LMM", "Mistral (SWA)", "Llama (full)"):
        assert name in stdout
    assert "### Validation bits per byte" in stdout and "### Length extrapolation" in stdout
    report = json.loads((tmp_path / "lm_quality.json").read_text())
    for runs in report["result"]["runs"].values():
        for run in runs:
            assert set(run["bpb"]) == {"1x", "4x", "16x"}
            assert all(0 < v < 9 for v in run["bpb"].values())
    assert (tmp_path / "lm_quality_curves.png").stat().st_size > 0
    assert (tmp_path / "lm_quality_extrapolation.png").stat().st_size > 0


def test_write_rule_quick(tmp_path):
    out = tmp_path / "write_rule.json"
    stdout = run_benchmark("write_rule.py", "--quick", "--variants", "mag", "--out", str(out))
    assert "| mag | 1 |" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["text_d16"]["finite"] for row in rows)  # the default budget is stable on real text


def test_train_stability_runs(tmp_path):
    script = "train_stability.py"
    for ablation in ([], ["--no-curvature"]):
        stdout = run_benchmark(script, "--steps", "2", "--out", str(tmp_path), *ablation, *text_arguments(script))
        assert "max_read_rms" in stdout
    for name in ("train_stability.json", "train_stability_no_curvature.json"):
        assert json.loads((tmp_path / name).read_text())["summary"]["steps"] == 2


def test_profile_step_runs(tmp_path):
    stdout = run_benchmark(
        "profile_step.py", "--length", "128", "--steps", "1", "--top", "5", "--threads", "1", "--out", str(tmp_path)
    )
    saved = json.loads((tmp_path / "profile_mag_128.json").read_text())
    assert len(saved["top_ops"]) == 5 and 0 < saved["top_ops"][0]["share"] <= 1
    assert "self ms/step" in stdout


def test_flops_quick(tmp_path):
    stdout = run_benchmark("flops.py", "--quick", "--variants", "mag", "--out", str(tmp_path))
    assert "GFLOP/s needed" in stdout and "1.0x Llama" in stdout
    report = json.loads((tmp_path / "flops.json").read_text())
    assert {r["name"] for r in report["rows"]} >= {"mag", "llama", "titans-hf memory"}
    assert all(r["gflop"] > 0 and r["seconds"] > 0 for r in report["rows"])


def test_pretrained_memory_quick(tmp_path):
    """Train a tiny Llama base, convert it, fine-tune three ways, evaluate: the conversion is exact on the trained
    base within the window, and equals the base with the same sliding window at every length."""
    script = "pretrained_memory.py"
    stdout = run_benchmark(script, "--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work"),
                           *text_arguments(script))  # fmt: skip
    for heading in ("### Conversion exact", "### Bits per byte by position", "### Pass-key recall", "### Cost"):
        assert heading in stdout
    report = json.loads((tmp_path / "pretrained_memory.json").read_text())
    window = report["settings"]["window"]
    assert all(row["vs_windowed_base"] < 1e-5 for row in report["exactness"])
    assert all(row["vs_base"] < 1e-5 for row in report["exactness"] if row["length"] <= window)
    assert report["greedy"]["base"] and report["greedy"]["windowed_base"]
    assert set(report["finetune"]) == {"memory", "memory+lora", "lora"}
    assert (tmp_path / "pretrained_memory.png").stat().st_size > 0


def test_memory_rules_quick(tmp_path):
    """Every stage's machinery: two rules through recall.py and lm_quality.py, the speed rounds, the table."""
    text = [] if HAS_DATA else ["--train", str(SHIPPED), "--validation", str(SHIPPED)]
    out = run_benchmark("memory_rules.py", "--quick", "--out", str(tmp_path), *text)
    assert "| titans-hf |" in out and "| titans " in out and "step vs titans-hf" in out
    assert json.loads((tmp_path / "memory_rules_evidence_quick.json").read_text())["step_seconds"]


def test_launches_quick(tmp_path):
    out = run_benchmark("launches.py", "--quick", "--variants", "mag", "--out", str(tmp_path))
    assert "closed form (backward)" in out and "| total |" in out


def test_compile_time_point(tmp_path):
    """One point of the grid, in its own process: a tiny MAG's training step compiled per layer."""
    args = ["--backends", "aot_eager", "--modes", "train", "--tokens", "64", "--layers", "1", "--steps", "1"]
    out = run_benchmark("compile_time.py", *args, "--out", str(tmp_path))
    row = json.loads((tmp_path / "compile_time.json").read_text())["rows"][0]
    assert "error" not in row and row["graphs"] == 1 and not row["thrice_recompiled"], (row, out)

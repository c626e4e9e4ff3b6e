"""benchmarks/run_all.py: the plan of commands, the machine's description, and a run of fake benchmarks
(never the real ones: they take minutes)."""

import importlib.util
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)


def test_plan_covers_every_bench_script():
  scripts = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))
  planned = run_all.plan(BENCHMARKS, python="PY", obp_python="OBP", torch_python="TORCH")
  assert [p.script for p in planned] == scripts
  for p in planned:  # with both side environments given, every one runs
    assert p.skipped is None and p.command[1] == f"benchmarks/{p.script}"
    assert p.command[0] == ("TORCH" if run_all.QUICK.get(p.script[:-3], run_all.Quick()).needs_torch
                            else "PY")
  ope = next(p for p in planned if p.name == "ope")
  assert ope.command[-2:] == ["--obp-python", "OBP"]


def test_plan_without_side_environments_says_what_it_leaves_out():
  planned = {p.name: p for p in run_all.plan(BENCHMARKS, python="PY")}
  assert "--obp-python" not in planned["ope"].command
  assert any("OBP" in note for note in planned["ope"].notes)
  for name in ("opl", "diffusion"):  # run without torch: their saferl_jax side only
    assert planned[name].skipped is None
    assert planned[name].command == ["PY", f"benchmarks/bench_{name}.py", "--quick", "--no-torch"]
    assert any("PyTorch comparison left out" in note for note in planned[name].notes)
  only = run_all.plan(BENCHMARKS, only=["bench_ope.py", "ranking"], skip=["ranking"])
  assert [p.name for p in only if p.command] == ["ope"]


def test_host_description():
  host = run_all.host_description()
  assert {"cpu_model", "cpu_count", "memory_bytes", "gpus", "python", "git_commit", "date"} <= set(host)
  assert host["cpu_count"] == os.cpu_count() and host["python"].startswith("3.")
  assert host["git_commit"] is None or len(host["git_commit"]) == 40
  if sys.platform == "linux":
    assert host["memory_bytes"] > 2**20


def test_jax_description_and_device_name():
  description = run_all.jax_description()  # jax is already imported here; run_all uses a child
  assert description["platform"] == jax.default_backend()
  assert description["device_count"] == len(jax.devices())
  assert description["jax"] == jax.__version__ and description["jaxlib"]
  assert run_all.device_name({"platform": "cpu", "device_kind": "cpu"}) == "cpu"
  assert (run_all.device_name({"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"})
          == "gpu_nvidia_h100_80gb_hbm3")
  assert run_all.device_name({"error": "no jax"}) == "unknown"


FAKE = {  # unknown scripts must get --quick; each writes like timing.write_results
    "bench_good.py": """
        import json, os, sys
        from pathlib import Path
        assert sys.argv[1:] == ["--quick"], sys.argv
        out = Path(os.environ["SAFERL_BENCH_RESULTS"])
        (out / "good_cpu.json").write_text(json.dumps({"speedup": 2.5}))
        (out / "good_cpu.md").write_text("# Good\\n\\n| a |\\n|---|\\n| 1 |\\n")
        print("good done")
        """,
    "bench_bad.py": """
        import sys
        print("bad is about to fail")
        sys.exit(3)
        """,
    "bench_direct.py": """
        from pathlib import Path
        (Path(__file__).parent / "results" / "direct_cpu.md").write_text("direct table\\n")
        """,
    "bench_stray.py": """
        import subprocess, sys
        from pathlib import Path
        stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (Path(__file__).parent / "stray.pid").write_text(str(stray.pid))
        """,
    "bench_slow.py": """
        import time
        print("slow started", flush=True)
        time.sleep(60)
        """,
}


@pytest.fixture
def fake_benchmarks(tmp_path, monkeypatch):
  bench = tmp_path / "benchmarks"
  (bench / "results").mkdir(parents=True)
  for name, text in FAKE.items():
    (bench / name).write_text(textwrap.dedent(text))
  monkeypatch.setitem(run_all.QUICK, "bench_slow", run_all.Quick(timeout_s=0.5))
  monkeypatch.setattr(run_all, "describe_jax_in_child",
                      lambda python: {"platform": "cpu", "device_kind": "cpu", "device_count": 1,
                                      "jax": "0", "jaxlib": "0"})
  return bench


def test_a_failing_benchmark_is_recorded_and_the_others_run(fake_benchmarks, tmp_path, capsys):
  out = tmp_path / "out"
  status = run_all.main(["--bench-dir", str(fake_benchmarks), "--out-dir", str(out)])
  assert status == 1
  report = json.loads((out / "run_all_cpu.json").read_text())
  records = {r["name"]: r for r in report["benchmarks"]}
  assert list(records) == ["bad", "direct", "good", "slow", "stray"]
  assert records["bad"]["status"] == "failed" and records["bad"]["exit_code"] == 3
  assert "about to fail" in records["bad"]["output_tail"]
  assert records["good"]["status"] == "ok" and records["good"]["exit_code"] == 0
  assert records["good"]["results"]["good_cpu"] == {"json": {"speedup": 2.5},
                                                   "md": "# Good\n\n| a |\n|---|\n| 1 |\n"}
  assert records["direct"]["results"] == {"direct_cpu": {"md": "direct table\n"}}
  assert records["slow"]["status"] == "timed out" and records["slow"]["wall_s"] < 10
  assert {"host", "jax", "total_wall_s", "summary"} <= set(report)
  text = (out / "run_all_cpu.md").read_text()
  assert "| bad | failed |" in text and "| good | ok |" in text and "## Good" in text
  assert "bad is about to fail" in capsys.readouterr().out  # streamed as it runs
  stray = int((fake_benchmarks / "stray.pid").read_text())
  assert _ends_within(stray, seconds=5.0)  # killed with its parent (it would sleep for 60 s)


def _running(pid: int) -> bool:
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("State:"):
        return "zombie" not in line and "dead" not in line
  except FileNotFoundError:
    return False
  return True


def _ends_within(pid: int, *, seconds: float) -> bool:
  """Whether the process has ended (or is a zombie) within `seconds`: SIGKILL is delivered
  asynchronously, so on a loaded machine the killed process may still read as sleeping for a few
  milliseconds after killpg returns (seen once in CI)."""
  deadline = time.monotonic() + seconds
  while _running(pid):
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)
  return True


def test_exit_status_is_zero_when_none_failed(fake_benchmarks, tmp_path):
  out = tmp_path / "out"
  assert run_all.main(["--bench-dir", str(fake_benchmarks), "--out-dir", str(out),
                       "--only", "good", "--name", "mine"]) == 0
  report = json.loads((out / "run_all_mine.json").read_text())
  assert [r["status"] for r in report["benchmarks"]] == ["skipped", "skipped", "ok", "skipped",
                                                         "skipped"]

"""Runs every benchmark's quick form, each in its own process, and writes one results file.

    python benchmarks/run_all.py [--obp-python PATH] [--torch-python PATH] [--only ope ranking]
                                 [--skip diffusion] [--timeout SECONDS] [--dry-run]

Discovers benchmarks/bench_*.py and runs each one's quick form (QUICK below: `--quick` or small
sizes; a script not in QUICK runs with `--quick`) in a fresh Python process, one after the other,
with a time limit per benchmark (its whole process group is killed when it runs out, and when it
exits, so that nothing it started holds memory during the next one). Each benchmark writes its
tables through timing.write_results into its own temporary folder (SAFERL_BENCH_RESULTS), so the
full results kept in benchmarks/results are never overwritten; a script that writes into
benchmarks/results itself is collected from there. A failing or timed-out benchmark does not stop
the others.

Writes benchmarks/results/run_all_<device>.json and .md (after every benchmark, so a run cut
short keeps what it measured): the machine (jax's platform, device kind and count, jax and jaxlib
versions, CPU model, cores, memory, GPUs from nvidia-smi, python, git commit, date) and, per
benchmark, the command, its status ("ok", "failed", "timed out" or "skipped"), exit code, wall
seconds, what it left out and why, the end of its output, and its own result tables (json and
markdown). <device> is jax's platform, followed by the device kind where it says more ("cpu",
"gpu_nvidia_h100_80gb_hbm3").

Comparisons that need a side environment: bench_ope's Open Bandit Pipeline columns need
`--obp-python` (a Python with obp; default $OBP_PYTHON) and are left out without it, the run
saying so. bench_opl and bench_diffusion time saferl_jax against PyTorch in one process, so they
run under `--torch-python` (a Python with torch, diffusers and saferl_jax's dependencies; default
$TORCH_PYTHON, else this Python where it has torch); without one they run with `--no-torch` under
this Python, recording their saferl_jax side only, the run saying that the comparison was left out.

The exit status is 1 when any benchmark failed or timed out (skipped ones do not count), else 0.
The parent process never imports JAX (a child describes the devices), so on a GPU it holds no
device memory while the benchmarks run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
RESULTS_ENV = "SAFERL_BENCH_RESULTS"  # read by timing.RESULTS
TAIL_CHARS = 4000  # the end of a benchmark's output kept in the results (failures: 5x)


class Quick(NamedTuple):
  """A benchmark's quick form: its arguments, time limit and side environment."""
  args: tuple[str, ...] = ("--quick",)
  timeout_s: float = 300.0
  needs_torch: bool = False  # compares with PyTorch in its own process; takes --no-torch


# Quick forms of the known benchmarks; sizes chosen so that all of them fit in 10 minutes on one
# GPU machine (16 cores). A script missing here runs with `--quick` and the default time limit.
QUICK = {
    "bench_constrained": Quick(),
    "bench_diffusion": Quick(timeout_s=600.0, needs_torch=True),  # 243 s on 2 busy CPU cores
    "bench_letor": Quick(("--lines", "100000", "--repeats", "1")),
    "bench_obd_loader": Quick(("--rows", "200000", "--repeats", "3")),
    "bench_ope": Quick(),
    "bench_opl": Quick(needs_torch=True),
    "bench_pl_rank": Quick(),
    "bench_ranking": Quick(),
    "bench_streaming": Quick(),
}


class Planned(NamedTuple):
  """One benchmark to run: `command` is None where it is skipped, `skipped` saying why."""
  name: str
  script: str
  command: list[str] | None
  timeout_s: float
  notes: list[str]
  skipped: str | None = None


def plan(bench_dir: Path, *, python: str = sys.executable, obp_python: str | None = None,
         torch_python: str | None = None, only=None, skip=(), timeout_s: float | None = None
         ) -> list[Planned]:
  """The benchmarks in `bench_dir` (every bench_*.py, sorted), each with its quick command.

  Args:
    bench_dir: the folder of the bench_*.py scripts.
    python: the interpreter of the benchmarks that need no side environment.
    obp_python: a Python with Open Bandit Pipeline (bench_ope's OBP columns), or None.
    torch_python: a Python with torch and saferl_jax's dependencies, or None (bench_opl and
      bench_diffusion then run with --no-torch under `python`: their saferl_jax side only).
    only: names (as in "ope" or "bench_ope") to run, or None for all.
    skip: names to leave out.
    timeout_s: one time limit for every benchmark, instead of QUICK's.

  Returns:
    A list of `Planned`, one per bench_*.py script (those left out by `only`/`skip` too, marked
    skipped).

  Example:
    >>> [p.name for p in plan(HERE)][:2]
    ['constrained', 'diffusion']
  """
  wanted = None if only is None else {_short(n) for n in only}
  unwanted = {_short(n) for n in skip}
  planned = []
  bench_dir = Path(bench_dir).resolve()
  for path in sorted(bench_dir.glob("bench_*.py")):
    quick = QUICK.get(path.stem, Quick())
    name, args, notes, skipped = _short(path.stem), list(quick.args), [], None
    interpreter = python
    if path.stem not in QUICK:
      notes.append("not in run_all.QUICK: run with --quick")
    if path.stem == "bench_ope":
      if obp_python:
        args += ["--obp-python", obp_python]
      else:
        notes.append("OBP comparison left out: no --obp-python")
    if quick.needs_torch:
      if torch_python:
        interpreter = torch_python
      else:
        args.append("--no-torch")
        notes.append("PyTorch comparison left out: no --torch-python")
    if (wanted is not None and name not in wanted) or name in unwanted:
      skipped = "left out by --only/--skip"
    script = str(path.relative_to(bench_dir.parent))  # run from the repository's root
    command = None if skipped else [interpreter, script, *args]
    planned.append(Planned(name, path.name, command,
                           quick.timeout_s if timeout_s is None else timeout_s, notes, skipped))
  return planned


def _short(name: str) -> str:
  name = Path(name).stem if name.endswith(".py") else name
  return name.removeprefix("bench_")


def host_description() -> dict:
  """The machine without JAX: CPU model, cores, memory, GPUs (nvidia-smi), python, git, date."""
  description = {"cpu_model": platform.processor() or platform.machine(),
                 "cpu_count": os.cpu_count(),
                 "memory_bytes": None,
                 "gpus": _nvidia_gpus(),
                 "python": platform.python_version(),
                 "os": platform.platform(),
                 "git_commit": _git("rev-parse", "HEAD"),
                 "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
  if hasattr(os, "sched_getaffinity"):
    description["usable_cpu_count"] = len(os.sched_getaffinity(0))
  try:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    if model:
      description["cpu_model"] = model.group(1).strip()
  except OSError:
    pass
  try:
    meminfo = Path("/proc/meminfo").read_text()
    description["memory_bytes"] = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1)) * 1024
  except (OSError, AttributeError):
    try:
      description["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      pass
  return description


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def _nvidia_gpus() -> list[str]:
  if not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def jax_description() -> dict:
  """What JAX sees: platform, device kind and count, versions (imports jax: run it in a child)."""
  import jax
  import jaxlib

  devices = jax.devices()
  description = {"platform": jax.default_backend(), "device_kind": devices[0].device_kind,
                 "device_count": len(devices), "process_count": jax.process_count(),
                 "devices": [str(d) for d in devices[:16]],
                 "jax": jax.__version__, "jaxlib": jaxlib.__version__}
  try:
    stats = devices[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 -- not every backend has memory statistics
    stats = {}
  if "bytes_limit" in stats:
    description["device_memory_bytes"] = stats["bytes_limit"]
  return description


def describe_jax_in_child(python: str) -> dict:
  """jax_description() from a fresh `python` process, or {"error": ...} where that fails."""
  try:
    out = subprocess.run([python, str(Path(__file__).resolve()), "--describe-jax"],
                         capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.SubprocessError) as error:
    return {"error": str(error)}
  if out.returncode != 0:
    return {"error": out.stderr.strip()[-TAIL_CHARS:]}
  return json.loads(out.stdout.splitlines()[-1])


def device_name(jax_part: dict) -> str:
  """The results file's <device>: jax's platform, then the device kind where it says more."""
  platform_name = jax_part.get("platform", "unknown")
  kind = re.sub(r"[^a-z0-9]+", "_", str(jax_part.get("device_kind", "")).lower()).strip("_")
  return platform_name if kind in ("", platform_name) else f"{platform_name}_{kind}"


def run_one(planned: Planned, *, cwd: Path, watch: Path | None = None, echo: bool = True) -> dict:
  """Runs one planned benchmark and returns its record (status, wall seconds, tables, output)."""
  record = {"name": planned.name, "script": planned.script,
            "command": shlex.join(planned.command) if planned.command else None,
            "status": "skipped", "exit_code": None, "wall_s": None, "timeout_s": planned.timeout_s,
            "notes": planned.notes, "skipped": planned.skipped, "results": {}, "output_tail": ""}
  if planned.command is None:
    return record
  before = _snapshot(watch)
  with tempfile.TemporaryDirectory(prefix=f"run_all_{planned.name}_") as tmp:
    # no progress bars (saferl_jax's training driver) in the recorded output
    env = {"SAFERL_JAX_QUIET": "1", **os.environ, RESULTS_ENV: tmp, "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    start = time.perf_counter()
    try:
      process = subprocess.Popen(planned.command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace",
                                 start_new_session=True)
    except OSError as error:  # e.g. a --torch-python that does not exist
      record.update(status="failed", wall_s=time.perf_counter() - start, output_tail=str(error))
      return record

    def read():
      for line in process.stdout:
        lines.append(line)
        if echo:
          print(f"[{planned.name}] {line}", end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
      record["exit_code"] = process.wait(timeout=planned.timeout_s)
      record["status"] = "ok" if record["exit_code"] == 0 else "failed"
      _kill_group(process)  # what it left running (it would hold memory, a GPU's too)
    except subprocess.TimeoutExpired:
      _kill_group(process)
      record["status"] = "timed out"
    except BaseException:  # Ctrl-C or SIGTERM: the benchmark must not run on alone
      _kill_group(process)
      raise
    record["wall_s"] = time.perf_counter() - start
    reader.join(timeout=10)
    for path in sorted(Path(tmp).iterdir()):
      _add_table(record["results"], path)
  if watch is not None:  # a script that wrote into benchmarks/results itself
    for name, _ in sorted(_snapshot(watch).items() - before.items()):
      _add_table(record["results"], watch / name)
  output = "".join(lines)
  keep = TAIL_CHARS * (1 if record["status"] == "ok" else 5)
  record["output_tail"] = output[-keep:]
  return record


def _kill_group(process: subprocess.Popen) -> None:
  """Kills the benchmark's process group: the benchmark and the processes it started."""
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):  # the group is already gone
    if process.poll() is None:
      process.kill()
  process.wait()


def _snapshot(folder: Path | None) -> dict:
  if folder is None or not folder.is_dir():
    return {}
  return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()
          if p.suffix in (".json", ".md") and not p.name.startswith("run_all_")}


def _add_table(tables: dict, path: Path) -> None:
  """Adds one results file to tables[stem]: "json" (parsed) or "md" (text); other files ignored."""
  if path.suffix == ".json":
    try:
      tables.setdefault(path.stem, {})["json"] = json.loads(path.read_text())
    except ValueError as error:
      tables.setdefault(path.stem, {})["json_error"] = str(error)
  elif path.suffix == ".md":
    tables.setdefault(path.stem, {})["md"] = path.read_text()


def markdown(report: dict) -> str:
  """The results file's markdown: the machine, a table of the runs, then each benchmark's tables."""
  host, jx = report["host"], report["jax"]
  memory = f"{host['memory_bytes'] / 2**30:.0f} GiB" if host.get("memory_bytes") else "? GiB"
  if "error" in jx:
    jax_line = f"JAX could not describe its devices: {jx['error'].splitlines()[-1]}"
  else:
    jax_line = (f"jax {jx['jax']}, jaxlib {jx['jaxlib']}: {jx['device_count']} x "
                f"{jx['device_kind']} ({jx['platform']})")
  commit = (host.get("git_commit") or "unknown")[:12] + (" (uncommitted changes)" if host.get(
      "git_dirty") else "")
  lines = ["# Every benchmark's quick form (`benchmarks/run_all.py`)", "",
           f"- Device: {jax_line}.",
           f"- Host: {host['cpu_model']}, {host['cpu_count']} cores, {memory}"
           + (f"; GPUs: {'; '.join(host['gpus'])}" if host.get("gpus") else "") + ".",
           f"- Python {host['python']}, commit {commit}, {host['date']}" + (
               f"; load average {host['load_average'][0]:.1f} at the start."
               if host.get("load_average") else "."),
           f"- Total: {report['total_wall_s']:.0f} s; {report['summary']}.", "",
           "| benchmark | status | wall s | command / why not run |", "|---|---|---|---|"]
  for r in report["benchmarks"]:
    wall = "" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
    what = f"`{r['command']}`" if r["command"] else r["skipped"]
    if r["notes"]:
      what += " (" + "; ".join(r["notes"]) + ")"
    lines.append(f"| {r['name']} | {r['status']} | {wall} | {what} |")
  for r in report["benchmarks"]:
    if r["status"] == "skipped":
      continue
    lines += ["", f"## {r['name']} ({r['script']}): {r['status']}", ""]
    tables = [part["md"] for part in r["results"].values() if "md" in part]
    for text in tables:  # each bench's own headings, two levels down
      lines += [re.sub(r"^(#+) ", r"##\1 ", line) for line in text.rstrip().splitlines()] + [""]
    if r["status"] != "ok" or not tables:
      lines += ["The end of its output:", "", "```",
                *r["output_tail"][-2000:].rstrip().splitlines(), "```"]
  return "\n".join(lines).rstrip() + "\n"


def summary(records: list[dict]) -> str:
  counts = {}
  for r in records:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  return ", ".join(f"{n} {status}" for status, n in counts.items())


def write(report: dict, out_dir: Path, name: str) -> Path:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"run_all_{name}.json").write_text(json.dumps(report, indent=1) + "\n")
  path = out_dir / f"run_all_{name}.md"
  path.write_text(markdown(report))
  return path


def _default_torch_python() -> str | None:
  if os.environ.get("TORCH_PYTHON"):
    return os.environ["TORCH_PYTHON"]
  return sys.executable if importlib.util.find_spec("torch") is not None else None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--obp-python", default=os.environ.get("OBP_PYTHON"),
                      help="a Python with obp, for bench_ope's OBP columns (default $OBP_PYTHON)")
  parser.add_argument("--torch-python", default=_default_torch_python(),
                      help="a Python with torch (and diffusers) for bench_opl and bench_diffusion "
                           "(default $TORCH_PYTHON, else this Python where it has torch; without "
                           "one they run with --no-torch, their saferl_jax side only)")
  parser.add_argument("--only", nargs="+", default=None, help="run only these (e.g. ope ranking)")
  parser.add_argument("--skip", nargs="+", default=(), help="leave these out")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds per benchmark, for all of them (default: QUICK's, 300)")
  parser.add_argument("--out-dir", type=Path, default=HERE / "results")
  parser.add_argument("--name", default=None, help="run_all_<name>.json (default: the device)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
  parser.add_argument("--describe-jax", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.describe_jax:
    print(json.dumps(jax_description()))
    return 0
  planned = plan(args.bench_dir, obp_python=args.obp_python, torch_python=args.torch_python,
                 only=args.only, skip=args.skip, timeout_s=args.timeout)
  if args.dry_run:
    for p in planned:
      print(f"{p.name}: " + (shlex.join(p.command) if p.command else f"skipped ({p.skipped})")
            + "".join(f"; {note}" for note in p.notes))
    return 0
  report = {"host": host_description(), "jax": describe_jax_in_child(sys.executable),
            "benchmarks": [], "total_wall_s": 0.0, "summary": ""}
  name = args.name or device_name(report["jax"])
  print(f"run_all: {len(planned)} benchmarks, results to {args.out_dir}/run_all_{name}.json/md; "
        f"{json.dumps(report['jax'])}", flush=True)
  start = time.perf_counter()
  watch = args.bench_dir / "results"
  path = write(report, args.out_dir, name)
  for p in planned:
    if p.skipped:
      print(f"run_all: {p.name} skipped ({p.skipped})", flush=True)
    else:
      print(f"run_all: {p.name}: {shlex.join(p.command)} (limit {p.timeout_s:.0f} s)"
            + "".join(f"; {note}" for note in p.notes), flush=True)
    record = run_one(p, cwd=args.bench_dir.resolve().parent, watch=watch)
    report["benchmarks"].append(record)
    report["total_wall_s"] = time.perf_counter() - start
    report["summary"] = summary(report["benchmarks"])
    path = write(report, args.out_dir, name)
    if record["status"] != "skipped":
      print(f"run_all: {p.name} {record['status']} in {record['wall_s']:.1f} s", flush=True)
  print(f"run_all: {report['summary']} in {report['total_wall_s']:.0f} s; wrote {path} and .json",
        flush=True)
  return int(any(r["status"] in ("failed", "timed out") for r in report["benchmarks"]))


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # kills the child too
  sys.exit(main())

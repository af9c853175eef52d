"""The accelerator suite: runs a list of presets on the lent GPU under one time budget.

Run on the GPU machine, from the project root, with the bundle of `prepare.py` beside the code
(the device tool: carry [".accelerator"]):

  python3 tools/accelerator/run.py --bundle=.accelerator --out=$OUT [--suite=paper]
      [--budget_minutes=11]

It installs the bundle's wheels into a temporary folder, records the machine (JAX version,
devices), then runs each entry of the suite as `python -m genrec_jax.main` on the bundle's data
(item vectors through `embeddings.source=file`), one process each, so that a failure or a kill
stops only that run. An entry starts only when its expected minutes fit what is left of the
budget, and is killed when the budget runs out. The suite's first entry is a smoke run: when it
fails (an API that differs in this JAX, a missing package), nothing else is started.

Written to --out (at most 8 files, which is what the device tool brings back):
  summary.json: the environment, and per run the command, status (ok | failed | timeout |
    skipped), seconds and the run's results.json (metrics, timing per stage); rewritten after
    every run, so a suite killed from outside still reports the runs it finished;
  NAME.log: the last megabytes of each run's log.

It imports neither JAX nor the library itself: a parent holding the GPU would starve its runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_TAIL_BYTES = 2 * 2**20
MAX_OUTPUT_FILES = 8  # the device tool brings back at most 8 files


@dataclasses.dataclass(frozen=True)
class Run:
  """One entry of a suite: `python -m genrec_jax.main --config=CONFIG` on bundle DATASET.

  minutes: expected wall time on one H200 (start-up and compilation included); the entry
  starts only when it fits the remaining budget. overrides: extra `--config.FIELD=VALUE`
  flags (without the prefix).
  """

  name: str
  config: str
  dataset: str
  minutes: float
  overrides: tuple[str, ...] = ()


# Speed settings of the GPU runs (not the papers' protocol: one length bucket's batches per
# compiled call in their shuffled order, validation users in large batches).
GPU_SPEED = ("grm.steps_per_dispatch=32", "grm.eval_batch_size=2048",
             "sasrec.steps_per_dispatch=32",
             "tokenizer.steps_per_dispatch=50",  # 50 divides the 500-step log periods
             "continual.dact.steps_per_dispatch=50")

SUITES = {
    # Paper settings. The estimates and which presets fit 15 minutes of device time:
    # experiments/benchmarks/README.md (session 9). TIGER's recommender carries a time cap
    # until a GPU run has measured its epochs.
    "paper": (
        Run("smoke", "configs/tiger_toys.py:smoke", "toys", 1.5, GPU_SPEED),
        Run("tiger_toys", "configs/tiger_toys.py", "toys", 6.0,
            GPU_SPEED + ("grm.max_train_minutes=4",)),
        Run("tiger_beauty", "configs/tiger_beauty.py", "beauty", 6.0,
            GPU_SPEED + ("grm.max_train_minutes=4",)),
    ),
    "dact": (
        Run("smoke", "configs/dact_toys.py:smoke", "toys", 2.0, GPU_SPEED),
        Run("dact_toys", "configs/dact_toys.py", "toys", 12.0,
            GPU_SPEED + ("continual.retrain_max_minutes=1",)),  # RT: up to 4 x 200 epochs
    ),
    # The plumbing alone, a few steps per stage (also what the test runs, on synthetic data).
    "smoke": (
        Run("tiger_smoke", "configs/tiger_toys.py:smoke", "toys", 1.5,
            ("grm.steps_per_dispatch=4",)),
    ),
}


def run_command(run: Run, bundle: str, workdir: str, cache_dir: str,
                extra: tuple[str, ...] = ()) -> list[str]:
  """The command line of `run` on the bundle's copy of its dataset."""
  data = os.path.join(bundle, "data", run.dataset)
  fields = (f"data.path={data}/interactions.csv", "data.items_csv=",
            "embeddings.source=file", f"embeddings.file={data}/item_vectors.npy",
            f"compilation_cache_dir={cache_dir}", *run.overrides, *extra)
  return [sys.executable, "-m", "genrec_jax.main", f"--config={run.config}",
          f"--workdir={workdir}", *(f"--config.{f}" for f in fields)]


def install_wheels(bundle: str, site: str) -> list[str]:
  """Installs the bundle's wheels (no dependencies, no index) into `site`; their names."""
  wheels = sorted(glob.glob(os.path.join(bundle, "wheels", "*.whl")))
  if wheels:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", site, *wheels], check=True)
  return [os.path.basename(w) for w in wheels]


ENVIRONMENT_PROBE = """
import json, platform, jax, flax, optax
print(json.dumps({"python": platform.python_version(), "jax": jax.__version__,
                  "flax": flax.__version__, "optax": optax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [str(d.device_kind) for d in jax.devices()]}))
"""


def probe_environment(env: dict) -> dict:
  """Python, JAX and device versions as a child process sees them (or the error)."""
  try:
    out = subprocess.run([sys.executable, "-c", ENVIRONMENT_PROBE], env=env,
                         capture_output=True, text=True, timeout=300)
  except subprocess.TimeoutExpired:
    return {"error": "the JAX probe did not answer within 300 s"}
  if out.returncode != 0:
    return {"error": out.stderr.strip().splitlines()[-1:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def keep_log_tail(src: str, dst: str) -> None:
  with open(src, "rb") as f:
    f.seek(max(0, os.path.getsize(src) - LOG_TAIL_BYTES))
    tail = f.read()
  with open(dst, "wb") as f:
    f.write(tail)


def execute(run: Run, command: list[str], env: dict, log_path: str, timeout_s: float,
            workdir: str) -> dict:
  """Runs one entry; its record for summary.json."""
  start = time.time()
  with open(log_path, "wb") as log:
    try:
      rc = subprocess.run(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout_s).returncode
      status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
      rc, status = None, "timeout"
  results_path = os.path.join(workdir, "results.json")
  results = None
  if status == "ok" and os.path.isfile(results_path):
    with open(results_path) as f:
      results = json.load(f)
  return {"name": run.name, "config": run.config, "command": " ".join(command),
          "status": status, "returncode": rc, "seconds": round(time.time() - start, 1),
          "results": results}


def run_suite(runs: tuple[Run, ...], bundle: str, out: str, budget_minutes: float,
              extra: tuple[str, ...] = ()) -> dict:
  """Runs `runs` in order within `budget_minutes`; writes out/summary.json and the logs."""
  if len(runs) + 1 > MAX_OUTPUT_FILES:
    raise SystemExit(f"error: a suite of {len(runs)} runs writes more than "
                     f"{MAX_OUTPUT_FILES} files; split it")
  if not os.path.isdir(os.path.join(bundle, "data")):
    raise SystemExit(f"error: no bundle at {bundle}: build it with "
                     f"`python tools/accelerator/prepare.py` and carry it to this machine")
  os.makedirs(out, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="genrec_accel_") as scratch:
    return _run_in(scratch, runs, bundle, out, budget_minutes, extra)


def _run_in(scratch: str, runs: tuple[Run, ...], bundle: str, out: str, budget_minutes: float,
            extra: tuple[str, ...]) -> dict:
  """`run_suite` with its wheels, workdirs and compilation cache under `scratch`."""
  start = time.time()
  site = os.path.join(scratch, "site")
  summary = {"bundle": bundle, "budget_minutes": budget_minutes,
             "wheels": install_wheels(bundle, site), "runs": []}
  env = {**os.environ, "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join(filter(None, (site, ROOT, os.environ.get("PYTHONPATH"))))}
  summary["environment"] = probe_environment(env)
  print(f"[accelerator] {json.dumps(summary['environment'])}", flush=True)

  def write_summary():
    summary["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)

  for i, run in enumerate(runs):
    left = budget_minutes * 60 - (time.time() - start)
    if run.minutes * 60 > left:
      summary["runs"].append({"name": run.name, "status": "skipped",
                              "reason": f"expects {run.minutes} min, {left / 60:.1f} left"})
      write_summary()
      continue
    workdir = os.path.join(scratch, run.name)
    command = run_command(run, bundle, workdir, os.path.join(scratch, "xla"), extra)
    print(f"[accelerator] {run.name}: {' '.join(command)}", flush=True)
    log_path = os.path.join(scratch, f"{run.name}.log")
    record = execute(run, command, env, log_path, left, workdir)
    keep_log_tail(log_path, os.path.join(out, f"{run.name}.log"))
    summary["runs"].append(record)
    write_summary()
    print(f"[accelerator] {run.name}: {record['status']} in {record['seconds']} s", flush=True)
    if i == 0 and record["status"] != "ok":
      print(f"[accelerator] the first run failed; nothing else started (see {run.name}.log)",
            flush=True)
      break
  write_summary()
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bundle", default=".accelerator", help="folder built by prepare.py")
  parser.add_argument("--out", default=os.environ.get("OUT", ""),
                      help="output folder (default $OUT)")
  parser.add_argument("--suite", default="paper", choices=sorted(SUITES))
  parser.add_argument("--budget_minutes", type=float, default=11.0,
                      help="wall time for the whole suite (a session has 15 device minutes, "
                           "the machine's start included)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override added to every run (repeatable)")
  args = parser.parse_args()
  if not args.out:
    raise SystemExit("error: give --out or set $OUT (the folder the device tool brings back)")
  bundle = os.path.abspath(args.bundle)
  summary = run_suite(SUITES[args.suite], bundle, os.path.abspath(args.out),
                      args.budget_minutes, tuple(args.set))
  failed = [r["name"] for r in summary["runs"] if r["status"] not in ("ok", "skipped")]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()

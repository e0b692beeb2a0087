"""What the startup hook (hf_fsdp_loadfix.pth) costs every interpreter of the environment.

    pip install matplotlib                     # for the plot
    python benchmarks/startup.py [--runs 40]

Run with the interpreter of an environment that has the package installed. Measures, round-robin over N runs:
the package's own cumulative import time in ``python -X importtime -c pass`` and the modules imported at start,
and the wall time of ``python -c pass``: with the hook, with HF_FSDP_LOADFIX=0, in a fresh venv of the same
base interpreter with nothing installed, and ``import wrapt`` (what a hook that imported wrapt at start, as the
package's first design did, would pay). Exits 1 if the median package import exceeds 10 ms or the hook imports wrapt,
asyncio, inspect, importlib.metadata, packaging or torch at start. Writes benchmarks/results/startup.{json,md,png};
``--from-json`` re-renders the table and plot of an earlier run without measuring.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from importlib import metadata

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LIMIT_MS = 10.0
FORBIDDEN = ["wrapt", "asyncio", "inspect", "importlib.metadata", "packaging", "torch", "transformers"]
HOOK = "with the package (hook active)"
WRAPT = "a hook importing wrapt at start, as `-c 'import wrapt'`"
RENAMED = {"0.1.0's hook (imports wrapt), as `-c 'import wrapt'`": WRAPT}  # the label in earlier JSON


def importtime(python, env, code, module):
    """(``module``'s cumulative ms, total ms of all imports, modules) from one ``-X importtime`` run."""
    err = subprocess.run([python, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True,
                         check=True).stderr
    package, total, modules = 0.0, 0.0, []
    for line in err.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue
        name = fields[2].strip()
        modules.append(name)
        total += int(fields[0]) / 1000
        if name == module:
            package = int(fields[1]) / 1000
    return package, total, modules


def wall(python, env, code):
    start = time.perf_counter()
    subprocess.run([python, "-c", code], env=env, check=True)
    return (time.perf_counter() - start) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--from-json", help="only rewrite the table and plot from an earlier run's JSON")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        for key in ("medians", "runs_ms"):
            result[key] = {RENAMED.get(name, name): v for name, v in result[key].items()}
        return write(result)

    load = os.getloadavg()[0]
    base = {k: v for k, v in os.environ.items() if k != "HF_FSDP_LOADFIX"}
    empty = tempfile.mkdtemp(prefix="startup-venv-")
    venv.EnvBuilder(with_pip=False).create(empty)
    bare = os.path.join(empty, "bin", "python")
    off = {**base, "HF_FSDP_LOADFIX": "0"}
    configs = {  # name: (python, env, code, the hook's module)
        HOOK: (sys.executable, base, "pass", "hf_fsdp_loadfix"),
        "HF_FSDP_LOADFIX=0": (sys.executable, off, "pass", "hf_fsdp_loadfix"),
        "fresh venv, nothing installed": (bare, base, "pass", "hf_fsdp_loadfix"),
        WRAPT: (sys.executable, off, "import wrapt", "wrapt"),
    }
    runs = {name: {"hook_ms": [], "imports_ms": [], "wall_ms": []} for name in configs}
    at_start = {}
    for python, env, code, _ in configs.values():  # warm the .pyc caches
        wall(python, env, code)
    for _ in range(args.runs):
        for name, (python, env, code, module) in configs.items():
            package, total, modules = importtime(python, env, code, module)
            at_start[name] = modules
            runs[name]["hook_ms"].append(round(package, 3))
            runs[name]["imports_ms"].append(round(total, 3))
            runs[name]["wall_ms"].append(round(wall(python, env, code), 3))

    rows = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}
    added = sorted(set(at_start[HOOK]) - set(at_start["HF_FSDP_LOADFIX=0"]))  # what the hook imports
    heavy = [m for m in FORBIDDEN if m in added]
    ok = rows[HOOK]["hook_ms"] <= LIMIT_MS and not heavy
    result = {
        "python": platform.python_version(), "hf_fsdp_loadfix": metadata.version("hf-fsdp-loadfix"),
        "wrapt": metadata.version("wrapt"), "cpus": os.cpu_count(), "load_average": round(load, 1),
        "runs": args.runs, "limit_ms": LIMIT_MS,
        "medians": rows, "runs_ms": runs, "forbidden_at_start": heavy,
        "imported_by_the_hook": added,
        "pass": ok,
    }
    return write(result)


def write(result):
    """startup.{json,md,png} from one run's result; the exit status."""
    rows, added, heavy, ok = (result[k] for k in ("medians", "imported_by_the_hook", "forbidden_at_start", "pass"))
    lines = [
        f"Startup cost, median of {result['runs']} runs each (Python {result['python']}, hf-fsdp-loadfix "
        f"{result['hf_fsdp_loadfix']}, wrapt {result['wrapt']}, {result['cpus']} CPUs at load average "
        f"{result['load_average']}; `python benchmarks/startup.py`)",
        "",
        "| interpreter start | the hook's import (importtime, cumulative) | all imports at start (importtime) "
        "| wall time of `python -c pass` |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['hook_ms']:.2f} ms | {r['imports_ms']:.1f} ms | {r['wall_ms']:.1f} ms |"
              for name, r in rows.items()]
    lines += ["", f"Imported by the hook at start (not imported with HF_FSDP_LOADFIX=0): {', '.join(added)}; "
              f"of {', '.join(FORBIDDEN)}: {', '.join(heavy) or 'none'}.",
              f"{'PASS' if ok else 'FAIL'}: the hook's import costs {rows[HOOK]['hook_ms']:.2f} ms "
              f"(limit {LIMIT_MS:.0f} ms). Wall times include process creation and vary with machine load."]
    text = "\n".join(lines)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "startup.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(RESULTS, "startup.md"), "w") as f:
        f.write(text + "\n")
    plot(result, os.path.join(RESULTS, "startup.png"))
    return 0 if ok else 1


def plot(result, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, names = result["runs_ms"], list(result["runs_ms"])
    ticks = range(1, len(names) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    left.boxplot([runs[n]["hook_ms"] for n in names], orientation="horizontal")
    left.axvline(LIMIT_MS, color="red", linestyle="--", label=f"limit {LIMIT_MS:.0f} ms")
    left.set_xlabel("the hook's import, -X importtime cumulative (ms)")
    left.legend()
    right.boxplot([runs[n]["wall_ms"] for n in names], orientation="horizontal")
    right.set_xlabel("wall time of the interpreter start (ms)")
    left.set_yticks(ticks, names)  # after both boxplots: each resets the shared axis
    left.set_title("the hook's import (wrapt's, for the last row)")
    right.set_title("interpreter start, end to end")
    for ax in (left, right):
        ax.set_xlim(left=0)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"What the startup hook (hf_fsdp_loadfix.pth) costs every interpreter: {result['runs']} runs each, "
                 f"Python {result['python']}, hf-fsdp-loadfix {result['hf_fsdp_loadfix']}, {result['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())

"""Run many `mergekit-yaml` / `mergekit-moe` command lines in ONE child process (the conformance suite).

    python -m tests.merge.mergekit_cli_batch JOBS.json RESULTS.json

JOBS.json is a list of `{"tool": "mergekit-yaml" | "mergekit-moe", "args": [...]}`. Each job calls the
console script's own click command (`mergekit.scripts.run_yaml:main`, `mergekit.scripts.moe:main`, the
entry points of the installed wheel) with those arguments, exactly as the shell would, minus the 6 s of
interpreter start-up and imports per run. RESULTS.json gets `{"ok": bool, "error": str}` per job.
"""

from __future__ import annotations

import json
import sys
import traceback
from importlib.metadata import entry_points


def _command(tool: str):
    (entry,) = [e for e in entry_points(group="console_scripts", name=tool) if e.value.startswith("mergekit")]
    return entry.load()


def run_jobs(jobs: list[dict]) -> list[dict]:
    results = []
    for job in jobs:
        command = _command(job["tool"])
        try:
            command.main(job["args"], prog_name=job["tool"], standalone_mode=False)
            results.append({"ok": True, "error": ""})
        except SystemExit as exc:  # click's usage errors
            results.append({"ok": exc.code in (0, None), "error": f"exit {exc.code}"})
        except Exception as exc:  # noqa: BLE001 - a refused recipe is a result, not a crash of the batch
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            results.append({"ok": False, "error": last[:2000]})
    return results


def main(argv: list[str]) -> None:
    jobs_path, results_path = argv
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    results = run_jobs(jobs)
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1:])

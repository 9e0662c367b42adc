#!/usr/bin/env python
"""Run the README's main-job table: `run_apet.py` with its defaults for each method, and write the results file.

    python examples/main_job_results.py                      # all four runs (about 20 CPU-minutes on 2 cores)
    python examples/main_job_results.py --methods delta lora # a subset (rows of other methods are kept)

Each run is a separate `python examples/run_apet.py --method M --output_dir DIR` process (default settings: MiniLM,
Rotten Tomatoes, 3 epochs, batch 32, seed 42, the method's default learning rate). The script collects each run's
`results.json` into `examples/results/main_job.json` (every field, plus the date and the torch version) and writes
`examples/results/main_job.md`, the table that README.md shows (and puts it into README between its table markers);
`tests/test_readme_claims.py` checks that README, the table and the JSON agree. `--table_only` rewrites the table and
README from the JSON without running anything.
Times are wall-clock and CPU seconds of training on whatever machine runs this (shared machines make them noisy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apet_models import PORTABLE_NAMES  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
README = HERE.parent / "README.md"
# README's main-job table sits between these two lines; `update_readme` replaces what is between them.
TABLE_START, TABLE_END = "<!-- main_job table: examples/results/main_job.md -->", "<!-- end of main_job table -->"
METHODS = ("delta", "lora", "bitfit", "full")
LABELS = {
    "delta": "APET discrete delta (default)",
    "lora": "LoRA r=8, α=16, query/value",
    "bitfit": "BitFit",
    "full": "full fine-tuning",
}


def run_one(method: str, output_root: Path) -> dict:
    """Train and evaluate one method in a fresh process; return its `results.json` (shapes: plain numbers)."""
    output_dir = output_root / method
    command = [sys.executable, str(HERE / "run_apet.py"), "--output_dir", str(output_dir)]
    if method != "delta":
        command += ["--method", method]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    with open(output_dir / "results.json") as handle:
        result = json.load(handle)
    # Every run uses the default `minilm` alias: record its Hub id, not this machine's path to the packaged weights
    # (run_apet.py records the Hub id itself since 2026-11-29; runs started before had the path).
    result["model"] = PORTABLE_NAMES["minilm"]
    return result


def trainable_cell(result: dict) -> str:
    """`adapter + head` for PEFT runs, the total for full fine-tuning (numbers with thousands separators)."""
    if result["method"] == "full":
        return f"{result['trainable_params']:,}"
    return f"{result['trainable_adapter_params']:,} + {result['trainable_head_params']:,}"


def table(runs: dict[str, dict]) -> str:
    """The Markdown table of README's main job (accuracy and macro-F1 to 3 decimals, times in whole seconds)."""
    lines = ["| method | trainable (adapter + head) | test accuracy | test macro-F1 | train time (wall / CPU) |",
             "|---|---|---|---|---|"]
    for method in METHODS:
        if method not in runs:
            continue
        r = runs[method]
        lines.append(f"| {LABELS[method]} | {trainable_cell(r)} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} "
                     f"| {r['train_time_s']:.0f} s / {r['train_cpu_time_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def update_readme(table_text: str, readme: Path = README) -> None:
    """Put `table_text` between README's table markers (the rest of README is left as it is)."""
    text = readme.read_text()
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not (start and end):
        raise ValueError(f"{readme} has no {TABLE_START!r} ... {TABLE_END!r} markers")
    readme.write_text(f"{head}{TABLE_START}\n{table_text}{TABLE_END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Which runs to redo.")
    parser.add_argument("--output_root", default="outputs/main_job_table", help="Where the runs' folders go.")
    parser.add_argument("--results_dir", default=str(RESULTS_DIR), help="Where main_job.json/.md are written.")
    parser.add_argument("--table_only", action="store_true",
                        help="Run nothing: rewrite main_job.md and README's table from main_job.json.")
    args = parser.parse_args(argv)

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "main_job.json"
    stored = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}}
    if args.table_only:
        for run in stored["runs"].values():
            run["model"] = PORTABLE_NAMES["minilm"]  # see run_one
        json_path.write_text(json.dumps(stored, indent=2) + "\n")
        (results_dir / "main_job.md").write_text(table(stored["runs"]))
        update_readme(table(stored["runs"]))
        return
    for method in args.methods:
        result = run_one(method, Path(args.output_root))
        result["date"] = datetime.date.today().isoformat()
        result["torch_version"] = torch.__version__
        result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
        stored["runs"][method] = result
        # Written after every run, so that a stopped sweep keeps what finished.
        json_path.write_text(json.dumps(stored, indent=2) + "\n")
        (results_dir / "main_job.md").write_text(table(stored["runs"]))
        if results_dir == RESULTS_DIR:
            update_readme(table(stored["runs"]))
    print(f"wrote {json_path}, {results_dir / 'main_job.md'} and README's table")


if __name__ == "__main__":
    main()

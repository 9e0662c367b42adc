"""Does the example script's built-in lr search pick a good learning rate? (issue 16, part 2)

`examples/run_apet.py --lr_search auto` trains five candidate lrs for a quarter of the run's steps each, from the
same start, and trains the run at the one with the best validation accuracy. It is the default for masked LoRA and
adapter parts, whose fixed default (3e-4) suits only unmasked ones; their candidates run from that default up two
decades (3e-4 ... 3e-2). For a sparse delta (fixed default 5e-3) the search is opt-in (`--lr_search auto`: 5e-4 ...
5e-2); two delta settings measure whether it should be the default there too.
Per setting (model, task, masked part) this script runs the script three times, in-process, same seed:
- `default`: no search, the method's fixed default lr;
- `quarter`: the search as shipped (`--lr_search auto`, fraction 0.25);
- `half`: the same with `--lr_search_fraction 0.5`;
- `full`: the same candidates each trained for the whole run (`--lr_search_fraction 1`): the validation curve of
  complete runs, against which the shorter searches' picks are judged (regret: best full-length validation accuracy
  minus the full-length validation accuracy at the lr the shorter search picked).

    nice python -m benchmarks.lr_search --threads 1                    # writes benchmarks/results/lr_search/
    python -m benchmarks.lr_search --settings minilm-rotten_tomatoes-lora-discrete20000   # some settings only
    python -m benchmarks.lr_search --smoke --out DIR                    # MiniLM, a few dozen examples, 2 steps
    python -m benchmarks.lr_search --report-only                        # rebuild results.md / the figure

Every finished invocation is appended to `<out>/runs.jsonl` at once; a rerun skips those found there (read before
each run, so two processes may share the work with `--settings`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import append_record, load_records
from examples import run_apet

MODES = ("default", "quarter", "half", "full")
SEARCH_FRACTIONS = {"quarter": 0.25, "half": 0.5, "full": 1.0}


@dataclass(frozen=True)
class Setting:
    model: str  # run_apet's --model_name_or_path (an offline alias)
    task: str
    method: str
    mask: str
    budget: int
    train: int  # examples of each split the run uses
    validation: int
    test: int
    batch_size: int = 32
    epochs: float = 1.0
    max_steps: int | None = None  # smoke runs

    @property
    def key(self) -> str:
        return f"{self.model}-{self.task}-{self.method}-{self.mask}{self.budget}"

    def arguments(self, mode: str, out: str) -> list[str]:
        """run_apet's command line for one mode."""
        args = ["--model_name_or_path", self.model, "--dataset_name", self.task, "--method", self.method, "--mask",
                self.mask, "--num_trainable_params", str(self.budget), "--max_train_samples", str(self.train),
                "--max_eval_samples", str(self.validation), "--max_predict_samples", str(self.test),
                "--per_device_train_batch_size", str(self.batch_size), "--num_train_epochs", str(self.epochs),
                "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", out]
        if self.max_steps:
            args += ["--max_steps", str(self.max_steps)]
        if mode == "default":
            return args + ["--learning_rate", str(run_apet.METHOD_LEARNING_RATES[self.method])]
        return args + ["--lr_search", "auto", "--lr_search_fraction", str(SEARCH_FRACTIONS[mode])]


ENCODER = dict(train=2000, validation=500, test=1000)
DECODER = dict(train=512, validation=200, test=200, batch_size=16)  # SmolLM2: generation is scored, 5x the cost
SETTINGS = (
    Setting("minilm", "rotten_tomatoes", "lora", "discrete", 20_000, **ENCODER),
    Setting("minilm", "fine_food", "lora", "discrete", 20_000, **ENCODER),
    Setting("minilm", "rotten_tomatoes", "adapter", "adjacent", 20_000, **ENCODER),
    Setting("minilm", "fine_food", "adapter", "adjacent", 20_000, **ENCODER),
    # sparse deltas have a fixed default (5e-3, the main job's); does a search help them, at small and large k?
    Setting("minilm", "rotten_tomatoes", "delta", "discrete", 20_000, **ENCODER),
    Setting("minilm", "rotten_tomatoes", "delta", "discrete", 400_000, **ENCODER),
    Setting("smollm2", "rotten_tomatoes", "lora", "discrete", 20_000, **DECODER),
    Setting("smollm2", "fine_food", "lora", "discrete", 20_000, **DECODER),
)
SMOKE = (Setting("minilm", "rotten_tomatoes", "lora", "discrete", 1000, train=16, validation=8, test=8,
                 batch_size=8, max_steps=2),)


def run(setting: Setting, mode: str) -> dict:
    """One invocation of the example script; its results.json fields that this comparison reads."""
    with tempfile.TemporaryDirectory() as out:
        results = run_apet.main(setting.arguments(mode, out))
    kept = ("learning_rate", "lr_search", "eval_accuracy", "test_accuracy", "train_loss", "train_steps",
            "train_time_s", "train_cpu_time_s", "trainable_adapter_params")
    return {"setting": setting.key, "mode": mode, **{k: results.get(k) for k in kept}, "finished": harness.now()}


def summarise(setting: Setting, records: list[dict]) -> dict | None:
    """The modes of one setting side by side, with the shorter searches' regrets on the full-length curve."""
    by_mode = {r["mode"]: r for r in records if r["setting"] == setting.key}
    if not by_mode:
        return None
    row = {"setting": setting.key, "default_lr": run_apet.METHOD_LEARNING_RATES[setting.method], "modes": by_mode,
           "regret": {}}
    if "full" in by_mode:
        curve = {c["learning_rate"]: c["validation_accuracy"] for c in by_mode["full"]["lr_search"]["candidates"]}
        for mode in ("quarter", "half"):
            if mode in by_mode:
                row["regret"][mode] = max(curve.values()) - curve[by_mode[mode]["learning_rate"]]
    return row


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| setting | mode | lr | validation % | test % | validation % per candidate lr | train CPU s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for mode in MODES:
            r = row["modes"].get(mode)
            if r is None:
                lines.append(f"| {row['setting']} | {mode} | not run | | | | |")
                continue
            curve = ("–" if not r["lr_search"] else ", ".join(
                f"{c['learning_rate']:g}: {_pct(c['validation_accuracy'])}" for c in r["lr_search"]["candidates"]))
            lines.append(f"| {row['setting']} | {mode} | {r['learning_rate']:g} | {_pct(r['eval_accuracy'])} | "
                         f"{_pct(r['test_accuracy'])} | {curve} | {r['train_cpu_time_s']} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, stamp_line: str) -> None:
    plt = harness.pyplot()
    rows = [r for r in rows if any(m in r["modes"] for m in SEARCH_FRACTIONS)]
    if not rows:
        return
    cols = min(3, len(rows))
    fig, axes = plt.subplots(math.ceil(len(rows) / cols), cols, figsize=(4.2 * cols, 3.2 * math.ceil(len(rows) / cols)),
                             squeeze=False)
    for ax, row in zip(axes.flat, rows):
        for mode, style in (("full", "o-"), ("half", "^-."), ("quarter", "s--")):
            r = row["modes"].get(mode)
            if r:
                cands = r["lr_search"]["candidates"]
                ax.plot([c["learning_rate"] for c in cands], [100 * c["validation_accuracy"] for c in cands], style,
                        label=f"{mode} ({cands[0]['steps']} steps each), picked {r['learning_rate']:g}")
        ax.axvline(row["default_lr"], color="grey", lw=0.8, ls=":", label=f"method default {row['default_lr']:g}")
        ax.set_xscale("log")
        ax.set(title=row["setting"], xlabel="learning rate", ylabel="validation accuracy %")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    harness.save_figure(fig, path, stamp_line)


def write_report(out: Path, settings: tuple[Setting, ...], command: str, records: list[dict]) -> None:
    rows = [row for s in settings if (row := summarise(s, records))]
    missing = [f"{s.key}/{m}" for s in settings for m in MODES
               if not any(r["setting"] == s.key and r["mode"] == m for r in records)]
    meta = {"command": command, "written": harness.now(), "machine": harness.machine(),
            "settings": [s.__dict__ for s in settings], "missing": missing}
    harness.write_json(out / "results.json", {"meta": meta, "summary": rows}, end="\n")
    figure(rows, out / "lr_search.png", harness.stamp(meta["written"], command))
    regrets = [f"{r['setting']}: " + ", ".join(f"{mode} {100 * v:.1f} points" for mode, v in r["regret"].items())
               for r in rows if r["regret"]]
    (out / "results.md").write_text(
        "# The example script's lr search (`--lr_search auto`)\n\n"
        f"`{command}`, written {meta['written']}; {harness.machine_line()}. Each setting: "
        "`examples/run_apet.py` with the method's fixed default lr (`default`), with the shipped search (`quarter`: "
        "5 candidates, a quarter of the run's steps each), with half the steps (`half`) and with every candidate "
        "trained for the whole run (`full`); a mode not run for a setting is listed as such. One seed (42); "
        "validation and test are the script's splits cut to the counts in results.json.\n\n"
        + table(rows) + "\n\n![validation accuracy vs lr](lr_search.png)\n\n"
        + "Regret of the shorter searches (best full-length validation accuracy minus the full-length validation "
          "accuracy at the shorter search's pick): " + ("; ".join(regrets) or "none measured yet") + ".\n\n"
        + (f"Not run: {', '.join(missing)}.\n" if missing else "Every planned run finished.\n"))


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "lr_search", smoke="MiniLM, a few dozen examples, 2 steps",
                               report_only="rebuild results.json / results.md / the figure from runs.jsonl",
                               threads=1)
    parser.add_argument("--settings", nargs="+", help="run only these settings (keys as in results.md)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else SETTINGS
    if args.settings:
        unknown = set(args.settings) - {s.key for s in settings}
        if unknown:
            parser.error(f"--settings: unknown {sorted(unknown)}; known: {[s.key for s in settings]}")
    out = args.out or harness.results_folder("lr_search")
    command = harness.start("lr_search", argv, out, args.threads)
    path = out / "runs.jsonl"
    if not args.report_only:
        log = harness.logger(out / "sweep.log")
        for setting in settings:
            if args.settings and setting.key not in args.settings:
                continue
            for mode in MODES:
                # read before every run: another process may be running other settings into the same file
                if any(r["setting"] == setting.key and r["mode"] == mode for r in load_records(path)):
                    continue
                record = run(setting, mode)
                append_record(path, record)
                log(f"{setting.key} {mode}: lr {record['learning_rate']:g}, validation {record['eval_accuracy']:.3f}, "
                    f"test {record['test_accuracy']:.3f}, {record['train_cpu_time_s']} CPU s")
    write_report(out, settings, command, load_records(path))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

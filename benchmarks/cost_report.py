"""The analysis and report of `benchmarks.cost`: medians and ratios per method, the issue's targets (met or
missed), `results.md`, `results.csv`, `results.json` and the step-ratio plot.

Every ratio is to PEFT LoRA (`REFERENCE`, r=8 on all linear layers) of the same model and run. The report needs
the `(out, in)` shapes of each model's targeted linear layers (`shapes`, keyed by model name), which `cost.py`
reads from the models it measured.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import harness

REFERENCE = "peft-lora"  # every ratio is to this method (r=8 on all linear layers) of the same model and run
Shapes = dict[str, list[tuple[int, int]]]


# ---------------------------------------------------------------------------------------------- analysis
def med(values) -> float | None:
    return statistics.median(values) if values else None


def summarise(run: dict, shapes: list[tuple[int, int]]) -> list[dict]:
    """One row per method: medians over rounds, ratios to the reference PEFT LoRA and to LoRA/SHiRA at the same k
    (the rank whose count over the run model's targeted `shapes` is nearest k)."""
    by: dict[str, list[dict]] = {}
    for r in run["records"]:
        by.setdefault(r["method"], []).append(r)
    rows = []
    for key, recs in by.items():
        ok = [r for r in recs if "error" not in r]
        if not ok:
            rows.append({"model": run["model"], "method": key, "family": recs[0]["family"], "error": recs[0]["error"]})
            continue
        r0 = ok[0]
        steps = [s for r in ok for s in r["step_s"]]
        row = {"model": run["model"], "method": key, "family": r0["family"], "k": r0["k"], "r": r0["r"],
               "trainable": r0["trainable"], "expected_trainable": r0["expected_trainable"],
               "step_ms": med(steps) * 1e3, "steps_measured": len(steps),
               "peak_mib": med([r["peak_rss_delta"] for r in ok]) / 2**20,
               "state_bytes": r0["state_bytes"]["total"], "param_tensors": r0["state_bytes"]["param_tensors"],
               "file_bytes": r0.get("file_bytes"), "payload_bytes": r0.get("payload_bytes"),
               "inject_s": med([r["inject_s"] for r in ok])}
        if "cuda_peak_allocated_delta" in r0:
            row["cuda_alloc_mib"] = med([r["cuda_peak_allocated_delta"] for r in ok]) / 2**20
            row["cuda_reserved_mib"] = med([r["cuda_peak_reserved_delta"] for r in ok]) / 2**20
        row["file_bytes_per_param"] = row["file_bytes"] / row["trainable"] if row["file_bytes"] else None
        row["payload_bytes_per_param"] = row["payload_bytes"] / row["trainable"] if row["payload_bytes"] else None
        row["state_bytes_per_param"] = row["state_bytes"] / row["trainable"]
        merged = [s for r in ok for s in r.get("infer_merged_s", [])]
        based = [s for r in ok for s in r.get("infer_base_s", [])]
        row["merged_infer_ratio"] = med(merged) / med(based) if merged and based else None
        rows.append(row)
    ref = next((r for r in rows if r["method"] == REFERENCE and "error" not in r), None)
    by_key = {r["method"]: r for r in rows}
    for row in rows:
        if "error" in row:
            continue
        if ref:
            row["step_ratio"] = row["step_ms"] / ref["step_ms"]
            row["peak_ratio"] = row["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else None
            row["state_ratio"] = row["state_bytes"] / ref["state_bytes"]
            row["file_ratio"] = row["file_bytes"] / ref["file_bytes"] if row["file_bytes"] else None
        if row["family"] in ("apet-discrete", "apet-adjacent") and row["k"] is not None:
            r, _ = harness.nearest_rank(sum(o + i for o, i in shapes), row["k"])
            lora = by_key.get(REFERENCE if r == 8 else f"peft-lora@r={r}")
            shira = by_key.get(f"shira@r={r}")
            for name, other in (("lora_k", lora), ("shira_k", shira)):
                if other and "error" not in other:
                    row[f"vs_{name}"] = other["method"]
                    row[f"step_vs_{name}"] = row["step_ms"] / other["step_ms"]
                    row[f"peak_vs_{name}"] = row["peak_mib"] / other["peak_mib"] if other["peak_mib"] > 0 else None
            if row["family"] == "apet-adjacent":
                disc = by_key.get(f"apet-discrete@k={row['k']}")
                if disc and "error" not in disc:
                    row["step_vs_discrete"] = row["step_ms"] / disc["step_ms"]
    return rows


def check_targets(runs: list[dict], rows: dict[str, list[dict]], masks: dict) -> list[dict]:
    """Each target of the issue: met or missed, with the measured value."""
    out = []

    def add(target: str, model: str, value: float | None, limit: float, note: str = "", lower: bool = True):
        if value is None:
            return
        met = value <= limit if lower else value >= limit
        out.append({"target": target, "model": model, "value": value, "limit": limit, "met": met, "note": note})

    for run in runs:
        model = run["model"]
        rs = {r["method"]: r for r in rows[f"{run['what']}:{model}"] if "error" not in r}
        ref = rs.get(REFERENCE)
        if ref and "apet-lora" in rs:
            add("APET lora step time / PEFT LoRA <= 1.02", model, rs["apet-lora"]["step_ratio"], 1.02)
            add("APET lora peak memory / PEFT LoRA within 2%", model, abs(rs["apet-lora"]["peak_ratio"] - 1), 0.02,
                note=f"ratio {rs['apet-lora']['peak_ratio']:.3f}")
        for r in rs.values():
            if r["family"] == "apet-discrete":
                for name in ("lora_k", "shira_k"):
                    if r.get(f"step_vs_{name}") is not None:
                        add(f"APET discrete step time / {r[f'vs_{name}']} <= 1.0", f"{model} k={r['k']}",
                            r[f"step_vs_{name}"], 1.0)
                if r.get("peak_vs_shira_k") is not None:
                    add("APET discrete peak memory < SHiRA", f"{model} k={r['k']}", r["peak_vs_shira_k"], 1.0,
                        note=f"vs {r['vs_shira_k']} ({rs[r['vs_shira_k']]['trainable']} entries)")
                excess = r["state_bytes"] - 16 * r["trainable"]
                add("APET discrete trainable state = 16 B x k (+4 B AdamW step counter per tensor)",
                    f"{model} k={r['k']}", abs(excess - 4 * r["param_tensors"]), 0,
                    note=f"{r['state_bytes']} B for k={r['trainable']}, {r['param_tensors']} tensors")
            if r["family"] == "apet-adjacent" and r.get("step_vs_discrete") is not None:
                add("APET adjacent step time / discrete <= 1.0", f"{model} k={r['k']}", r["step_vs_discrete"], 1.0)
            if r["family"] in ("apet-adjacent", "apet-discrete") and r.get("file_bytes_per_param"):
                limit = 4.1 if r["family"] == "apet-adjacent" else 6.0
                add(f"{r['family']} adapter file <= {limit} B/param", f"{model} k={r['k']}",
                    r["file_bytes_per_param"], limit, note=f"payload alone {r['payload_bytes_per_param']:.2f} B/param")
            if r.get("merged_infer_ratio") is not None:
                add("merged inference / base <= 1.01", f"{model} {r['method']}", r["merged_infer_ratio"], 1.01)
    for mask in ("discrete", "adjacent"):
        if mask in masks:
            add(f"mask construction ({mask}), every linear layer, k={masks['k']} <= 2 s", masks["model"],
                med(masks[mask]["build_mask_s"]), 2.0, note=f"whole injection {med(masks[mask]['inject_s']):.2f} s")
    return out


# ---------------------------------------------------------------------------------------------- report
def _f(value, fmt: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def markdown(meta: dict, runs: list[dict], rows: dict[str, list[dict]], masks: dict, targets: list[dict],
             shapes: Shapes) -> str:
    m = meta["machine"]
    lines = ["# Cost of APET against full fine-tuning, PEFT LoRA, SHiRA and prompt tuning", "",
             f"- date: {meta['date']}",
             f"- machine: {m['cpu']}, {m['cores']} usable cores, torch threads {m['torch_threads']}, "
             f"{m['platform']}, load average at start {_f(m['load_average'])}",
             f"- versions: torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"peft-apet {m['peft_apet']}, Python {m['python']}",
             f"- device: {meta['device']}" + (f" ({m['cuda']})" if m["cuda"] else ""),
             f"- command: `{meta['command']}`", f"- wall time: {meta['wall_s'] / 60:.1f} min", "",
             "Ratios are to PEFT LoRA (r=8, lora_alpha=8, every linear layer of attention and MLP) measured in the "
             "same run on the same model, batch and sequence length. Step = forward + backward + AdamW step + "
             "zero_grad, median over all measured steps of all rounds (methods interleaved, one warm-up step per "
             "round). Peak memory is the peak RSS during injection and steps above the RSS just before injection "
             "(CPU; it includes activations). Trainable state = parameters + gradients + AdamW state. "
             "`file B/p` = adapter_model.safetensors bytes per trainable parameter (`payload` leaves out the "
             "safetensors JSON header). Merged = inference time after merge_and_unload over a fresh base model's, "
             "alternated. `vs LoRA@k` / `vs SHiRA@k`: step-time ratio to PEFT LoRA / SHiRA at the rank whose count "
             "is nearest k (`r`, count in their rows).", ""]
    for run in runs:
        spec = run["spec"]
        key = f"{run['what']}:{run['model']}"
        params = sum(o * i for o, i in shapes[run["model"]])
        title = "grid" if run["what"] == "grid" else "memory check: SHiRA vs APET at equal k, all linear layers"
        lines += [f"## {run['model']} — {title}", "",
                  f"{spec['kind']}: hidden {spec['hidden']}, {spec['layers']} layers, intermediate "
                  f"{spec['intermediate']}, vocab {spec['vocab']}; batch {spec['batch']} x sequence {spec['seq']}; "
                  f"targeted linear weights: {params / 1e6:.1f}M entries. Rounds {run['run']['rounds']}, "
                  f"measured steps per round {run['run']['measured']}.", ""]
        lines += [f"- {n}" for n in run["notes"]]
        lines += ["| method | r | trainable | step ms | step ratio | vs LoRA@k | vs SHiRA@k | peak MiB | peak ratio "
                  "| state bytes | state B/p | file bytes | file B/p | payload B/p | merged/base |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows[key]:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error'][:80]} |" + " |" * 13)
                continue
            lines.append(
                f"| {r['method']} | {_f(r['r'])} | {r['trainable']:,} | {r['step_ms']:.0f} | {_f(r.get('step_ratio'))} "
                f"| {_f(r.get('step_vs_lora_k'))} | {_f(r.get('step_vs_shira_k'))} | {r['peak_mib']:.0f} "
                f"| {_f(r.get('peak_ratio'))} | {r['state_bytes']:,} | {r['state_bytes_per_param']:.2f} "
                f"| {_f(r['file_bytes'])} | {_f(r['file_bytes_per_param'])} | {_f(r['payload_bytes_per_param'])} "
                f"| {_f(r['merged_infer_ratio'], '.3f')} |")
        lines.append("")
    if masks:
        lines += [f"## Mask construction ({masks['model']}, {masks['layers']} linear layers, k = {masks['k']:,})", "",
                  "| mask | build_mask s (median) | whole get_peft_model s (median) |", "|---|---|---|"]
        for mask in ("discrete", "adjacent"):
            lines.append(f"| {mask} | {med(masks[mask]['build_mask_s']):.3f} | {med(masks[mask]['inject_s']):.3f} |")
        lines.append("")
    lines += ["## Targets", "", "| target | where | measured | limit | met | note |", "|---|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['model']} | {t['value']:.3f} | {t['limit']} | "
                     f"{'met' if t['met'] else '**missed**'} | {t['note']} |")
    missed = [t for t in targets if not t["met"]]
    lines += ["", f"{len(targets) - len(missed)} of {len(targets)} target checks met."]
    if meta.get("discussion"):
        lines += ["", "## Discussion", "", meta["discussion"]]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, list[dict]], path: Path, stamp: str) -> Path | None:
    """Step time over PEFT LoRA's against trainable parameters, a panel per grid run (None without matplotlib)."""
    try:
        plt = harness.pyplot()
    except ImportError:
        return None
    grids = [(k, v) for k, v in rows.items() if k.startswith("grid:")]
    if not grids:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 4), squeeze=False)
    for ax, (key, rs) in zip(axes[0], grids):
        ok = [r for r in rs if "error" not in r]
        for family, style in (("apet-discrete", "o-"), ("apet-adjacent", "s-")):
            pts = sorted((r["trainable"], r["step_ratio"]) for r in ok if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), style, label=family)
        for family, style in (("peft-lora", "^"), ("shira", "v")):
            pts = sorted((r["trainable"], r["step_ratio"]) for r in ok if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), style, label=family, markersize=8)
        for r in ok:
            if r["family"] in ("apet-lora", "apet-adapter", "apet-bitfit", "apet-prompt", "peft-prompt", "full"):
                ax.plot(r["trainable"], r["step_ratio"], "x", color="grey")
                ax.annotate(r["family"], (r["trainable"], r["step_ratio"]), fontsize=6)
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("step time / PEFT LoRA r=8")
        ax.set_title(key.split(":", 1)[1])
        ax.legend(fontsize=7)
    return harness.save_figure(fig, path, stamp, bottom=0.05)


CSV_COLUMNS = ["model", "method", "family", "k", "r", "trainable", "expected_trainable", "step_ms", "step_ratio",
               "step_vs_lora_k", "step_vs_shira_k", "step_vs_discrete", "peak_mib", "peak_ratio", "state_bytes",
               "state_bytes_per_param", "file_bytes", "file_bytes_per_param", "payload_bytes_per_param",
               "merged_infer_ratio", "inject_s", "steps_measured", "error"]


def write_outputs(out: Path, meta: dict, runs: list[dict], masks: dict, shapes: Shapes) -> dict:
    """Write results.json, results.csv, results.md and step_ratio_vs_k.png to `out`; returns the summary rows (per
    `what:model`) and the target checks."""
    rows = {f"{run['what']}:{run['model']}": summarise(run, shapes[run["model"]]) for run in runs}
    targets = check_targets(runs, rows, masks)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "results.json", {"meta": meta, "runs": runs, "mask_construction": masks,
                                              "summary": rows, "targets": targets})
    harness.write_csv(out / "results.csv", [row for rs in rows.values() for row in rs], CSV_COLUMNS)
    (out / "results.md").write_text(markdown(meta, runs, rows, masks, targets, shapes))
    stamp = harness.stamp(meta["date"], meta["command"], cores=meta["machine"]["cores"])
    plot(rows, out / "step_ratio_vs_k.png", stamp)
    return {"rows": rows, "targets": targets}

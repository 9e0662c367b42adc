"""Time every route of a discrete delta on this CPU and fit the cost constants of `peft_apet.routes`.

    python -m benchmarks.route_calibration --threads 1     # default grid (~5 min of one core), the constants
    python -m benchmarks.route_calibration --smoke --out /tmp/x   # two tiny shapes (the test)

For each layer shape `(out, in)`, token count and density of the grid, a sorted discrete mask of `k` entries is
drawn and each route of `peft_apet.routes` is timed on random fp32 data (the minimum of 3-10 runs after a warm-up,
index arrays built beforehand, as `functional.layout_of` keeps them): the forward product `x W~^T` and the input
gradient `g W~` by `gather`, `csr_strided`, `csr_contiguous`, `composed` (building `W + W~` only: the matmul with
it replaces the frozen layer's own), `patched` (adding the k values into `W` in place and writing its k entries
back, likewise without the matmul) and `dense_delta` (the side path's `W~` and its matmul), and the value
gradients by `gather`, `sampled_csr` and `dense`. Gathers are skipped where `tokens * k` exceeds 2·10⁷ (there they
are 10-1000x slower than the best route, measured once by hand). The constants of each route are fitted by
non-negative least squares on the relative error, over the features of `routes.features`.

Writes `results.json` (every timing), `constants.json` (the fitted `COSTS`, to copy into `routes.py`) and
`results.md` (fit error per route; per layer the model's routes against 0.1.0's fixed rules; at each point the
route the model picks against the fastest measured one). `--report-only` refits and rewrites these from
`results.json`.
"""

from __future__ import annotations

import json
import math
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import nnls

from benchmarks import harness
from peft_apet import routes
from peft_apet.functional import _composed, _delta_dense, _effective_weight
from peft_apet.masks import discrete_mask
from peft_apet.sparse_kernels import SparseLayout, add_g_w, add_x_wt, values_grad

SHAPES = [(768, 768), (3072, 768), (768, 3072), (128, 896), (256, 1024)]
TOKENS = [64, 512, 2048]
DENSITIES = [1e-4, 1e-3, 1 / 64, 1 / 16, 1 / 8]
SMOKE = {"shapes": [(32, 48), (64, 16)], "tokens": [4, 16], "densities": [0.05, 0.2]}
MAX_GATHER_WORK = 20_000_000  # tokens * k above which gathers are not timed


def best_of(fn, runs: int = 3, most: int = 10, budget: float = 0.05) -> float:
    """Seconds: the fastest of at least `runs` calls of `fn` after one warm-up call, and of up to `most` while
    they take less than `budget` seconds in all (short routes are timed more often: the machine is shared)."""
    fn()
    best, spent, n = float("inf"), 0.0, 0
    while n < runs or (n < most and spent < budget):
        t = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t
        best, spent, n = min(best, elapsed), spent + elapsed, n + 1
    return best


def time_point(out_f: int, in_f: int, tokens: int, density: float) -> dict:
    """Seconds of every route at one point (`None` where skipped), keyed as in `routes.COSTS`; gradient-side
    product routes get the suffix ` (grad_x)`."""
    k = max(1, round(density * out_f * in_f))
    gen = torch.Generator().manual_seed(0)
    layout = SparseLayout(discrete_mask((out_f, in_f), k, seed=1).long().sort().values, (out_f, in_f))
    layout.csr, layout.transposed, layout.rows, layout.cols  # noqa: B018 - kept per mask at run time
    w, v = torch.randn(out_f, in_f, generator=gen), torch.randn(k, generator=gen)
    x, g = torch.randn(tokens, in_f, generator=gen), torch.randn(tokens, out_f, generator=gen)
    y, gx = torch.zeros(tokens, out_f), torch.zeros(tokens, in_f)
    small = tokens * k <= MAX_GATHER_WORK
    times = {"matmul": best_of(lambda: F.linear(x, w)), "composed": best_of(lambda: _composed(w, layout, v)),
             "patched": best_of(lambda: _patch_and_restore(w, layout, v)),
             "dense_delta": best_of(lambda: y.add_(F.linear(x, _delta_dense(layout, v, x.dtype)))),
             "dense_delta (grad_x)": best_of(lambda: gx.add_(g @ _delta_dense(layout, v, g.dtype)))}
    for route in ("gather", "csr_strided", "csr_contiguous"):
        run = route != "gather" or small
        times[route] = best_of(lambda r=route: add_x_wt(y, x, layout, v, r)) if run else None
        times[f"{route} (grad_x)"] = best_of(lambda r=route: add_g_w(gx, g, layout, v, r)) if run else None
    for route in ("gather", "sampled_csr", "dense"):
        run = route != "gather" or small
        times[f"values {route}"] = best_of(lambda r=route: values_grad(g, x, layout, r)) if run else None
    return {"out": out_f, "in": in_f, "tokens": tokens, "density": density, "k": k, "seconds": times}


def _patch_and_restore(w: torch.Tensor, layout: SparseLayout, v: torch.Tensor) -> None:
    with _effective_weight(w, layout, v, "patched"):
        pass


def _rows(records: list[dict], route: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and seconds of every timing of `route` (both directions of a product route)."""
    feats, secs = [], []
    for rec in records:
        case = routes.Case(rec["out"], rec["in"], rec["tokens"], rec["k"])
        for key, transposed in ((route, False), (f"{route} (grad_x)", True)):
            s = rec["seconds"].get(key)
            if s is None and key == f"{route} (grad_x)" and route in routes.WEIGHT_ROUTES:
                s = rec["seconds"][route]  # one W + W~ serves both directions
            if s is not None:
                feats.append(routes.features(route, case, transposed))
                secs.append(s)
    return np.array(feats, dtype=float), np.array(secs, dtype=float)


def fit(records: list[dict]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Non-negative constants per route minimising the relative error; and the median relative error of each."""
    constants, errors = {}, {}
    for route in routes.COSTS:
        a, s = _rows(records, route)
        coef, _ = nnls(a / s[:, None], np.ones(len(s)))
        constants[route] = [float(c) for c in coef]
        errors[route] = float(np.median(np.abs(a @ coef / s - 1)))
    return constants, errors


def fixed_rules(out_f: int, in_f: int, tokens: int, k: int) -> routes.Routes:
    """The routes peft-apet 0.1.0 took on CPU in fp32 for one sorted mask, by its fixed rules (kept here only to
    compare): CSR products for `width <= k <= numel / 16` (strided up to `2 (out + in)` entries, else through
    contiguous copies), otherwise gathers while `8 tokens k <= numel`, else a composed `W + W~`; value gradients
    from a dense `g^T x` from density 1/8, else sampled CSR where the products were CSR, else gathers."""
    numel = out_f * in_f
    csr = max(out_f, in_f) <= k <= numel // 16
    if csr:
        product = "csr_strided" if k <= 2 * (out_f + in_f) else "csr_contiguous"
    else:
        product = "gather" if 8 * tokens * k <= numel else "composed"
    return routes.Routes(product, product, "dense" if k >= numel / 8 else "sampled_csr" if csr else "gather")


_KEYS = {"forward": lambda r: r, "grad_x": lambda r: r if r in routes.WEIGHT_ROUTES else f"{r} (grad_x)",
         "values": lambda r: f"values {r}"}


def choices(records: list[dict], constants: dict[str, list[float]]) -> list[dict]:
    """At each point and for each of forward, input gradient and value gradients: the model's pick (all routes
    available, not the side path), the fastest measured route, and 0.1.0's fixed rules' route, with their times."""
    saved = dict(routes.COSTS)
    routes.COSTS.update({r: tuple(c) for r, c in constants.items()})
    routes.cheapest.cache_clear()  # its picks were priced with the old constants
    try:
        rows = []
        for rec in records:
            case = routes.Case(rec["out"], rec["in"], rec["tokens"], rec["k"], csr_products=True, csr_values=True,
                               patchable=True)
            picked, fixed = routes.cheapest(case), fixed_rules(rec["out"], rec["in"], rec["tokens"], rec["k"])
            for what, key in _KEYS.items():
                candidates = routes.VALUES_ROUTES if what == "values" else [
                    r for r in routes.PRODUCT_ROUTES if r != "dense_delta"]
                measured = {r: rec["seconds"][key(r)] for r in candidates if rec["seconds"].get(key(r)) is not None}
                fastest, pick, old = min(measured, key=measured.get), getattr(picked, what), getattr(fixed, what)
                rows.append({"out": rec["out"], "in": rec["in"], "tokens": rec["tokens"], "density": rec["density"],
                             "what": what, "picked": pick, "fastest": fastest, "fixed_rules": old,
                             "picked_s": measured.get(pick, math.nan), "fastest_s": measured[fastest],
                             "fixed_rules_s": measured.get(old, math.nan),
                             "over_fastest": measured.get(pick, math.nan) / measured[fastest]})
        return rows
    finally:
        routes.COSTS.clear()
        routes.COSTS.update(saved)
        routes.cheapest.cache_clear()


def report(meta: dict, errors: dict[str, float], rows: list[dict]) -> str:
    lines = [f"# Route calibration ({meta['date']})", "", f"Command: `{meta['command']}`; {meta['machine_line']}; "
             f"{meta['wall_s']:.0f} s.", "", "| route | median relative error of the fit |", "|---|---|"]
    lines += [f"| {r} | {e:.2f} |" for r, e in errors.items()]
    hits = sum(r["picked"] == r["fastest"] for r in rows)
    worst = max(rows, key=lambda r: r["over_fastest"] if r["over_fastest"] == r["over_fastest"] else math.inf)
    picked, fastest = sum(r["picked_s"] for r in rows), sum(r["fastest_s"] for r in rows)
    lines += ["", f"The model picks the fastest measured route in {hits} of {len(rows)} choices; its picks take "
              f"{picked:.3f} s in all against {fastest:.3f} s for the fastest routes ({picked / fastest:.3f}×), and "
              f"its worst pick {worst['over_fastest']:.2f}× the fastest's time ({worst['picked_s'] * 1e3:.2f} against "
              f"{worst['fastest_s'] * 1e3:.2f} ms: {worst['out']} × {worst['in']}, {worst['tokens']} tokens, density "
              f"{worst['density']:.4g}, {worst['what']}).", "",
              "## Per layer: the model's routes against 0.1.0's fixed rules", "",
              "Forward product, input gradient and value gradients of one layer, summed (ms; `composed` and "
              "`patched` count building `W + W~` once per direction; nan: a route not timed there). 0.1.0's sampled "
              "CSR ran in one pass over the tokens, timed here in the blocks of this version, so its column is a "
              "lower bound.", "",
              "| out × in | tokens | density | 0.1.0's routes | ms | the model's routes | ms | model / 0.1.0 |",
              "|---|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 3):
        point = rows[i:i + 3]
        old, new = (sum(r[f"{w}_s"] for r in point) * 1e3 for w in ("fixed_rules", "picked"))
        r = point[0]
        lines.append(f"| {r['out']} × {r['in']} | {r['tokens']} | {r['density']:.4g} | "
                     f"{', '.join(p['fixed_rules'] for p in point)} | {old:.2f} | "
                     f"{', '.join(p['picked'] for p in point)} | {new:.2f} | {new / old:.2f} |")
    lines += ["", "## Every choice", "", "| out × in | tokens | density | what | picked | fastest | picked / fastest |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['out']} × {r['in']} | {r['tokens']} | {r['density']:.4g} | {r['what']} | {r['picked']} | "
              f"{r['fastest']} | {r['over_fastest']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict, records: list[dict]) -> None:
    """Fit the constants to `records` and write results.json, constants.json and results.md into `out`."""
    constants, errors = fit(records)
    rows = choices(records, constants)
    harness.write_json(out / "results.json", {"meta": meta, "records": records, "choices": rows}, end="\n")
    harness.write_json(out / "constants.json", {"meta": meta, "costs": constants, "median_relative_error": errors},
                       end="\n")
    (out / "results.md").write_text(report(meta, errors, rows))


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "route_calibration", smoke="two tiny shapes (the test)", threads=1,
                               report_only="refit and rewrite the reports from the timings in results.json")
    args = parser.parse_args(argv)
    out = args.out or harness.results_folder("route_calibration")
    if args.report_only:
        stored = json.loads((out / "results.json").read_text())
        write_results(out, stored["meta"], stored["records"])
        return 0
    command = harness.start("route_calibration", argv, out, args.threads)
    grid = SMOKE if args.smoke else {"shapes": SHAPES, "tokens": TOKENS, "densities": DENSITIES}
    log = harness.logger(out / "run.log", append=False)
    start = time.perf_counter()
    records = []
    for (out_f, in_f), tokens, density in product(grid["shapes"], grid["tokens"], grid["densities"]):
        records.append(time_point(out_f, in_f, tokens, density))
        log(f"{out_f}x{in_f} tokens {tokens} density {density:.4g}: "
            + ", ".join(f"{r} {s * 1e3:.2f}" for r, s in records[-1]["seconds"].items() if s is not None) + " ms")
    meta = {"date": harness.now(), "command": command, "machine": harness.machine(),
            "machine_line": harness.machine_line(), "threads": args.threads, "wall_s": time.perf_counter() - start}
    write_results(out, meta, records)
    log(f"done in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

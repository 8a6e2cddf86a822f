"""One table of a `run.py compare --json FILE` run: servekit next to its peers, cell by cell.

    python benchmarks/ratios.py /tmp/servekit-bench/compare.json

Per cell: each server's median req/s (p50 / p99 ms) over its valid rounds, the raw in-process rate with JSON, and
the medians of the per-round ratios of servekit's req/s to each peer's (both sides of a ratio come from the same
round). Then the memory of each server (front end and worker RSS) and issue 7's targets. Standard library only.

A `benchmarks/peers.py` run (MLServer, KServe, Ray Serve, BentoML next to servekit's two routes and TorchServe;
`"kind": "peers"` in the JSON) is printed one row per server and route, one column per cell, with where each peer's
semantics differ under the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

NAMES = {"servekit": "servekit", "torchserve": "TorchServe", "litserve": "LitServe", "floor": "floor"}
# the rows of a peers.py table: each server's route and, where it differs, how it batches
LABELS = {
    "servekit": "servekit `/predictions`",
    "servekit-v2": "servekit `/v2` (JSON)",
    "torchserve": "TorchServe",
    "mlserver": "MLServer (v2, adaptive batching)",
    "kserve": "KServe Python server (v1, no batching)",
    "kserve-v2": "KServe Python server (v2, no batching)",
    "ray": "Ray Serve (`@serve.batch`)",
    "bentoml": "BentoML (batchable API)",
    "litserve": "LitServe",
    "floor": "floor (FastAPI, no model)",
}


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def server_cell(d: dict[str, Any]) -> str:
    m = d["median"]
    if m["rps"] is None:
        return "FAILED" if any("failed" in r for r in d["runs"]) else "-"
    out = f"{m['rps']:.0f} ({_f(m['p50_ms'], '.2f')} / {_f(m['p99_ms'], '.1f')})"
    if d["n_valid"] < d["n_runs"]:
        out += f" [{d['n_valid']}/{d['n_runs']} valid]"
    if any(r.get("noisy") for r in d["runs"]):
        out += " noisy"
    return out


def ratio_cell(x: dict[str, Any] | None) -> str:
    if not x or x["median"] is None:
        return "-"
    per = x["per_round"]
    return f"x{x['median']:.2f}" + (f" ({', '.join(f'{v:.2f}' for v in per)})" if len(per) > 1 else "")


def _mm(x: dict[str, float] | None) -> str:
    if not x:
        return "-"
    return f"{x['median']:.0f}" + (f" (max {x['max']:.0f})" if x["max"] - x["median"] >= 1 else "")


def targets(rep: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 7's targets (as in ../shared/bench/README.md) and, with servekit's v2 route in the run, issue 16's
    first: (name, value, passed)."""
    cells, out = rep["cells"], []

    def ratio(cell: str, name: str, need: float) -> None:
        e = cells.get(cell)
        x = (e or {}).get("ratios", {}).get(name)
        if not x or x["median"] is None:
            return
        invalid = e["servers"]["servekit"]["n_valid"] < e["servers"]["servekit"]["n_runs"]
        value = f"x{x['median']:.2f} (need >= {need}; {len(x['per_round'])} round(s))"
        out.append((f"{cell} {name}", value, x["median"] >= need and not invalid))

    def latency(cell: str, key: str, need: float) -> None:
        d = cells.get(cell, {}).get("servers", {}).get("servekit")
        if d and d["median"][key] is not None:
            ok = d["median"][key] < need and d["n_valid"] == d["n_runs"]
            out.append((f"{cell} servekit {key[:3]}", f"{d['median'][key]:.2f} ms (need < {need})", ok))

    ratio("w1:b8:c64", "servekit/torchserve", 1.3)
    ratio("w1:b8:c64", "servekit/floor", 0.9)
    latency("w1:b8:c1", "p50_ms", 1.0)
    latency("w1:b8:c1", "p99_ms", 3.0)
    ratio("w2:b8:c64", "servekit/torchserve", 1.5)
    ratio("w2:b8:c64", "servekit/raw+json", 0.8)
    v2 = cells.get("w1:b8:c64", {}).get("ratios", {}).get("servekit/servekit-v2")
    if v2 and v2["per_round"]:  # issue 16, item 1: v2 (JSON) at 0.8x /predictions or better
        inv = statistics.median(1 / x for x in v2["per_round"])
        out.append(
            ("w1:b8:c64 servekit-v2/servekit", f"x{inv:.2f} (need >= 0.8; {len(v2['per_round'])} round(s))", inv >= 0.8)
        )
    fe = [m["frontend_rss_bytes"]["max"] for m in rep["memory"].get("servekit", {}).values() if m["frontend_rss_bytes"]]
    if fe:
        out.append(("servekit front end RSS", f"max {max(fe) / 1e6:.0f} MB (need < 150)", max(fe) < 150e6))
    return out


def render(rep: dict[str, Any]) -> str:
    servers = rep["servers"]
    subj = rep["subject"]
    peers = [s for s in servers if s != subj]
    ratio_names = [f"{subj}/{s}" for s in peers]
    if any("raw_json_samples_per_s" in e for e in rep["cells"].values()):
        ratio_names.append(f"{subj}/raw+json")
    st = rep["settings"]
    lines = [
        f"{NAMES.get(subj, subj)} vs {', '.join(NAMES.get(s, s) for s in peers)}: {st['repeats']} round(s), "
        f"{st['duration_s']} s per cell, servers alternating; batch delay {st['batch_delay_ms']} ms, "
        f"{st['threads']} torch thread(s), {st['format']}" + ("" if rep.get("complete") else " (INCOMPLETE)"),
        "Per server: median req/s (p50 / p99 ms); ratios: median of the per-round req/s ratios (per round).",
        "",
        "| cell | "
        + " | ".join(NAMES.get(s, s) for s in servers)
        + " | raw+json/s | "
        + " | ".join(n.replace("torchserve", "TorchServe").replace("litserve", "LitServe") for n in ratio_names)
        + " |",
        "|---" * (len(servers) + 2 + len(ratio_names)) + "|",
    ]
    for e in rep["cells"].values():
        raw = e.get("raw_json_samples_per_s")
        row = [f"{e['workload'].upper()} c{e['concurrency']} (b{e['batch']})"]
        row += [server_cell(e["servers"][s]) for s in servers]
        row.append(f"{raw['median']:.0f}" if raw and raw["median"] is not None else "-")
        row += [ratio_cell(e["ratios"].get(n)) for n in ratio_names]
        lines.append("| " + " | ".join(row) + " |")
    lines += tail(rep)
    return "\n".join(lines)


def tail(rep: dict[str, Any]) -> list[str]:
    """Memory, targets, failures: the lines under either table."""
    lines: list[str] = []
    st = rep["settings"]
    subj = rep["subject"]
    if rep["memory"]:
        lines += ["", "Memory after each start's last cell, RSS MiB, median over starts (max if higher):", ""]
        lines += [
            "| server | workload | front end | workers (count) | each worker process, last start | whole tree |",
            "|---" * 6 + "|",
        ]
        for s, byw in rep["memory"].items():
            for w, m in byw.items():
                each = " + ".join(
                    f"{p['rss_mib']:.0f}" for p in m.get("procs_last_start") or [] if p["role"] == "worker"
                )
                name = NAMES.get(s, LABELS.get(s, s))
                lines.append(
                    f"| {name} | {w} | {_mm(m['frontend_rss_mib'])} | {_mm(m['workers_rss_mib'])} "
                    f"({_mm(m['nworkers'])}) | {each or '-'} | {_mm(m['tree_rss_mib'])} |"
                )
    tg = targets(rep) if subj == "servekit" else []
    if tg:
        verdict = st["repeats"] >= 3
        lines += ["", "Targets (issues 7, 16)" + ("" if verdict else ": fewer than 3 rounds, not a verdict") + ":"]
        lines += [f"- {'PASS' if ok else 'FAIL'} {n}: {v}" for n, v, ok in tg]
    for f in rep.get("failures", []):
        lines.append(f"FAILED: {f['server']} {f['workload']} b{f['batch']} round {f['round']}: {f['error'][:300]}")
    if rep.get("error"):
        lines.append(f"ERROR: {rep['error'][:600]}")
    return lines


def render_peers(rep: dict[str, Any]) -> str:
    """A peers.py run: one row per server route, per cell its median req/s (p50 / p99) and servekit's ratio."""
    servers, subj, st = rep["servers"], rep["subject"], rep["settings"]
    same = rep.get("same_start", {})
    cells = rep["cells"]
    names = {s: LABELS.get(s, s) for s in servers}
    lines = [
        f"{names.get(subj, subj)} vs {len(servers) - 1} other routes: {st['repeats']} round(s), {st['duration_s']} s "
        f"per cell, servers alternating; batch 8 / {st['batch_delay_ms']} ms where the server batches, 1 worker, "
        f"{st['threads']} torch thread(s), {st['format']}" + ("" if rep.get("complete") else " (INCOMPLETE)"),
        f"Per cell: median req/s (p50 / p99 ms) over the valid rounds; x: median of the per-round ratios of "
        f"{names.get(subj, subj)}'s req/s to this row's (same round); v2 rows also against servekit `/v2` (JSON).",
        "",
    ]
    head = ["server (route)"]
    for e in cells.values():
        head += [f"{e['workload'].upper()} c{e['concurrency']}", f"{subj}/this"]
    head.append("tree RSS MiB (" + " / ".join(w.upper() for w in dict.fromkeys(e["workload"] for e in cells.values())))
    head[-1] += ")"
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    workloads = list(dict.fromkeys(e["workload"] for e in cells.values()))
    for s in servers:
        row = [names[s]]
        for e in cells.values():
            row.append(server_cell(e["servers"][s]))
            if s == subj:
                row.append("-")
                continue
            r = ratio_cell(e["ratios"].get(f"{subj}/{s}"))
            v2 = e["ratios"].get(f"servekit-v2/{s}")
            if v2 and v2["median"] is not None:
                r += f"; v2 x{v2['median']:.2f}"
            row.append(r)
        if s in same:
            row.append("(same server)")
        else:
            mem = rep["memory"].get(s, {})
            row.append(" / ".join(_mm(mem[w]["tree_rss_mib"]) if w in mem else "-" for w in workloads))
        lines.append("| " + " | ".join(row) + " |")
    if any("raw_json_samples_per_s" in e for e in cells.values()):
        row = ["in-process model + JSON (no HTTP), samples/s"]
        for e in cells.values():
            raw = e.get("raw_json_samples_per_s")
            row += [f"{raw['median']:.0f}" if raw and raw["median"] is not None else "-"]
            row += [ratio_cell(e["ratios"].get(f"{subj}/raw+json"))]
        lines.append("| " + " | ".join(row) + " | - |")
    notes = rep.get("notes") or {}
    if notes:
        lines += ["", "Where the semantics differ:"]
        lines += [f"- {names.get(s, s)}: {n}" for s, n in notes.items()]
    vers = {k: v for k, v in (rep.get("versions") or {}).items() if k not in ("python", "torch", "wrk")}
    if vers:
        sk = rep.get("servekit") or {}
        commit = sk.get("project_commit")
        if commit:
            vers["servekit"] = (
                f"{vers.get('servekit', 'servekit')} ({commit[:10]}{', dirty' if sk.get('project_dirty') else ''})"
            )
        lines += ["", "Versions: " + "; ".join(vers.values()) + f"; Python {rep['versions'].get('python')}"]
    lines += tail(rep)
    return "\n".join(lines)


def table(rep: dict[str, Any]) -> str:
    """The table of either kind of run: run.sh's (`run.py compare`) or peers.py's."""
    return render_peers(rep) if rep.get("kind") == "peers" else render(rep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json_file", help="the file `run.py compare --json` wrote")
    args = ap.parse_args()
    try:
        with open(args.json_file) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"ERROR: cannot read {args.json_file}: {e}")
    if not rep.get("cells"):
        sys.exit(f"ERROR: nothing was measured ({rep.get('error') or 'no cells'})")
    print(table(rep))


if __name__ == "__main__":
    main()

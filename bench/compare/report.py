#!/usr/bin/env python3
"""Reads runs.tsv (round, target, json file, load average before, proxy CPU seconds, upstream
CPU seconds, "busy share of CPU 0, CPU 1[, steal share of CPU 0, CPU 1]") and the
loadgen JSON files; prints the markdown table of compare.sh to stdout.

The ratio columns are the acceptance's figure, the median over the rounds of the ratio measured
in each round (the target against HAProxy in the same round); the ratio of the medians follows
in brackets."""
import json, statistics, sys

rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
names = dict(a.split("=", 1) for a in sys.argv[2:])
order, runs = [], {}
for rnd, target, path, load, cpu, upcpu, busy in rows:
    r = json.load(open(path))
    if target not in runs:
        order.append(target)
        runs[target] = []
    r["_upcpu"] = float(upcpu)
    shares = [float(x) for x in busy.split()]
    r["_busy"] = shares[:2]
    r["_steal"] = shares[2:4] if len(shares) >= 4 else [float("nan")] * 2
    runs[target].append((int(rnd), r, load, float(cpu)))

def med(xs):
    return statistics.median(xs) if xs else float("nan")

summary = {}
for t in order:
    rs = [r for _, r, _, _ in runs[t]]
    bad = sum(r["non_2xx"] + r["errors"] for r in rs)
    summary[t] = {
        "rps": med([r["requests_per_s"] for r in rs]),
        "p50": med([r["latency_ms"]["p50"] for r in rs]),
        "p99": med([r["latency_ms"]["p99"] for r in rs]),
        "non2xx": sum(r["non_2xx"] for r in rs),
        "errors": sum(r["errors"] for r in rs),
        "bad": bad,
        "all": [r["requests_per_s"] for r in rs],
        "cpu": med([cpu / r["elapsed_s"] for _, r, _, cpu in runs[t]]),
        # CPU time of the process under test per answered request, in microseconds: what a
        # request costs the proxy, whatever limited the rate (the client's core included).
        "us": med([cpu / r["requests"] * 1e6 for _, r, _, cpu in runs[t] if r["requests"]]),
        "us_by_round": {rnd: cpu / r["requests"] * 1e6 for rnd, r, _, cpu in runs[t] if r["requests"]},
        "lg": med([r["loadgen_cpu_share"] or 0 for r in rs]),
        "up": med([r["_upcpu"] / r["elapsed_s"] for r in rs]),
        "b0": med([r["_busy"][0] for r in rs]),
        "b1": med([r["_busy"][1] for r in rs]),
        "s0": med([r["_steal"][0] for r in rs]),
        "s1": med([r["_steal"][1] for r in rs]),
        "by_round": {rnd: r["requests_per_s"] for rnd, r, _, _ in runs[t]},
    }


def ratio(t, base):
    """(median of the per-round ratios, ratio of the medians) of target t against target base."""
    if base not in summary:
        return None
    mine, theirs = summary[t]["by_round"], summary[base]["by_round"]
    per_round = [mine[r] / theirs[r] for r in mine if theirs.get(r)]
    summary[t]["vs_" + base] = per_round
    return med(per_round), summary[t]["rps"] / summary[base]["rps"]

def cpu_ratio(t, base):
    """Median over the rounds of base's CPU per request over t's (above 1: t costs less)."""
    if base not in summary:
        return None
    mine, theirs = summary[t]["us_by_round"], summary[base]["us_by_round"]
    per_round = [theirs[r] / mine[r] for r in mine if theirs.get(r) and mine[r]]
    summary[t]["cpu_vs_" + base] = per_round
    return med(per_round)


def share(x):
    return "-" if x != x else f"{x:.1%}"


def ratio_cell(t, base):
    r = ratio(t, base)
    return f"{r[0]:.2f}x ({r[1]:.2f}x)" if r else "-"


out = []
out.append("| target | median req/s | p50 ms | p99 ms | vs HAProxy plain | vs HAProxy jwt_verify | non-2xx (errors) | req/s per round | CPU: proxy / upstream / loadgen | proxy CPU per request | CPU 0 / CPU 1 busy | CPU 0 / CPU 1 steal |")
out.append("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | --- | --- |")
for t in order:
    s = summary[t]
    broken = " **BROKEN**" if s["bad"] else ""
    per = " / ".join(f"{x:,.0f}" for x in s["all"])
    out.append(f"| ({t}) {names.get(t, t)}{broken} | {s['rps']:,.0f} | {s['p50']:.3f} | {s['p99']:.3f} | {ratio_cell(t, 'c')} | {ratio_cell(t, 'd')} | "
               f"{s['non2xx']} ({s['errors']}) | {per} | {s['cpu']:.0%} / {s['up']:.0%} / {s['lg']:.0%} | {s['us']:.1f} µs | {s['b0']:.0%} / {s['b1']:.0%} | {share(s['s0'])} / {share(s['s1'])} |")
out.append("")
out.append("Ratios: the median over the rounds of the ratio measured in each round, against HAProxy in the same round "
           "(the acceptance's figure); in brackets, the ratio of the median req/s. (j) is HAProxy plain made to send the "
           "upstream the forwarding headers and request id that portcullis sends (DESIGN.md) and to return the request id: "
           "(e) / (j) compares the same work, (e) / (c) is the acceptance's figure. Median and per round:")
out.append("")
for t, base in (("e", "c"), ("e", "j"), ("f", "d"), ("g", "d")):
    if t in summary and base in summary:
        m = ratio(t, base)[0]
        out.append(f"- ({t}) / ({base}): {m:.2f}x; " + " / ".join(f"{x:.2f}x" for x in summary[t]["vs_" + base]))
out.append("")
out.append("CPU per request against HAProxy in the same round (HAProxy's µs per request over portcullis's; "
           "above 1: portcullis spends less CPU on a request), median and per round:")
out.append("")
for t, base in (("e", "c"), ("e", "j"), ("f", "d"), ("g", "d")):
    if t in summary and base in summary:
        m = cpu_ratio(t, base)
        out.append(f"- ({t}) / ({base}): {m:.2f}x; " + " / ".join(f"{x:.2f}x" for x in summary[t]["cpu_vs_" + base]))
out.append("")
out.append("Load average (1/5/15 min) before each run:")
out.append("")
out.append("| round | " + " | ".join(f"({t})" for t in order) + " |")
out.append("| --- | " + " | ".join("---" for _ in order) + " |")
rounds = sorted({rnd for t in order for rnd, *_ in runs[t]})
for rnd in rounds:
    cells = []
    for t in order:
        ls = [load for r_, _, load, _ in runs[t] if r_ == rnd]
        cells.append(ls[0] if ls else "")
    out.append(f"| {rnd} | " + " | ".join(cells) + " |")
print("\n".join(out))
json.dump(summary, open(sys.argv[1] + ".summary.json", "w"), indent=1)

"""The HTML page of ``rlfr inspect`` (``rlfr.recipes.inspect_flow``): self-contained (inline CSS, no script, no
external resource), every piece of model and data text escaped; and the one-line summary of the separation of
correct and wrong rollouts that the command prints.

- ``render_html(rollouts, result)``: the page from the rollout records and the ``InspectResult``;
- ``separation_line(stats)``: the flow's and the log-prob's AUROC, pooled and within problems, on one line;
- ``within_text(w)``: '0.540 [0.450, 0.620] over 70 problems' from a ``GroupMean.to_dict``.
"""

from __future__ import annotations

import html
import json

from rlfr.eval.results import FlowTokenStats, InspectResult


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def within_text(w: dict | None) -> str:
    """'0.540 [0.450, 0.620] over 70 problems' from a ``GroupMean.to_dict``."""
    if not w or w["mean"] is None:
        return "n/a (no problem with both classes)"
    ci = "" if w["lo"] is None else f" [{w['lo']:.3f}, {w['hi']:.3f}]"
    return f"{w['mean']:.3f}{ci} over {w['groups']} problem{'s' if w['groups'] != 1 else ''}"


def separation_line(stats: FlowTokenStats) -> str:
    """One line: the flow's and the log-prob's AUROC, pooled and within problems."""
    return (f"flow AUROC pooled {_f(stats.auroc)}, within problems {within_text(stats.auroc_within)}; "
            f"mean log-prob AUROC pooled {_f(stats.logp_auroc)}, within {within_text(stats.logp_auroc_within)}")  # fmt: skip


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
pre,.resp{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:13px}
.tok{background:var(--r);border-radius:2px}
#by-dev:checked ~ main .tok{background:var(--d)}
.roll{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ok{color:#1a7f37}.bad{color:#cf222e}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
"""


def _color(v: float, scale: float, diverging: bool = True) -> str:
    a = min(1.0, abs(v) / scale) * 0.75 if scale > 0 else 0.0
    if not diverging:  # deviation: white -> orange
        return f"rgba(230,120,0,{a:.3f})"
    return f"rgba(0,160,60,{a:.3f})" if v > 0 else f"rgba(220,30,30,{a:.3f})"


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return (
            f"{v:.4g}"
            if isinstance(v, float)
            else ("n/a" if v is None else _e(repr(v) if isinstance(v, str) else v))
        )

    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def separation_html(stats: FlowTokenStats) -> list[str]:
    """The separation table (flow and log-prob AUROC, pooled and within problems), the length correlation and the
    repeatability table; nothing for what the statistics lack."""
    out = ["<h2>Separation of correct and wrong rollouts</h2>",
           "<p>GRPO compares the rollouts of one problem only: the AUROC <i>within problems</i> (per problem with both "
           "correct and wrong rollouts, averaged; 95 % bootstrap interval over problems) is the signal that can shape "
           "RL. The pooled AUROC also credits telling easy problems from hard ones. The mean token log-prob is the "
           "baseline.</p>",
           "<table><tr><th>score</th><th>pooled</th><th>within problems</th></tr>",
           f"<tr><td>flow (-mean deviation)</td><td>{_e(_f(stats.auroc))}</td><td>{_e(within_text(stats.auroc_within))}</td></tr>"]  # fmt: skip
    if stats.logp_auroc_within is not None:
        out.append(f"<tr><td>mean token log-prob</td><td>{_e(_f(stats.logp_auroc))}</td>"
                   f"<td>{_e(within_text(stats.logp_auroc_within))}</td></tr>")  # fmt: skip
    out.append("</table>")
    if (lc := stats.length_corr) is not None:
        w = lc["within"]
        within = "n/a" if w["mean"] is None else f"{w['mean']:+.2f} over {w['groups']} problems"
        out.append(f"<p>Correlation of the mean deviation with the response length: pooled {_e(_f(lc['pooled'], '{:+.2f}'))}, "
                   f"within problems {_e(within)}.</p>")  # fmt: skip
    if (rep := stats.repeatability) is not None:
        out += [f"<h3>Repeatability across noise draws ({rep['draws']} extra scorings, latents fixed)</h3>",
                "<table><tr><th>draws averaged</th><th>r of two independent means</th><th>AUROC pooled</th>"
                "<th>AUROC within problems</th></tr>"]  # fmt: skip
        for row in rep["by_draws"]:
            out.append(f"<tr><td>{row['k']}</td><td>{_e(_f(row['r']))}</td><td>{_e(_f(row['auroc']))}</td>"
                       f"<td>{_e(within_text(row['auroc_within']))}</td></tr>")  # fmt: skip
        out.append("</table>")
    return out


def render_html(rollouts: list[dict], result: InspectResult) -> str:
    """A self-contained page: inline CSS only, every piece of text escaped."""
    reward, stats = result.reward, result.stats
    vals = [t[reward] for r in rollouts for t in r["tokens"] if t["valid"]]
    devs = [t["score"] for r in rollouts for t in r["tokens"] if t["valid"]]
    rscale, dscale = max((abs(v) for v in vals), default=0.0), max(devs, default=0.0)
    ts = stats.tokens
    auc = "n/a (one class)" if stats.auroc is None else f"{stats.auroc:.3f}"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>rlfr inspect</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Flow rewards per token</h1>",
        f"<p>policy <code>{_e(result.policy)}</code>, flow <code>{_e(result.flow)}</code>; "
        f"latents {_e(json.dumps(result.latents))}; reward shown: <b>{_e(reward)}</b> "
        f"(beta {_e(result.shaping['beta'])}). Red = penalised, green = rewarded; hover a token for its reward, "
        "normalised deviation x and raw deviation score.</p>",
        f"<p>{stats.rollouts} rollouts, accuracy {stats.accuracy:.3f}, {stats.scored_tokens} scored tokens. "
        f"AUROC of the sequence flow score (lower mean deviation = correct), pooled over rollouts: <b>{_e(auc)}</b>; "
        f"within problems: <b>{_e(within_text(stats.auroc_within))}</b></p>",
        *separation_html(stats),
        "<input type='radio' name='m' id='by-rew' checked><label for='by-rew'>colour by reward</label> "
        "<input type='radio' name='m' id='by-dev'><label for='by-dev'>colour by raw deviation</label>",
        "<main>",
    ]
    for i, r in enumerate(rollouts):
        spans = []
        for t in r["tokens"]:
            if not t["valid"]:
                spans.append(f"<span title='not scored'>{_e(t['text'])}</span>")
                continue
            tip = (
                f"reward {t[reward]:+.5f} | x {t['x']:.3f} | deviation {t['score']:.4f} | token {t['text']!r}"
            )
            style = f"--r:{_color(t[reward], rscale)};--d:{_color(t['score'], dscale, diverging=False)}"
            spans.append(f"<span class='tok' style='{style}' title='{_e(tip)}'>{_e(t['text'])}</span>")
        dev = "n/a" if r["mean_deviation"] is None else f"{r['mean_deviation']:.4f}"
        verdict = "<span class='ok'>correct</span>" if r["correct"] else "<span class='bad'>wrong</span>"
        parts.append(
            f"<div class='roll'><b>#{i}</b> {verdict} &middot; answer <code>{_e(r['answer'])}</code> &middot; "
            f"mean deviation {dev}<details><summary>prompt</summary><pre>{_e(r['prompt'])}</pre></details>"
            f"<div class='resp'>{''.join(spans)}</div></div>"
        )
    cols = ["token", "count", "mean", "std", "min", "max"]
    parts += [
        "<h2>Statistics</h2>",
        f"<h3>Most rewarded tokens (mean {_e(reward)} reward, seen &ge; {ts['min_count']} times)</h3>",
        _table(ts["rewarded"], cols),
        "<h3>Most penalised tokens</h3>",
        _table(ts["penalised"], cols),
        "<h3>Reward by token class</h3>",
        _table(
            [{"class": c, **v} for c, v in ts["by_class"].items()],
            ["class", "count", "mean", "penalised", "rewarded"],
        ),
        "<h3>Same token, different contexts (most frequent tokens)</h3>",
        _table(ts["spread"], cols),
        "</main></body></html>",
    ]
    return "\n".join(parts)

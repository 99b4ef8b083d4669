"""A self-contained HTML report of a scan: findings, per-layer evidence, hidden facts, decompositions.
Figures are PNGs embedded as data URIs, so the file can be mailed or attached to a CI run as is."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..audit.findings import Finding
from ..outputs import write_text_atomic
from ..plotting import plain, pyplot


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figures(result: dict) -> list[tuple[str, str]]:
    plt = pyplot()
    figures = []
    tests = result["tests"]
    acts = tests.get("activations")
    if acts and "layer_scores" in acts:
        fig, ax = plt.subplots(figsize=(8, 2.6))
        ax.bar(range(len(acts["layer_scores"])), acts["layer_scores"], color="#2a7ab9")
        ax.axhline(acts["suspicious_z"], color="#e0a000", lw=1, label="suspicious")
        ax.axhline(acts["edited_z"], color="#c0392b", lw=1, label="edited")
        ax.set_xlabel("layer")
        ax.set_ylabel("max robust z")
        ax.legend(fontsize=7)
        ax.set_title("activation test: largest subject outlier of the MLP output norm, per layer", fontsize=9)
        fig.tight_layout()
        figures.append(("Activation test per layer", _png(fig)))
    diff = tests.get("diff")
    if diff and diff.get("changed"):
        fig, ax = plt.subplots(figsize=(8, 2.6))
        for change in diff["changed"][:12]:
            sv = change["singular_values"]
            ax.semilogy(range(1, len(sv) + 1), [max(s, 1e-12) for s in sv], marker="o", ms=3,
                        label=plain(change["name"].replace(".weight", "")))
        ax.set_xlabel("singular value index")
        ax.set_ylabel("σ of ΔW")
        ax.set_title("spectra of the changed tensors (base diff)", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        figures.append(("Spectra of changed tensors", _png(fig)))
    for item in tests.get("decomposition", []):
        fig, axes = plt.subplots(1, len(item["variants"]), figsize=(4 * len(item["variants"]), 2.6), sharey=True)
        axes = axes if hasattr(axes, "__len__") else [axes]
        for ax, (name, d) in zip(axes, item["variants"].items()):
            layers = range(len(d["mlp"]))
            ax.bar([l - 0.2 for l in layers], d["attention"], width=0.4, label="attention", color="#7f8c8d")
            ax.bar([l + 0.2 for l in layers], d["mlp"], width=0.4, label="MLP", color="#c0392b")
            ax.axhline(0, color="black", lw=0.5)
            ax.set_title(plain(name), fontsize=9)
            ax.set_xlabel("layer")
        axes[0].set_ylabel("logit(new) − logit(true)")
        axes[0].legend(fontsize=7)
        fig.suptitle(plain(item["prompt"]), fontsize=9)
        fig.tight_layout()
        figures.append((f"Residual-stream decomposition: {item['prompt']}", _png(fig)))
    return figures


def write_report(path: Path, result: dict, findings: list[Finding]) -> None:
    e = html.escape
    colour = {"clean": "#2e8b57", "suspicious": "#d08c00", "edited": "#c0392b"}[result["verdict"]]
    parts = [
        # no script, no fetch: whatever a checkpoint's strings hold, the report only shows them
        "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\"><title>editguard scan</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;width:100%;font-size:13px}td,th{border:1px solid #ddd;padding:4px 6px;"
        "text-align:left;vertical-align:top}th{background:#f4f4f4}.verdict{font-size:22px;font-weight:bold}"
        "img{max-width:100%}code{background:#f4f4f4;padding:1px 3px}",
        "</style></head><body>",
        f"<h1>editguard scan: <code>{e(result['model'])}</code></h1>",
        f"<p class='verdict' style='color:{colour}'>{e(result['verdict'].upper())} ({e(result['severity'])})</p>",
        f"<p>{e(result['architecture'])}, {result['num_layers']} layers; {len(findings)} finding(s); "
        f"{result['seconds']} s.</p>",
        "<h2>Findings</h2><table><tr><th>rule</th><th>severity</th><th>layer</th><th>tensor</th><th>score</th>"
        "<th>message</th></tr>",
    ]
    for f in findings:
        score = "" if f.score is None else f"{f.score:.3g}" + ("" if f.threshold is None else f" (≥ {f.threshold:g})")
        parts.append(f"<tr><td>{f.rule} {e(f.name)}</td><td>{f.severity}</td><td>{'' if f.layer is None else f.layer}</td>"
                     f"<td>{e(f.tensor or '')}</td><td>{score}</td><td>{e(f.message)}</td></tr>")
    parts.append("</table>")
    for key, title, under in (("revealed", "Hidden facts revealed by key projection", "keys projected out"),
                              ("hidden", "Hidden facts (answers before / under the mask)", "under the mask")):
        hidden = result["tests"].get(key)
        if not (hidden and hidden.get("facts")):
            continue
        parts.append(f"<h2>{title}</h2><table><tr><th>prompt</th>"
                     f"<th>current answer</th><th>{under}</th><th>CounterFact original</th></tr>")
        for fact in hidden["facts"]:
            parts.append(f"<tr><td>{e(fact['prompt'])}</td><td>{e(fact['current_answer'])} "
                         f"(p={fact['current_prob']:.2f})</td><td>{e(fact['revealed_answer'])} "
                         f"(p={fact['revealed_prob']:.2f})</td><td>{e(str(fact.get('expected_answer') or ''))}</td></tr>")
        parts.append("</table>")
    attribution = result["tests"].get("attribution")
    for a in attribution if isinstance(attribution, list) else []:
        parts.append(f"<h2>Attribution, layer {a['layer']}</h2><p>σ₁ = {a['sigma']:.3g}. Subjects: "
                     + ", ".join(f"{e(str(s['subject']))} ({s['score']:.1f})" for s in a["subjects"])
                     + ". Objects pushed: " + ", ".join(e(o["token"]) for o in a["objects"]) + ".</p>")
    for title, uri in _figures(result):
        parts.append(f"<h2>{e(title)}</h2><img src='{uri}' alt='{e(title)}'>")
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts))

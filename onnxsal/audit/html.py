"""``report.html``: one file that opens offline, written from ``audit.json`` and ``assets/``.

Every picture is embedded as a ``data:`` URI (the report can be mailed alone; the same PNGs are
in ``assets/``), there is no external script, style sheet or font, and a Content-Security-Policy
forbids the page any network access. Every string that comes from the model, the data or the
command line (model names, producer, class names, image names, metadata) is escaped with
:func:`html.escape`. The review buttons are a small inline script (:data:`SCRIPT`): the verdicts
are kept in the page (and in the browser's localStorage, keyed by the audit id) and saved as a
JSON file the user downloads (a Blob and a download link); ``onnxsal audit --review FILE``
folds it back (:mod:`onnxsal.audit.review`).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Iterable

from ..files import atomic_write_text
from . import figures

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:0 18px 40px;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin:.6em 0 .2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;
vertical-align:top;font-size:.92em}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:6px 10px;margin:4px 0;border-left:6px solid #999;background:#fafafa}
.good{border-color:#2e8b57}.warn{border-color:#e0a800}.bad{border-color:#c0392b;background:#fff4f2}
.info{border-color:#5b7db1}.tag{font-weight:600;text-transform:uppercase;font-size:.75em;margin-right:.5em}
figure{margin:.8em 0;overflow-x:auto}figcaption{font-size:.88em;color:#444;max-width:900px}
.grid td{text-align:center}.grid img{width:96px;height:auto;image-rendering:pixelated;display:block;margin:auto}
.rv{font-size:.78em;margin:2px 1px;padding:1px 5px;border:1px solid #aaa;background:#fff;border-radius:3px;
cursor:pointer}
.rv[aria-pressed=true].agree{background:#2e8b57;color:#fff}.rv[aria-pressed=true].disagree{background:#c0392b;color:#fff}
.muted{color:#666;font-size:.9em}nav a{margin-right:.8em}.plot{max-width:100%;height:auto}
code{background:#f3f3f3;padding:0 3px}#review-bar{position:sticky;top:0;background:#fffbe6;border:1px solid #e0d48a;
padding:6px 10px;z-index:2}
"""

SCRIPT = """
(function () {
  var body = document.body;
  var audit = body.getAttribute('data-audit');
  var key = 'onnxsal-review:' + audit;
  var state = {};
  var buttons = document.querySelectorAll('button.rv');
  function mark(id) {
    for (var i = 0; i < buttons.length; i++) {
      var b = buttons[i];
      if (b.getAttribute('data-item') === id) {
        b.setAttribute('aria-pressed', state[id] === b.getAttribute('data-verdict') ? 'true' : 'false');
      }
    }
  }
  function count() {
    var n = Object.keys(state).length;
    document.getElementById('review-count').textContent = String(n);
    try { window.localStorage.setItem(key, JSON.stringify(state)); } catch (e) { /* file:// may forbid it */ }
  }
  for (var i = 0; i < buttons.length; i++) {
    var b = buttons[i];
    if (b.getAttribute('aria-pressed') === 'true') {
      state[b.getAttribute('data-item')] = b.getAttribute('data-verdict');
    }
  }
  try {
    var saved = JSON.parse(window.localStorage.getItem(key) || '{}');
    for (var id in saved) { if (saved[id] === 'agree' || saved[id] === 'disagree') { state[id] = saved[id]; } }
  } catch (e) { /* no stored review */ }
  for (var id2 in state) { mark(id2); }
  for (var j = 0; j < buttons.length; j++) {
    buttons[j].addEventListener('click', function (ev) {
      var b = ev.currentTarget, id = b.getAttribute('data-item'), v = b.getAttribute('data-verdict');
      if (state[id] === v) { delete state[id]; } else { state[id] = v; }
      mark(id); count();
    });
  }
  function reviewJSON() {
    var reviewer = document.getElementById('reviewer').value;
    return JSON.stringify({format: 'onnxsal-review', version: 1, audit: audit, reviewer: reviewer,
                           verdicts: state}, null, 1);
  }
  window.onnxsalReviewJSON = reviewJSON;
  document.getElementById('review-download').addEventListener('click', function () {
    var a = document.getElementById('review-link');
    if (a.href && a.href.indexOf('blob:') === 0) { URL.revokeObjectURL(a.href); }
    a.href = URL.createObjectURL(new Blob([reviewJSON()], {type: 'application/json'}));
    a.download = 'review.json';
    a.hidden = false;
    a.click();
  });
  count();
})();
"""


def e(v: Any) -> str:
    """Escaped text (also quotes: safe inside attributes)."""
    return html.escape("" if v is None else str(v), quote=True)


def num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def pct(v: Any) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """A table of already-escaped cell HTML (headers are escaped here)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def td_num(v: Any, digits: int = 3) -> str:
    return f'<td class="num">{e(num(v, digits))}</td>'


def img_tag(out: Path, rel: str | None, alt: str, cls: str = "") -> str:
    """An <img> with the PNG at ``out/rel`` embedded; '' when the file is missing."""
    if not rel:
        return ""
    path = (out / rel).resolve()
    # names come from audit.json, which a reviewer may be handed: embed nothing from outside
    if not path.is_relative_to(out.resolve()) or not path.is_file():
        return f'<span class="muted">(figure {e(rel)} missing)</span>'
    return f'<img src="{figures.data_uri(path.read_bytes())}" alt="{e(alt)}" class="{e(cls)}">'


def figure(inner: str, shows: str, read: str) -> str:
    return (f"<figure>{inner}<figcaption><b>What it shows:</b> {e(shows)} "
            f"<b>How to read it:</b> {e(read)}</figcaption></figure>")


def item_id(it: dict, method: str) -> str:
    return f"{it['image']}:{method}"


def _not_run(anchor: str, title: str, error: str) -> str:
    return f'<section id="{anchor}"><h2>{e(title)}</h2><p>Not run: {e(error)}</p></section>'


# -- sections --------------------------------------------------------------------------------


def _summary(r: dict) -> str:
    s = r["summary"]
    rows = "".join(f'<div class="verdict {e(v["level"])}"><span class="tag">{e(v["level"])}</span>'
                   f'<b>{e(v["topic"])}</b>: {e(v["text"])}</div>' for v in s["verdicts"])
    top = ("<ol>" + "".join(f"<li>{e(f)}</li>" for f in s["findings"]) + "</ol>") if s["findings"] \
        else "<p>No problem found by these checks.</p>"
    return (f'<section id="summary"><h2>Summary</h2><h3>Top findings</h3>{top}'
            f'<h3>Verdicts</h3>{rows}</section>')


def _model(r: dict) -> str:
    m, s = r["model"], r["model"]["summary"]
    inp, lg = s["input"], s["logits"]
    rows = [("file", m["name"]), ("sha256", m["hash"]), ("producer", s.get("producer") or "-"),
            ("opset / IR", f"{s['opset']} / {s['ir_version']}"), ("parameters", f"{s['parameters']:,}"),
            ("input", f"{inp['name']} shape {inp['shape']} layout {inp['layout']}"),
            ("logits", f"{lg['tensor']} (output {lg['output']}), {m['num_classes']} classes"),
            ("preprocessing", m["preprocess"]), ("gradients used", m["gradient_source"]),
            ("gradients plan (inspect)", s.get("gradients")), ("provider", m["provider"]),
            ("classes", ", ".join(m["class_names"][:50]) + (" ..." if len(m["class_names"]) > 50 else ""))]
    notes = [lg.get("note")] + list(s.get("notes") or [])
    rows += [("note", n) for n in notes if n]
    ops = s.get("operators", {})
    bad = [op for op, v in ops.items() if v["needs_rule"] and not v["differentiable"]]
    rows.append(("operators", f"{sum(v['count'] for v in ops.values())} nodes, {len(ops)} types, "
                              f"{len(bad)} without a gradient rule" + (f" ({', '.join(bad)})" if bad else "")))
    d = r["data"]
    drows = [("source", d["source"]), ("images", d["count"]), ("shape", d["shape"]),
             ("labels", "yes" if d["labels"] else "no"), ("fingerprint", d["fingerprint"][:16])]
    drows += [("note", n) for n in d.get("notes", [])]
    drows += [("unreadable", f"{f['name']}: {f['error']}") for f in d.get("failures", [])[:20]]
    return ('<section id="model"><h2>Model and data</h2>'
            + table(["", ""], [(e(k), e(v)) for k, v in rows])
            + "<h3>Data</h3>" + table(["", ""], [(e(k), e(v)) for k, v in drows]) + "</section>")


def _confusion(a: dict, names: list[str]) -> str:
    cm = a["confusion"]
    k = len(cm)
    if k > 20:
        rows = [(e(names[t["true"]]), e(names[t["predicted"]]), td_num(t["images"])) for t in a["top_confusions"]]
        return figure(table(["true class", "predicted as", "images"], rows),
                      f"The most frequent of the {k}x{k} confusions (the full matrix is in audit.json).",
                      "Each row: how many images of the true class the model gave the other class.")
    peak = max(1, max(max(row) for row in cm))
    cells = []
    for i, row in enumerate(cm):
        tds = [f"<th>{e(names[i])}</th>"]
        for j, v in enumerate(row):
            shade = int(255 - 170 * v / peak)
            colour = f"rgb({shade},{shade},255)" if i == j else f"rgb(255,{shade},{shade})"
            tds.append(f'<td class="num" style="background:{colour if v else "#fff"}">{v}</td>')
        cells.append(tds)
    head = ["true \\ predicted"] + [names[j] for j in range(k)]
    return figure(table(head, cells, "confusion"),
                  "The confusion matrix: rows are the true classes, columns the predicted ones.",
                  "The diagonal (blue) counts correct predictions; a dark red cell off the diagonal is a "
                  "pair of classes the model mixes up.")


def _accuracy(r: dict) -> str:
    a, names = r["predictions"], r["model"]["class_names"]
    if not a["labels"]:
        rows = [(e(names[c]), td_num(n)) for c, n in enumerate(a["predicted_counts"]) if n]
        return ('<section id="accuracy"><h2>Predictions</h2><p>The data has no labels, so accuracy is '
                'unknown. How often each class is predicted:</p>' + table(["class", "images"], rows) + "</section>")
    rows = [(e(p["name"]), td_num(p["images"]), td_num(p["correct"]), f'<td class="num">{e(pct(p["accuracy"]))}</td>')
            for p in a["per_class"] if p["images"]]
    return (f'<section id="accuracy"><h2>Accuracy</h2><p>Top-1 accuracy <b>{e(pct(a["accuracy"]))}</b> '
            f'({a["correct"]} of {a["images"]} images).</p>'
            + table(["class", "images", "correct", "accuracy"], rows)
            + _confusion(a, names) + "</section>")


def _review_buttons(iid: str, verdicts: dict) -> str:
    out = []
    for v, label in (("agree", "agree"), ("disagree", "disagree")):
        pressed = "true" if verdicts.get(iid) == v else "false"
        out.append(f'<button type="button" class="rv {v}" data-item="{e(iid)}" data-verdict="{v}" '
                   f'aria-pressed="{pressed}">{label}</button>')
    return "<br>".join(out)


def _samples(r: dict, out: Path) -> str:
    s, names = r["samples"], r["model"]["class_names"]
    verdicts = (r.get("review") or {}).get("verdicts", {})
    methods = s["methods"]
    by_class: dict[int, list] = {}
    for it in s["items"]:
        by_class.setdefault(it["class"], []).append(it)
    blocks = []
    for c, items in by_class.items():
        rows = []
        for it in items:
            status = "no label" if it["correct"] is None else ("correct" if it["correct"] else "WRONG")
            cap = (f"{e(it['name'])}<br>label {e(names[it['label']]) if it['label'] is not None else '-'}"
                   f"<br>predicted {e(names[it['pred']])} ({e(pct(it['prob']))})<br><b>{e(status)}</b>")
            cells = [f"<td>{cap}</td>", f"<td>{img_tag(out, it['image_png'], 'image ' + it['name'])}</td>"]
            for m in methods:
                iid = item_id(it, m)
                cells.append(f"<td>{img_tag(out, it['maps'][m]['png'], m + ' map of ' + it['name'])}"
                             f"{_review_buttons(iid, verdicts)}</td>")
            rows.append(cells)
        grid = table(["image", "input"] + methods, rows, "grid")
        blocks.append(f'<h3 id="class-{c}">Class {e(names[c])}</h3>' + figure(
            grid, f"Images of class {names[c]} (correct predictions first, then wrong ones) and each "
                  "method's map of the class the model predicted.",
            "Signed maps (" + ", ".join(m for m in methods if s["signed"][m]) + ") are red where the "
            "pixel supports the predicted class and blue where it opposes it; the others show magnitude "
            "(bright = important). A trustworthy map marks the object, not the background or a corner. "
            "Review mode: press agree when the map highlights evidence you would accept for the "
            "prediction, disagree when it does not."))
    more = ""
    if len(s["classes_shown"]) < s["classes_total"]:
        more = (f'<p class="muted">{len(s["classes_shown"])} of {s["classes_total"]} classes are shown '
                "(those with the most errors).</p>")
    return '<section id="maps"><h2>Maps per class</h2>' + more + "".join(blocks) + "</section>"


def _deletion(r: dict, out: Path) -> str:
    b = r["benchmark"]
    rows = [(e(x["method"]), td_num(x["auc"].get("black")), td_num(x["auc"].get("white"))) for x in b["rows"]]
    what = "accuracy" if b["metric"] == "accuracy" else "agreement with the clean prediction (allegiance)"
    plot = img_tag(out, f"{b['folder']}/{b['curves_png']}" if b.get("curves_png") else None,
                   "deletion curves", "plot")
    return (f'<h3 id="deletion">Deletion</h3><p>{b["images"]} images (class-stratified); clean '
            f'{e(what)}: {e(num(b["clean"].get("score")))}. AUC: {e(b["auc"])}.</p>'
            + figure(table(["method", "black AUC (lower is better)", "white AUC (lower is better)"], rows),
                     "Area under the curve of the model's " + what + " while the most salient pixels "
                     "(10%, 20%, ... 90%) are set to black or white.",
                     "A faithful map finds the pixels the model needs: removing them first makes the "
                     "score drop fast, so a lower AUC is better. Compare methods with each other.")
            + (figure(plot, "The deletion curves of every method (score against the fraction of pixels "
                            "removed).", "Curves that fall early belong to more faithful maps.") if plot else "")
            + f'<p class="muted">The benchmark\'s own files: <a href="{e(b["folder"])}/results.md">'
              f'{e(b["folder"])}/results.md</a>.</p>')


def _metric_tables(r: dict, only: set[str] | None, skip: set[str]) -> tuple[str, int]:
    b = r["benchmark"]
    if "rows" not in b:
        return "", 0
    cats = b["category"]
    names = sorted({k for x in b["rows"] for k in x["metrics"]})
    names = [n for n in names if (only is None or cats.get(n) in only) and cats.get(n) not in skip]
    if not names:
        return "", 0
    by_cat: dict[str, list[str]] = {}
    for n in names:
        by_cat.setdefault(cats.get(n, "other"), []).append(n)
    html_out = []
    for cat, ms in sorted(by_cat.items()):
        heads = ["method"] + [f"{n} ({'higher' if b['rows'][0]['metrics'][n]['direction'] == 'higher' else 'lower'}"
                              " is better)" for n in ms]
        rows = [[e(x["method"])] + [td_num(x["metrics"][n]["value"]) for n in ms] for x in b["rows"]]
        html_out.append(f"<h4>{e(cat)}</h4>" + figure(
            table(heads, rows), f"The registered {cat} metrics, per method, mean over the images.",
            "Each column says whether higher or lower is better; the definitions are in the project's "
            "docs/metrics.md. Compare methods within a column."))
    return "".join(html_out), len(names)


def _metrics(r: dict, out: Path) -> str:
    if "error" in r["benchmark"]:
        return _not_run("faithfulness", "Faithfulness and the other evaluation metrics", r["benchmark"]["error"])
    b = r["benchmark"]
    tables, _ = _metric_tables(r, None, {"robustness"})
    skipped = table(["metric", "why not run"], [(e(s["metric"]), e(s["reason"])) for s in b["skipped"]]) \
        if b["skipped"] else "<p>None.</p>"
    return ('<section id="faithfulness"><h2>Faithfulness and the other evaluation metrics</h2>'
            + _deletion(r, out) + '<h3 id="metrics">Registered metrics</h3>'
            + (tables or "<p>No other metric was run.</p>")
            + "<h4>Metrics not run</h4>" + skipped + "</section>")


def _robustness(r: dict) -> str:
    tables, n = _metric_tables(r, {"robustness"}, set())
    body = tables if n else ("<p>No robustness metric is registered in this installation (a plugin or a "
                             "later version may add one; it then appears here).</p>")
    return '<section id="robustness"><h2>Robustness of the maps</h2>' + body + "</section>"


def _localisation(r: dict) -> str:
    if "error" in r["localisation"]:
        return _not_run("localisation", "Localisation", r["localisation"]["error"])
    loc = r["localisation"]
    if not loc.get("given"):
        return ('<section id="localisation"><h2>Localisation</h2><p>No ground-truth masks were given '
                "(<code>--masks</code>), so the localisation metrics were not run.</p></section>")
    ms = list(loc["metrics"])
    methods = r["samples"]["methods"]
    rows = [[e(m)] + [td_num(loc["metrics"][n]["methods"][m]["value"]) for n in ms] for m in methods]
    heads = ["method"] + [f"{n} ({loc['metrics'][n]['direction']} is better)" for n in ms]
    return (f'<section id="localisation"><h2>Localisation</h2><p>{loc["images"]} images; the masks cover '
            f'{e(pct(loc["mask_fraction"]))} of the pixels.</p>'
            + figure(table(heads, rows), "How much of each method's saliency falls inside the ground-truth "
                     "masks (pointing game: the top pixel inside; mass and rank accuracy: the share inside).",
                     "Higher is better; a map that beats the mask's own share of the image localises the "
                     "object better than chance.") + "</section>")


def _sanity(r: dict, out: Path) -> str:
    if "error" in r["sanity"]:
        return _not_run("sanity", "Sanity checks", r["sanity"]["error"])
    s = r["sanity"]
    words = {True: "pass", False: "FAIL", None: "undecided"}
    top = s.get("step_verdicts") or {}
    rows = [(e(m), e(words[v["passes"]]), e(v["reason"]))
            + ((e(words[top[m]["passes"]]), e(top[m]["reason"])) if m in top else ())
            for m, v in s["verdicts"].items()]
    methods = list(s["verdicts"])
    head = ["method", "verdict", "why"] + (["top-layer verdict", "why (top layer)"] if top else [])
    step_rule = (f'<p>Top-layer rule: {e(s["step_rule"])}; a method whose maps do not change when '
                 "the top layer is randomised ignores what the model's last layers decide.</p>"
                 if top and s.get("step_rule") else "")
    steps = [[e(st["label"]), td_num(st["layers_randomised"]), f'<td class="num">{e(pct(st["class_agreement"]))}</td>']
             + [td_num(st["spearman_abs"][m]) for m in methods] for st in s["steps"]]
    figs = "".join(figure(img_tag(out, f"{s['folder']}/{f}", f, "plot"),
                          "Similarity of each method's maps to the trained model's maps as more layers are "
                          "randomised (top layer first)." if f.startswith("cascading") else
                          "One image's maps (rows: methods) for the trained model and each randomisation step.",
                          "Lines that fall towards 0 belong to maps that depend on the learned weights (good); "
                          "flat lines near 1 mean the map ignores what the model learned."
                          if f.startswith("cascading") else
                          "A map that looks the same in every column does not depend on the weights.")
                   for f in s["figures"])
    return ('<section id="sanity"><h2>Sanity checks</h2>'
            f'<p>Cascading model-parameter randomisation (Adebayo et al. 2018) on {s["images"]} images. '
            f'Rule: {e(s["rule"])}</p>'
            + step_rule + table(head, rows)
            + figure(table(["step (layer randomised last)", "layers", "same class"] + methods, steps),
                     "Mean Spearman rank correlation of the absolute maps with the trained model's maps, "
                     "per randomisation step.",
                     "Step 0 compares the method with itself (its own noise); the value should fall well "
                     "below it as layers are randomised.")
            + figs + f'<p class="muted">Details: <a href="{e(s["folder"])}/sanity.md">'
            f'{e(s["folder"])}/sanity.md</a>.</p>'
            + "</section>")


def _finding_rows(sc: dict, names: list[str]) -> list:
    rows = []
    for f in sc["findings"]:
        rows.append([e(names[f["class"]]), e(f["box"]), f'<td class="num">{e(pct(f["area_fraction"]))}</td>',
                     td_num(f["consistency"]), td_num(f.get("lift")), td_num(f["paste_flip_rate"]),
                     td_num(f["control_flip_rate"]),
                     td_num(f["blank_flip_rate"]), td_num(f["control_blank_flip_rate"]),
                     f"<b>{'SUSPECTED' if f['suspected'] else 'no'}</b>", e(f.get("reason", ""))])
    return rows


def _shortcuts(r: dict, out: Path) -> str:
    if "error" in r["shortcuts"]:
        return _not_run("shortcuts", "Shortcuts", r["shortcuts"]["error"])
    sc, names = r["shortcuts"], r["model"]["class_names"]
    if not sc.get("available"):
        return f'<section id="shortcuts"><h2>Shortcuts</h2><p>{e(sc.get("reason"))}</p></section>'
    st = sc["settings"]
    head = ["class", "box [y0, x0, y1, x1]", "area", "consistency", "lift", "paste flip", "control paste flip",
            "blank flip", "control blank flip", "suspected", "why"]
    parts = [f'<section id="shortcuts"><h2>Shortcuts</h2><p>For each class, the region where the '
             f'{e(sc["method"])} saliency of its images is higher than in other classes\' images is '
             "tested by intervention: pasted from images of the class onto images of other classes "
             "(paste flip: how often they then become the class) and blanked in images of the class "
             "(blank flip: how often they stop being it), each against a random region of the same size "
             f"(control). {st['images']} images grouped by {e(sc['grouped_by'])}, {st['pairs']} pairs per "
             f"class; a class is suspected when the paste flip rate exceeds the control's by at least "
             f"{e(st.get('paste_margin'))}, the box covers at most {pct(st.get('max_box_fraction'))} of the image"
             + (f" and single images' saliency falls in the box at least {e(st['min_lift'])} times as much as "
                "by chance (lift)" if "min_lift" in st else "") + ".</p>",
             figure(table(head, _finding_rows(sc, names)), "One row per class tested.",
                    "A high paste flip rate far above the control means that the region alone makes the "
                    "model predict the class: the model may read a tag or watermark instead of the object.")]
    for s in sc.get("skipped_classes", []):
        parts.append(f'<p class="muted">class {e(names[s["class"]])} not tested: {e(s["reason"])}</p>')
    for f in sc["findings"]:
        if not f["suspected"]:
            continue
        c = f["class"]
        rows = [[f"<td>{img_tag(out, ex.get('source_png'), 'source')}</td>",
                 f"<td>{img_tag(out, ex.get('before_png'), 'before')}<br>{e(names[ex['before']])}</td>",
                 f"<td>{img_tag(out, ex.get('after_png'), 'after')}<br>{e(names[ex['after']])}</td>"]
                for ex in f.get("examples", [])]
        parts.append(f'<h3 id="shortcut-{c}">Suspected shortcut: class {e(names[c])}</h3>' + figure(
            img_tag(out, f.get("contrast_png"), "class contrast map"),
            f"Where the saliency of class {names[c]} exceeds that of the other classes (bright), with "
            "the box tested (yellow).", "A small bright spot away from the object is a candidate shortcut.")
            + figure(table(["image of the class (source)", "other image before (prediction)",
                            "after pasting the box (prediction)"], rows, "grid"),
                     "Pastes that changed the prediction.",
                     "If pasting only the boxed pixels turns an image into this class, the model relies on "
                     "what is in the box."))
    parts.append("</section>")
    return "".join(parts)


def _review(r: dict) -> str:
    rv = r.get("review")
    intro = ("<p>Press <i>agree</i> or <i>disagree</i> under each map (a second press clears it), then "
             "<b>Download review</b>: it saves <code>review.json</code>. Fold it into this report with "
             "<code>onnxsal audit --review review.json --out DIR</code>. The choices are kept in this "
             "browser until downloaded.</p>")
    if not rv:
        return '<section id="review"><h2>Expert review</h2>' + intro + "<p>No review folded in yet.</p></section>"
    o = rv["overall"]
    per_m = [(e(m), td_num(v["agree"]), td_num(v["disagree"]), f'<td class="num">{e(pct(v["agreement"]))}</td>')
             for m, v in rv["per_method"].items()]
    names = r["model"]["class_names"]
    per_c = [(e(names[int(c)]), td_num(v["agree"]), td_num(v["disagree"]),
              f'<td class="num">{e(pct(v["agreement"]))}</td>')
             for c, v in rv["per_class"].items()]
    who = f" by {e(rv['reviewer'])}" if rv.get("reviewer") else ""
    return ('<section id="review"><h2>Expert review</h2>'
            f'<p>Review{who}: {o["reviewed"]} of {o["items"]} maps reviewed; overall agreement '
            f'<b id="review-agreement">{e(pct(o["agreement"]))}</b>.</p>'
            + figure(table(["method", "agree", "disagree", "agreement rate"], per_m),
                     "How often the reviewer agreed with each method's maps.",
                     "A method the expert rarely agrees with highlights evidence they would not accept.")
            + figure(table(["class", "agree", "disagree", "agreement rate"], per_c),
                     "The same per class (the image's class).", "A class with a low rate deserves a closer look.")
            + intro + "</section>")


def _reproduce(r: dict) -> str:
    t = r["timing"]
    rows = [(e("command"), e(r.get("command") or "(Python API)")), (e("onnxsal"), e(r["version"])),
            (e("audit id"), e(r["id"])), (e("executor"), e(r["executor"])),
            (e("seconds"), e(", ".join(f"{k} {v}" for k, v in t.items()))),
            (e("parts reused"), e(", ".join(r["parts"]["reused"]) or "none"))]
    return ('<section id="reproduce"><h2>Reproduce</h2>' + table(["", ""], rows)
            + '<p>Every number of this report: <a href="audit.json">audit.json</a>.</p></section>')


SECTIONS = [("summary", "Summary"), ("model", "Model and data"), ("accuracy", "Accuracy"),
            ("maps", "Maps"), ("faithfulness", "Faithfulness"), ("robustness", "Robustness"),
            ("localisation", "Localisation"), ("sanity", "Sanity checks"), ("shortcuts", "Shortcuts"),
            ("review", "Expert review"), ("reproduce", "Reproduce")]


def render(out: Path, r: dict) -> str:
    """The report's HTML text."""
    nav = "".join(f'<a href="#{a}">{e(t)}</a>' for a, t in SECTIONS)
    bar = ('<div id="review-bar">Review mode: <span id="review-count">0</span> maps marked. '
           '<label>Reviewer <input id="reviewer" size="16"></label> '
           '<button type="button" id="review-download">Download review</button> '
           '<a id="review-link" hidden href="#review">review.json</a></div>')
    body = "".join([_summary(r), _model(r), _accuracy(r), _samples(r, out), _metrics(r, out),
                    _robustness(r), _localisation(r), _sanity(r, out), _shortcuts(r, out), _review(r),
                    _reproduce(r)])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>onnxsal audit: {e(r['model']['name'])}</title><style>{STYLE}</style></head>"
            f'<body data-audit="{e(r["id"])}"><h1>Audit of {e(r["model"]["name"])}</h1>'
            f'<p class="muted">onnxsal {e(r["version"])} - {r["data"]["count"]} images from '
            f'{e(r["data"]["source"])} - audit id {e(r["id"])}</p><nav>{nav}</nav>{bar}{body}'
            f"<script>{SCRIPT}</script></body></html>\n")


def write_report(out: str | Path, report: dict) -> Path:
    out = Path(out)
    path = out / "report.html"
    atomic_write_text(path, render(out, report))
    return path

"""``GET /``: one page to try the model: a text box (or an image upload), the prediction and its probabilities.

Plain HTML and a few lines of JavaScript that post to ``/predict`` as any client would; no build step, no assets.
"""

from __future__ import annotations

import html
import json
from typing import Any

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ftlab-serve: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }}
textarea, input {{ width: 100%; box-sizing: border-box; margin: .3rem 0; font: inherit; }}
button {{ font: inherit; padding: .3rem 1.2rem; }}
table {{ border-collapse: collapse; margin-top: .5rem; }} td {{ padding: .1rem .8rem .1rem 0; }}
#label {{ font-size: 1.6rem; font-weight: bold; }} #error {{ color: #b00; }} small {{ color: #666; }}
</style></head>
<body>
<h1>{title}</h1>
<p><small>{summary}</small></p>
<form id="form">
{fields}
<button type="submit" id="submit">Predict</button>
</form>
<p id="label" role="status"></p><table id="probs"></table><p id="error"></p>
<script>
const INFO = {info};
const form = document.getElementById("form");
async function body() {{
  if (INFO.input.field === "images") {{
    const file = document.getElementById("image").files[0];
    if (!file) throw new Error("choose an image file");
    const url = await new Promise(done => {{ const r = new FileReader(); r.onload = () => done(r.result);
                                             r.readAsDataURL(file); }});
    return {{images: [url.split(",")[1]]}};
  }}
  const b = {{inputs: document.getElementById("text").value}};
  if (INFO.input.pairs) b.pairs = document.getElementById("pair").value;
  return b;
}}
form.addEventListener("submit", async event => {{
  event.preventDefault();
  for (const id of ["label", "probs", "error"]) document.getElementById(id).textContent = "";
  try {{
    const response = await fetch("/predict", {{method: "POST", headers: {{"Content-Type": "application/json"}},
                                               body: JSON.stringify(await body())}});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    const row = answer.predictions[0];
    const rest = Object.fromEntries(Object.entries(row).filter(([k]) => k !== "input"));
    let shown = JSON.stringify(rest), probs = [];
    if ("label" in row) {{ shown = row.label; probs = (row.top_k || []).map(t => [t.label, t.probability]); }}
    else if ("labels" in row) {{  // a label set, with every label's probability
      shown = row.labels.length ? row.labels.join(", ") : "(no label)";
      probs = Object.entries(row.probabilities).sort((a, b) => b[1] - a[1]);
    }} else if ("tags" in row) {{  // token classification: word/tag, and the entities found
      shown = row.words.map((w, i) => w + "/" + (row.tags[i] ?? "-")).join(" ");
      probs = (row.entities || []).map(e => [e.type, `${{e.text}} [${{e.start}}, ${{e.end}})`]);
    }} else if ("value" in row) shown = row.value.toFixed(4);
    document.getElementById("label").textContent = shown;
    for (const [name, p] of probs) {{
      const tr = document.getElementById("probs").insertRow();
      tr.insertCell().textContent = name;
      tr.insertCell().textContent = typeof p === "number" ? p.toFixed(4) : p;
    }}
  }} catch (err) {{ document.getElementById("error").textContent = err.message; }}
}});
</script>
</body></html>
"""

TEXT_FIELDS = '<label for="text">Text</label><textarea id="text" name="text" rows="4" required></textarea>'
PAIR_FIELD = (
    '<label for="pair">Second text</label><textarea id="pair" name="pair" rows="3" required></textarea>'
)
IMAGE_FIELD = '<label for="image">Image</label><input id="image" name="image" type="file" accept="image/*">'


def page(info: dict[str, Any]) -> str:
    """The page for the served model (``info`` is what ``GET /metadata`` answers)."""
    if info["input"]["field"] == "images":
        fields = IMAGE_FIELD
    else:
        fields = TEXT_FIELDS + (PAIR_FIELD if info["input"]["pairs"] else "")
    labels = info.get("labels") or []
    summary = f"{info['task']} · {info['model'].get('name') or info['model']['backbone']} · {info['runtime']}"
    if labels:
        summary += f" · labels: {', '.join(map(str, labels[:12]))}{' …' if len(labels) > 12 else ''}"
    return TEMPLATE.format(
        title=html.escape(str(info["model"].get("name") or "model")),
        summary=html.escape(summary),
        fields=fields,
        # </ inside the JSON would end the script element
        info=json.dumps({"input": info["input"]}).replace("</", "<\\/"),
    )

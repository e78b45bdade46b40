"""Regenerate notebooks/inspect_subset.ipynb (kept as code so its diff stays readable)."""

import nbformat as nbf

nb = nbf.v4.new_notebook()
cells = [
    nbf.v4.new_markdown_cell(
        "# Inspect a priming subset\n\n"
        "Pick a run directory written by `primer subset` (or `make demo`). Per class: the retrieved "
        "images with their captions, match terms, CLIP scores and why each was kept or dropped; "
        "per-class counts through the stages; the accuracy table and charts; with `primer attribute "
        "RUN_DIR`, which priming images help. Nothing is recomputed but the per-class accuracies "
        "(from the cached embeddings). `primer report RUN_DIR` writes the same views as one HTML page."
    ),
    nbf.v4.new_code_cell(
        "import os\n"
        "# The run directory to inspect (any fsspec URL); PRIMER_RUN_DIR overrides it. The default,\n"
        "# the demo's, is found from the repository root or from notebooks/.\n"
        "RUN_DIR = os.environ.get('PRIMER_RUN_DIR') or next(\n"
        "    (d for d in ('data/demo', '../data/demo') if os.path.isdir(d)), 'data/demo'\n"
        ")\n"
        "PER_CLASS = 8  # images shown per class"
    ),
    nbf.v4.new_code_cell(
        "import io\n"
        "import matplotlib.pyplot as plt\n"
        "import pandas as pd\n"
        "from IPython.display import SVG, Markdown, display\n"
        "from PIL import Image\n"
        "from pipeline.report.page import collect_run, figures\n"
        "\n"
        "run = collect_run(RUN_DIR, per_class=PER_CLASS)\n"
        "charts = figures(run)  # the report's charts, as SVG\n"
        "if run.untrained:\n"
        "    display(Markdown('**Untrained model weights: scores and accuracies are meaningless.**'))\n"
        "print(f'{len(run.classnames)} classes in {RUN_DIR}')"
    ),
    nbf.v4.new_markdown_cell("## Images per class through the stages"),
    nbf.v4.new_code_cell(
        "counts = pd.DataFrame(run.counts, index=pd.Index(run.classnames, name='class'))\n"
        "counts.loc['total'] = counts.sum()\n"
        "display(counts)\n"
        "if 'stages' in charts:\n"
        "    display(SVG(charts['stages']))"
    ),
    nbf.v4.new_markdown_cell("## Accuracy"),
    nbf.v4.new_code_cell(
        "display(Markdown(run.results_md or '_no evaluation in this run directory_'))\n"
        "for name in ('accuracy-shots', 'per-class-gain'):\n"
        "    if name in charts:\n"
        "        display(SVG(charts[name]))"
    ),
    nbf.v4.new_markdown_cell(
        "## Which priming images help\n\n"
        "`primer attribute RUN_DIR` ranks the priming images, caption terms and classes by the "
        "accuracy the centroid head loses on labelled train images without them (never test "
        "labels). Below: per class and per term, then the most helpful and the most harmful images."
    ),
    nbf.v4.new_code_cell(
        "def show_images(exs, title):\n"
        "    exs = [e for e in exs if e.image][:8]\n"
        "    if not exs:\n"
        "        return\n"
        "    fig, axes = plt.subplots(1, len(exs), figsize=(2.2 * len(exs), 2.8), squeeze=False)\n"
        "    for ax, e in zip(axes[0], exs):\n"
        "        ax.imshow(Image.open(io.BytesIO(e.image)).convert('RGB'))\n"
        "        ax.set_title(f'{e.caption[:28]}\\n[{e.matched_term}] {100 * e.influence[0]:+.2f} pts', fontsize=6)\n"
        "        ax.axis('off')\n"
        "    fig.suptitle(title, fontsize=9)\n"
        "    plt.show()\n"
        "\n"
        "if run.attribution is None:\n"
        "    print(f'no attribution in {RUN_DIR}: run primer attribute {RUN_DIR}')\n"
        "else:\n"
        "    for name in ('class-influence', 'term-influence'):\n"
        "        display(SVG(charts[name]))\n"
        "    show_images(run.attribution['helpful'], 'most helpful (accuracy lost without each)')\n"
        "    show_images(run.attribution['harmful'], 'most harmful (accuracy lost without each)')"
    ),
    nbf.v4.new_markdown_cell(
        "## Retrieved images per class\n\nGreen titles were kept by every filter; red ones were dropped (the reason follows)."
    ),
    nbf.v4.new_code_cell(
        "def show_class(c):\n"
        "    exs = run.examples.get(c, [])\n"
        "    if not exs:\n"
        "        print(f'{c}: {run.classnames[c]}: no retrieved images')\n"
        "        return\n"
        "    fig, axes = plt.subplots(1, len(exs), figsize=(2.2 * len(exs), 2.8), squeeze=False)\n"
        "    for ax, e in zip(axes[0], exs):\n"
        "        if e.image:\n"
        "            ax.imshow(Image.open(io.BytesIO(e.image)).convert('RGB'))\n"
        "        why = ', '.join(f'{k}:{\"kept\" if kept else reason} {score:.2f}' for k, (kept, score, reason) in e.decisions.items())\n"
        "        ax.set_title(f'{e.caption[:28]}\\n[{e.matched_term}] {why}', fontsize=6, color='green' if e.kept else 'red')\n"
        "        ax.axis('off')\n"
        "    fig.suptitle(f'{c}: {run.classnames[c]}', fontsize=9)\n"
        "    plt.show()\n"
        "\n"
        "for c in range(len(run.classnames)):\n"
        "    show_class(c)"
    ),
]
for i, cell in enumerate(cells):
    cell["id"] = f"cell-{i:02d}"  # fixed ids: regenerating changes only what changed
nb["cells"] = cells
nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/inspect_subset.ipynb")

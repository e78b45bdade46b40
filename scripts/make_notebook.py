"""Regenerate notebooks/inspect_subset.ipynb (kept as code so its diff stays readable)."""

import nbformat as nbf

nb = nbf.v4.new_notebook()
cells = [
    nbf.v4.new_markdown_cell(
        "# Inspect a priming subset\n\n"
        "Pick a run directory written by `primer subset` (or `make demo`). Per class: the retrieved "
        "images with their captions, match terms, CLIP scores and why each was kept or dropped; "
        "per-class counts through the stages; the accuracy table. Nothing is recomputed: this reads "
        "the stages' files. `primer report RUN_DIR` writes the same views as one HTML page."
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
        "from IPython.display import Markdown, display\n"
        "from PIL import Image\n"
        "from pipeline.report.page import collect_run\n"
        "\n"
        "run = collect_run(RUN_DIR, per_class=PER_CLASS)\n"
        "if run.untrained:\n"
        "    display(Markdown('**Untrained model weights: scores and accuracies are meaningless.**'))\n"
        "print(f'{len(run.classnames)} classes in {RUN_DIR}')"
    ),
    nbf.v4.new_markdown_cell("## Images per class through the stages"),
    nbf.v4.new_code_cell(
        "counts = pd.DataFrame(run.counts, index=pd.Index(run.classnames, name='class'))\n"
        "counts.loc['total'] = counts.sum()\n"
        "counts"
    ),
    nbf.v4.new_markdown_cell("## Accuracy"),
    nbf.v4.new_code_cell(
        "display(Markdown(run.results_md or '_no evaluation in this run directory_'))"
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
nb["cells"] = cells
nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/inspect_subset.ipynb")

"""Find labels flipped on purpose from k-fold out-of-fold predictions (ftlab.crossval.label_issues, cleanlab).

    python scripts/label_issues_demo.py [--out /tmp/label_issues_demo] [--flip 0.03] [overrides ...]

Writes scikit-learn's 1,797 handwritten digits (8x8, 10 classes; the UCI set) as an image folder with a share of
the labels flipped to another digit (seeded), runs a 5-fold sweep of ``model=tiny_resnet`` on it with ftlab, asks
``label_issues`` for the likely label errors and reports how many of the flipped examples it ranks near the top,
with a figure of the first 24 (docs/label_issues_digits.png). Needs ``pip install 'ftlab[cleanlab]'``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]


def write_digits(root: Path, flip: float, seed: int) -> tuple[list[Path], set[Path]]:
    """The digits as ``root/<label>/digit_<i>.png``, a ``flip`` share with a wrong label; (files in the order
    ftlab reads them, the flipped files)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    labels = digits.target.copy()
    flipped = rng.choice(len(labels), size=round(flip * len(labels)), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    wrong = set()
    for i, (image, label) in enumerate(zip(digits.images, labels, strict=True)):
        path = root / str(label) / f"digit_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(path)
        if i in set(flipped.tolist()):
            wrong.add(path)
    # ftlab's image_folder order: class folders sorted, files sorted within each
    files = [f for d in sorted(p for p in root.iterdir() if p.is_dir()) for f in sorted(d.glob("*.png"))]
    return files, wrong


def figure(issues, files: list[Path], wrong: set[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = issues.head(24)
    fig, axes = plt.subplots(3, 8, figsize=(12, 5.4))
    for ax, (_, row) in zip(axes.flat, shown.iterrows(), strict=False):
        path = files[int(row["index"])]
        ax.imshow(np.asarray(Image.open(path)), cmap="gray_r")
        color = "tab:red" if path in wrong else "black"
        ax.set_title(f"given {path.parent.name}, model {int(row['predicted'])}", fontsize=8, color=color)
        ax.axis("off")
    fig.suptitle("Likely label errors, most likely first (red: flipped on purpose)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/label_issues_demo"))
    parser.add_argument("--flip", type=float, default=0.03)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "label_issues_digits.png")
    parser.add_argument("overrides", nargs="*", help="more ftlab-train overrides")
    args = parser.parse_args()
    root = args.out / "digits"
    files, wrong = write_digits(root, args.flip, seed=0)
    sweep = args.out / "sweep"
    command = [
        sys.executable, "-m", "ftlab.train", "-m", "data=image_folder", f"data.root={root}",
        "model=tiny_resnet", "data.augment=none", "data.num_workers=0", "data.folds=5", "data.fold=range(5)",
        "trainer.max_epochs=10", "optimizer.lr=3e-3", "callbacks.early_stopping=null",
        "callbacks.progress_bar.kind=log", f"paths.cache_dir={args.out}/cache", f"hydra.sweep.dir={sweep}",
        *args.overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start

    from ftlab.crossval import collect_oof, label_issues

    oof = collect_oof(sweep)
    in_pool = {files[i] for i in oof["index"]} & wrong  # flipped examples outside the held-out test split
    issues = label_issues(sweep, top=None)
    ranked = [files[int(i)] for i in issues["index"]]
    top = ranked[: len(in_pool)]
    accuracy = float((oof["label"] == oof["predicted"]).mean())
    print(f"\n5 folds in {seconds:.0f} s; out-of-fold accuracy {accuracy:.3f} on {len(oof)} examples")
    print(f"flipped in the pool: {len(in_pool)}; cleanlab flags {len(issues)} examples")
    print(
        f"flipped among the flagged: {len(set(ranked) & in_pool)} ({len(set(ranked) & in_pool) / len(in_pool):.0%})"
    )
    print(
        f"flipped among the top {len(in_pool)}: {len(set(top) & in_pool)} ({len(set(top) & in_pool) / len(in_pool):.0%})"
    )
    figure(issues, files, wrong, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()

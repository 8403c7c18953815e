"""Write the defaults panel's datasets (issue #20) in the formats a user brings, from the embedded data.

    python scripts/defaults_panel_data.py <folder>

Writes, under <folder>:
  mnist5k/<digit>/<n>.png       MNIST-5k at its native 28 px (an image folder)
  digits/<digit>/<n>.png        sklearn's 8x8 digits (1,797 images, native 8 px)
  lfw_faces/<class>/<n>.png     LFW faces vs non-faces (200 images, 25 px)
  rotten_tomatoes.csv           text,label (fresh / rotten)
  debates_2016.csv              text,label (the speaker's party)
  noun_share.csv                text,target: the share of a sentence's tokens tagged as nouns (NN*) in the
                                POS-tagged OANC sentences (a regression target a model must read the text for)
  wnut16.conll                  token<TAB>tag, WNUT-16 tweets (BIO entities)
No preset was tuned on any of these files; the panel trains on them with data=image_folder / text_files /
token_files and the defaults only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def images(out: Path) -> None:
    from ftlab.data.image_sources import load_embedded

    for name in ("mnist5k", "digits", "lfw_faces"):
        pixels, labels = load_embedded(name)["train"]
        for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            folder = out / name / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"{index:05d}.png")


def texts(out: Path) -> None:
    from ftlab.data.sources import EMBEDDED_TEXT

    for name in ("rotten_tomatoes", "debates_2016"):
        EMBEDDED_TEXT[name]().to_csv(out / f"{name}.csv", index=False)


def noun_share(out: Path, limit: int = 4000) -> None:
    from ftlab.data.token_sources import pos_oanc

    rows = []
    for words, tags in pos_oanc(None):
        if len(words) >= 5:
            share = sum(tag.startswith("NN") for tag in tags) / len(tags)
            rows.append({"text": " ".join(words), "target": round(share, 4)})
        if len(rows) == limit:
            break
    pd.DataFrame(rows).to_csv(out / "noun_share.csv", index=False)


def wnut(out: Path) -> None:
    from ftlab.data.token_sources import wnut16

    lines = []
    for words, tags in wnut16():
        lines += [f"{word}\t{tag}" for word, tag in zip(words, tags, strict=True)] + [""]
    (out / "wnut16.conll").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    images(out)
    texts(out)
    noun_share(out)
    wnut(out)
    print(f"panel data written to {out}")


if __name__ == "__main__":
    main()

"""Console entry points (placeholder while the fast path is written)."""

from __future__ import annotations


def train() -> None:
    from ftlab.train import main

    main()


def evaluate() -> None:
    from ftlab.evaluate import main

    main()


def predict() -> None:
    from ftlab.predict import main

    main()


def export() -> None:
    from ftlab.export import main

    main()


def report() -> None:
    from ftlab.report import main

    main()

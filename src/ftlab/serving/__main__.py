"""``python -m ftlab.serving run=...``, the same as ``ftlab-serve``."""

from ftlab.serving.server import main

if __name__ == "__main__":
    main()

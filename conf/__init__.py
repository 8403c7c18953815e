"""ftlab's config tree. This file only makes the folder the package ``ftlab.conf`` (pyproject.toml maps it), so
pip installs the YAML files with ftlab and Hydra finds them as ``pkg://ftlab.conf`` in any environment."""

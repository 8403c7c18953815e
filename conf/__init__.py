"""ftlab's config tree. This file only makes the folder the package ``ftlab.conf`` (pyproject.toml maps it), so
pip installs the YAML files with ftlab and Hydra finds them as ``pkg://ftlab.conf`` in any environment."""

from ftlab.search import register_sweeper

register_sweeper()  # hparams_search=optuna's sweeper (hydra/sweeper=ftlab_optuna), also in an editable install

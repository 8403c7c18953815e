"""ftlab's Hydra sweeper on current Optuna (``hydra/sweeper=ftlab_optuna``; ``hparams_search=optuna`` picks it)."""

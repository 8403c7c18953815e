"""The run layer: the run folder's files (``folder``), rebuilding a trained module from one (``rebuild``) and sweep
jobs (``jobs``). The only code that names run-folder files."""

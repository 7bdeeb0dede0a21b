"""The commands: ``ftlab`` (the Hydra app), ``ftlab-predict``, ``ftlab-merge``,
``ftlab-runs`` and ``ftlab-sweep``."""

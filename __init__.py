"""fedtune: federated fine-tuning of language models.

The subpackages live in the top-level folders of the source tree (`strategies/`, `tasks/`,
`protos/`, `fedserver/`, `fedclient/`, `simulations/`); setuptools maps them under this one
`fedtune` name, so a user's own `tasks.py` or another package's `strategies` never shadows ours.
"""

__version__ = "0.1.0"

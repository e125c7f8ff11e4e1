"""The task layer: models, tokenisation, data, partitioning, evaluation, local training and thread counts.

Strategies, the server, the client and the simulator all import this package; it imports none of
them, so there are no cycles.
"""

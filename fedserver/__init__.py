"""The coordinator: the round engine shared with fedsim, and (with the transport) the gRPC server."""

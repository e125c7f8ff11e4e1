"""The protocol's size limits: the server's config holds them and sends them to every client.

Apart from the payload code so that a server config validates without torch or grpc loaded.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedtune.protos import fedtune_pb2 as pb

MiB = 1 << 20
MAX_DETAILS_BYTES = 1024  # a status message's cap: percent-encoded, it stays far below gRPC's metadata limit


class Limits(BaseModel):
    """Explicit size limits of the protocol; the server sends its values to every client."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    chunk_bytes: int = Field(2 * MiB, ge=1024, description="Largest data chunk of a payload stream.")
    max_message_bytes: int = Field(8 * MiB, ge=64 * 1024, description="Largest single gRPC message (both ways).")
    max_update_bytes: int = Field(1024 * MiB, ge=1, description="Largest tensor payload of one ClientUpdate.")
    max_tensors: int = Field(4096, ge=1, description="Most tensors in one ClientUpdate.")
    max_metrics: int = Field(256, ge=0, description="Most entries in ClientUpdate.metrics.")
    max_name_bytes: int = Field(512, ge=1, description="Longest tensor or metric name, in UTF-8 bytes.")
    max_num_examples: int = Field(
        1_000_000, ge=1, description="Largest num_examples an update may claim: it is the update's aggregation "
                                     "weight, so one client cannot outweigh the rest by claiming more.")
    max_uploads_per_client: int = Field(2, ge=1, description="PushUpdate streams one client may have open at once.")
    upload_idle_ms: int = Field(60_000, ge=100, description="A PushUpdate stream silent this long is cancelled "
                                                            "and its memory freed.")

    @model_validator(mode="after")
    def _chunk_fits_in_a_message(self) -> Limits:
        if self.max_message_bytes < self.chunk_bytes + 64 * 1024:
            raise ValueError(
                f"limits.max_message_bytes ({self.max_message_bytes}) must exceed limits.chunk_bytes "
                f"({self.chunk_bytes}) by at least 64 KiB of framing"
            )
        return self

    def to_proto(self) -> pb.Limits:
        return pb.Limits(**self.model_dump())

    @classmethod
    def from_proto(cls, message: pb.Limits) -> Limits:
        return cls(**{name: getattr(message, name) for name in cls.model_fields})

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC's own message caps, set explicitly on both ends (gRPC's default is 4 MiB receive)."""
        return [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes)]


def status_details(message: str) -> str:
    """`message` cut to MAX_DETAILS_BYTES of UTF-8: a longer status would exceed the client's metadata
    limit, and gRPC would replace the documented code with an opaque INTERNAL."""
    encoded = message.encode()
    if len(encoded) <= MAX_DETAILS_BYTES:
        return message
    return f"{encoded[:MAX_DETAILS_BYTES].decode(errors='ignore')}... (message cut from {len(encoded)} bytes)"

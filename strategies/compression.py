"""The `[compression]` wrapper: compressed client updates (and optionally downlinks), negotiated per client.

Client: the inner strategy trains as usual; each floating-point update tensor is turned into its
delta against the instruction's tensor (ComPEFT compresses θ_i − θ^t, docs/algorithms.md §5.4), the
residual of earlier rounds is added (error feedback, Stich et al. 2018, arXiv:1809.07599) and the
result is encoded by `fedtune.strategies.codecs` into a uint8 blob sent as `<name>|enc`; what the codec
dropped becomes the new residual, kept in the client's state. Server: each blob is decoded and
added back to the tensor that client was sent, so the inner strategy validates and aggregates full
tensors and needs no change. Non-float tensors pass untouched. With `downlink` set, the server also
sends the global float tensors encoded (with a codec marked `Codec.downlink`: fp16, bf16, int8), and
the client's delta is taken against exactly what it decoded, so both sides agree bit for bit.

Negotiation: a client's codec is `by_client[id]`, else `by_compute_class[its compute_class]`, else
`codec`; if its device profile does not list that codec, the first of `fallback` it lists ("none"
always works). A client that never registered has the default profile, which lists only "none".
fedsim registers its virtual clients with every codec (`fedtune.strategies.codecs.SUPPORTED_CODECS`) unless
its `[devices]` section says otherwise. The chosen codec and its non-default parameters travel in
`Instruction.settings` under `compression.*`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import Field, ValidationError

from fedtune.strategies.api import (
    ClientStrategy,
    ClientUpdate,
    DeviceProfile,
    Instruction,
    InvalidInstruction,
    InvalidUpdate,
    ReplyContract,
    ReplyValues,
    RunContext,
    ServerStrategy,
    Setting,
    StrategyDefinition,
    TensorMap,
    TensorSpec,
    Workspace,
    check_tensors,
    hash_seed,
)
from fedtune.strategies.codecs import (
    CodecError,
    CodecName,
    CodecParams,
    DownlinkCodecName,
    decode,
    encode,
    within_range,
)
from fedtune.strategies.wrappers import ClientWrapper, ServerWrapper
from fedtune.tasks.data import TokenDataset

ENCODED_SUFFIX = "|enc"
SETTING_PREFIX = "compression."


class Config(CodecParams):
    """The `[compression]` section: which codec each client uses, and the codecs' parameters."""

    codec: CodecName = Field("int8", description="Uplink codec for clients no rule names.")
    by_compute_class: dict[str, CodecName] = Field(
        default_factory=dict, description="Uplink codec by the device profile's compute_class, e.g. phone."
    )
    by_client: dict[str, CodecName] = Field(default_factory=dict, description="Uplink codec by client id.")
    fallback: tuple[CodecName, ...] = Field(
        ("int8", "fp16", "none"), description="Tried in order when a client's profile lacks the chosen codec."
    )
    error_feedback: bool = Field(True, description="Keep what the codec dropped and add it next round.")
    downlink: DownlinkCodecName = Field(
        "none", description="Codec for the global tensors sent to clients: one of `codecs.DOWNLINK_CODECS`."
    )

    def codec_params(self) -> CodecParams:
        return CodecParams.model_validate(self.model_dump(include=set(CodecParams.model_fields)))


class CodecSettings(CodecParams):
    """One client's codec for one round, as it travels in `Instruction.settings` (prefixed)."""

    codec: CodecName
    error_feedback: bool = True

    def to_settings(self) -> dict[str, Setting]:
        """Every field, defaults included: a client must not need to know Python's defaults."""
        return {SETTING_PREFIX + key: value for key, value in self.model_dump().items()}

    @classmethod
    def from_instruction(cls, instruction: Instruction) -> tuple[CodecSettings, dict[str, Setting]]:
        """The codec settings and the remaining (inner strategy's) settings."""
        ours = {key.removeprefix(SETTING_PREFIX): value for key, value in instruction.settings.items()
                if key.startswith(SETTING_PREFIX)}
        rest = {key: value for key, value in instruction.settings.items() if not key.startswith(SETTING_PREFIX)}
        try:
            return cls.model_validate(ours), rest
        except ValidationError as error:
            item = error.errors()[0]
            field = SETTING_PREFIX + ".".join(map(str, item["loc"]))
            raise InvalidInstruction(f"instruction {field}: {item['msg']}") from error


def compress_with_feedback(delta: torch.Tensor, residual: torch.Tensor | None, codec: str, params: CodecParams,
                           name: str, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `delta + residual`; return the blob and the new residual (what the codec dropped).

    Error feedback (EF-SGD, Karimireddy et al. 2019, arXiv:1901.09847): e_{t+1} = x_t − D(C(x_t)) with
    x_t = Δ_t + e_t, so Σ_t D(C(x_t)) = Σ_t Δ_t − e_{T+1}: the decoded updates track the true ones.
    """
    target = delta if residual is None or residual.shape != delta.shape else delta + residual
    blob = encode(within_range(codec, target), target, params, name=name, generator=generator)
    return blob, target - decode(blob, name=name).to(torch.float32)


@dataclass(frozen=True)
class Sent:
    """What the server told one client in one round: the codec and the tensors its delta is taken against."""

    round: int
    codec: str
    tensors: TensorMap


def _shape_matches(spec: TensorSpec, shape: torch.Size) -> bool:
    return len(spec.shape) == len(shape) and all(
        want is None or want == got for want, got in zip(spec.shape, shape, strict=False)
    )


class CompressionServer(ServerWrapper):
    """Chooses each client's codec, encodes downlinks, decodes replies before the inner strategy sees them."""

    def __init__(self, inner: ServerStrategy, config: Config):
        super().__init__(inner)
        self.compression = config
        self.profiles: dict[str, DeviceProfile] = {}
        self._sent: dict[str, Sent] = {}
        self._decoded: dict[str, tuple[ClientUpdate, ClientUpdate]] = {}

    def on_client_registered(self, client_id: str, profile: DeviceProfile) -> None:
        self.profiles[client_id] = profile
        super().on_client_registered(client_id, profile)

    def _supports(self, client_id: str, codec: str) -> bool:
        return codec == "none" or codec in self.profiles.get(client_id, DeviceProfile()).codecs

    def codec_for(self, client_id: str) -> str:
        """The uplink codec negotiated for `client_id` (see the module docstring)."""
        config = self.compression
        profile = self.profiles.get(client_id, DeviceProfile())
        wanted = config.by_client.get(client_id) or config.by_compute_class.get(profile.compute_class)
        for candidate in (wanted or config.codec, *config.fallback):
            if self._supports(client_id, candidate):
                return candidate
        return "none"

    def downlink_for(self, client_id: str) -> str:
        return self.compression.downlink if self._supports(client_id, self.compression.downlink) else "none"

    def instruction(self, round: int, client_id: str) -> Instruction:
        inner = self.inner.instruction(round, client_id)
        downlink = self.downlink_for(client_id)
        downlink_params = CodecParams(block_size=self.compression.block_size)
        tensors: TensorMap = {}
        base: TensorMap = {}
        for name, tensor in inner.tensors.items():
            if downlink == "none" or not tensor.is_floating_point():
                tensors[name] = base[name] = tensor
            else:
                encoded = encode(within_range(downlink, tensor), tensor, downlink_params, name=name)
                tensors[name + ENCODED_SUFFIX] = encoded
                base[name] = decode(encoded, name=name)
        uplink = CodecSettings(
            codec=self.codec_for(client_id), error_feedback=self.compression.error_feedback,
            **self.compression.codec_params().model_dump(),
        )
        self._sent[client_id] = Sent(round=round, codec=uplink.codec, tensors=base)
        return Instruction(round=round, tensors=tensors, settings={**inner.settings, **uplink.to_settings()})

    def update_specs(self) -> dict[str, TensorSpec]:
        return self.encoded_specs(self.inner.update_specs())

    def client_update_specs(self, client_id: str) -> dict[str, TensorSpec]:
        return self.encoded_specs(self.inner.client_update_specs(client_id))

    @staticmethod
    def encoded_specs(inner: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A compressed reply: each float tensor as a 1-D uint8 blob `<name>|enc`, others unchanged.
        (A client negotiated to "none" sends the inner strategy's tensors as they are.)"""
        specs = {}
        for name, spec in inner.items():
            if spec.dtype.is_floating_point:
                specs[name + ENCODED_SUFFIX] = TensorSpec(shape=(None,), dtype=torch.uint8)
            else:
                specs[name] = spec
        return specs

    def reply_contract(self, client_id: str) -> ReplyContract:
        """The inner contract, or, under a codec, each float tensor's delta (trained − received) as a blob."""
        inner = self.inner.reply_contract(client_id)
        codec = self.codec_for(client_id)
        if codec == "none":
            return inner
        return ReplyContract(
            tensors=self.client_update_specs(client_id), values=ReplyValues.DELTA, codec=codec,
            doc=f"each float tensor's change (trained − received) encoded with {codec} as `<name>{ENCODED_SUFFIX}`, "
                f"other tensors as they are; the values before encoding: {inner.doc}",
        )

    def _sent_to(self, client_id: str, round: int) -> Sent:
        """What `client_id` was told this round (re-derived if this server did not tell it, e.g. after a restart)."""
        sent = self._sent.get(client_id)
        if sent is None or sent.round != round:
            self.instruction(round, client_id)
        return self._sent[client_id]

    def decode_update(self, update: ClientUpdate, round: int) -> ClientUpdate:
        """The update with full tensors (sent tensor + decoded delta); InvalidUpdate naming the tensor."""
        origin = f"update from {update.client_id!r}"
        if update.round != round:
            raise InvalidUpdate(f"{origin}: round {update.round} is not the current round {round}")
        sent = self._sent_to(update.client_id, round)
        if sent.codec == "none":
            return update
        check_tensors(update.tensors, self.client_update_specs(update.client_id), origin)
        tensors: TensorMap = {}
        for name, spec in self.inner.client_update_specs(update.client_id).items():
            if not spec.dtype.is_floating_point:
                tensors[name] = update.tensors[name]
                continue
            try:
                delta = decode(update.tensors[name + ENCODED_SUFFIX], name=name).to(torch.float32)
            except CodecError as error:
                raise InvalidUpdate(f"{origin}: {error}") from error
            base = sent.tensors.get(name)
            if not _shape_matches(spec, delta.shape) or (base is not None and base.shape != delta.shape):
                raise InvalidUpdate(
                    f"{origin}: tensor {name!r} decodes to shape {tuple(delta.shape)}, expected {spec.shape}"
                )
            tensors[name] = (delta if base is None else base.to(torch.float32) + delta).to(spec.dtype)
        return update.model_copy(update={"tensors": tensors})

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        decoded = self.decode_update(update, round)
        self.inner.validate_update(decoded, round)
        self._decoded[update.client_id] = (update, decoded)

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        decoded = []
        for update in updates:
            cached = self._decoded.get(update.client_id)
            if cached is not None and cached[0] is update:
                decoded.append(cached[1])
            else:
                decoded.append(self.decode_update(update, round))
        self.inner.aggregate(round, decoded)
        self._decoded.clear()
        self._sent.clear()

    def state_dict(self) -> dict[str, Any]:
        profiles = {cid: profile.model_dump(mode="json") for cid, profile in self.profiles.items()}
        return {**super().state_dict(), "profiles": profiles}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.profiles = {cid: DeviceProfile.model_validate(p) for cid, p in state["profiles"].items()}
        self._sent.clear()
        self._decoded.clear()


class CompressionClient(ClientWrapper):
    """Decodes the downlink, lets the inner client train, encodes the update delta with error feedback."""

    def __init__(self, inner: ClientStrategy):
        super().__init__(inner)
        self.residual: TensorMap = {}

    def decoded(self, instruction: Instruction) -> tuple[CodecSettings, Instruction]:
        """The uplink settings, and the instruction the inner half would have got uncompressed."""
        settings, inner_settings = CodecSettings.from_instruction(instruction)
        received: TensorMap = {}
        for name, tensor in instruction.tensors.items():
            if name.endswith(ENCODED_SUFFIX):
                plain = name.removesuffix(ENCODED_SUFFIX)
                try:
                    received[plain] = decode(tensor, name=plain)
                except CodecError as error:
                    raise InvalidInstruction(f"instruction: {error}") from error
            else:
                received[name] = tensor
        return settings, Instruction(round=instruction.round, tensors=received, settings=inner_settings)

    def receive(self, workspace: Workspace, instruction: Instruction) -> None:
        self.inner.receive(workspace, self.decoded(instruction)[1])

    def fit(self, workspace: Workspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        settings, inner_instruction = self.decoded(instruction)
        received = inner_instruction.tensors
        update = self.inner.fit(workspace, inner_instruction, data)
        if settings.codec == "none":
            return update
        generator = torch.Generator().manual_seed(hash_seed(self.context.seed, self.client_id, update.round, "codec"))
        tensors: TensorMap = {}
        for name, tensor in update.tensors.items():
            if not tensor.is_floating_point():
                tensors[name] = tensor
                continue
            sent = received.get(name)
            delta = tensor.to(torch.float32) - (0 if sent is None else sent.to(torch.float32))
            residual = self.residual.get(name) if settings.error_feedback else None
            codec = settings.codec if delta.numel() >= settings.dense_below else "fp16"
            blob, dropped = compress_with_feedback(delta, residual, codec, settings, name, generator)
            tensors[name + ENCODED_SUFFIX] = blob
            if settings.error_feedback:
                self.residual[name] = dropped
        return update.model_copy(update={"tensors": tensors})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "residual": {name: t.clone() for name, t in self.residual.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.residual = {name: t.clone() for name, t in state["residual"].items()}


def wrap(definition: StrategyDefinition, config: Config) -> StrategyDefinition:
    """`definition` with compressed updates; its config and workspace are unchanged."""

    def server(strategy_config: Any, context: RunContext) -> CompressionServer:
        return CompressionServer(definition.server(strategy_config, context), config)

    def client(strategy_config: Any, context: RunContext, client_id: str) -> CompressionClient:
        return CompressionClient(definition.client(strategy_config, context, client_id))

    return replace(
        definition, server=server, client=client,
        summary=f"{definition.summary} Updates compressed with {config.codec} (negotiated per client).",
    )

"""The relay's frames between the gRPC front process and the gateway."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from bastion.gateway.rpc import relay
from bastion.gateway.rpc.server import GrpcServer
from bastion.gateway.settings import Settings


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def link(limit: int = 1 << 20) -> tuple[relay.FrameProtocol, list[tuple[int, int, bytes]], Any]:
    frames: list[tuple[int, int, bytes]] = []
    protocol = relay.FrameProtocol(lambda k, c, p: frames.append((k, c, p)), lambda e: None, limit)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, frames, transport


def test_frames_split_anywhere_in_the_byte_stream_arrive_whole_and_in_order() -> None:
    sender, _, wire = link()
    sender.send(relay.MESSAGE, 7, b"x" * 1000)
    sender.send(relay.HALF_CLOSE, 7)
    sender.send(relay.END, 9, b"done")
    data = bytes(wire.written)
    for step in (1, 3, 9, 10, 4096):
        receiver, frames, _ = link()
        for at in range(0, len(data), step):
            receiver.data_received(data[at : at + step])
        assert frames == [(relay.MESSAGE, 7, b"x" * 1000), (relay.HALF_CLOSE, 7, b""),
                          (relay.END, 9, b"done")]  # fmt: skip


def test_a_frame_over_the_limit_closes_the_relay_before_it_is_buffered() -> None:
    receiver, frames, transport = link(limit=100)
    receiver.data_received(relay.HEADER.pack(101, relay.MESSAGE, 1) + b"y" * 10)
    assert transport.closed and frames == []


def test_a_unary_call_keeps_its_metadata_peer_deadline_and_bytes() -> None:
    opening = relay.Opening(
        "/inference.GRPCInferenceService/ModelInfer",
        [("x-client-id", "ana"), ("authorization", "Bearer k\u00e9y")],
        "ipv6:[::1]:5000",
        1.5,
    )
    message = bytes(range(256)) * 3
    got, raw = relay.decode_unary(relay.encode_unary(opening, message))
    assert got == opening and raw == message
    assert relay.Opening.decode(relay.Opening("/m", [], "", None).encode()).remaining_s is None


def test_an_ending_carries_binary_trailing_metadata_and_the_reply() -> None:
    ending = relay.Ending(
        7, "refused: contained", (("grpc-status-details-bin", b"\x00\xff\x10"), ("k", "v")), b"r"
    )
    assert relay.Ending.decode(ending.encode()) == ending
    assert relay.Ending.decode(relay.Ending(reply=b"\x00" * 5).encode()).reply == b"\x00" * 5


@pytest.mark.parametrize("junk", [b"", b"\x00", b"[1,2]", b"not json"])
def test_a_malformed_opening_raises_value_error(junk: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        relay.Opening.decode(junk)


def test_a_call_cancelled_in_the_same_read_that_opened_it_is_forgotten_with_its_bytes() -> None:
    """A task cancelled before its first step never runs its body: the call must still go."""

    async def scenario() -> dict[int, Any]:
        settings = Settings()
        server = GrpcServer(settings, SimpleNamespace(settings=settings))
        gateway_end, _, _ = link()
        ready = asyncio.get_running_loop().create_future()
        opening = relay.Opening("/inference.GRPCInferenceService/ModelInfer", [], "ipv4:1:2", None)
        for call in range(1, 51):
            frame = relay.encode_unary(opening, b"x" * 100_000)
            server._on_frame(relay.UNARY, call, frame, gateway_end, ready)
            server._on_frame(relay.CANCEL, call, b"", gateway_end, ready)
        for _ in range(3):
            await asyncio.sleep(0)
        return server.calls

    assert asyncio.run(scenario()) == {}

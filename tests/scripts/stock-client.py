#!/usr/bin/env python3
"""A stock gRPC client against a skymirror daemon: Python grpcio only, no
generated code and no skymirror package.

Usage: stock-client.py HOST:PORT CA_FILE  (the token in SKYMIRROR_TOKEN)

It checks the health service, lists the services through server reflection
v1alpha (what grpcio-reflection and older grpcurl speak), and calls
ControlService/ListProviders without a token (refused) and with it (served).
It prints one line per check and exits non-zero on the first failure.
"""

import os
import sys

import grpc


def field_string(number: int, text: str) -> bytes:
    """A protobuf length-delimited field (short strings only)."""
    data = text.encode()
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


def identity(b: bytes) -> bytes:
    return b


def main() -> int:
    target, ca_file = sys.argv[1], sys.argv[2]
    token = os.environ["SKYMIRROR_TOKEN"]
    with open(ca_file, "rb") as f:
        tls = grpc.ssl_channel_credentials(root_certificates=f.read())
    with_token = grpc.composite_channel_credentials(
        tls, grpc.access_token_call_credentials(token)
    )

    with grpc.secure_channel(target, tls) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=identity,
            response_deserializer=identity,
        )
        # HealthCheckResponse{status: SERVING (1)}: field 1, varint 1.
        answer = check(b"", timeout=10)
        if answer != b"\x08\x01":
            print(f"health: unexpected answer {answer!r}")
            return 1
        print("health: SERVING")

        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=identity,
            response_deserializer=identity,
        )
        # ServerReflectionRequest{list_services: ""}: field 7.
        answers = list(reflect(iter([field_string(7, "")]), timeout=10))
        listed = b"".join(answers)
        for service in (b"skymirror.v1.ControlService", b"skymirror.v1.AgentService"):
            if service not in listed:
                print(f"reflection v1alpha: {service.decode()} not listed: {listed!r}")
                return 1
        print("reflection v1alpha: lists skymirror.v1.ControlService and skymirror.v1.AgentService")

        providers = channel.unary_unary(
            "/skymirror.v1.ControlService/ListProviders",
            request_serializer=identity,
            response_deserializer=identity,
        )
        try:
            providers(b"", timeout=10)
            print("ListProviders without a token: served, expected UNAUTHENTICATED")
            return 1
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                print(f"ListProviders without a token: {e.code()}, expected UNAUTHENTICATED")
                return 1
            print(f"ListProviders without a token: UNAUTHENTICATED ({e.details()})")

    with grpc.secure_channel(target, with_token) as channel:
        providers = channel.unary_unary(
            "/skymirror.v1.ControlService/ListProviders",
            request_serializer=identity,
            response_deserializer=identity,
        )
        providers(b"", timeout=10)
        print("ListProviders with the token: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A client of Istio's certificate service built from Istio's proto with
Python's grpcio (an implementation independent of ours: C-core's HTTP/2,
BoringSSL, upb protobuf). Prints one JSON line: the chain, or the error.

Usage: ca_client.py ADDRESS ROOTS TOKEN_FILE CSR_FILE IDENTITY
"""

import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent


def stubs():
    """Generates the messages and stubs from ca.proto into a temporary
    directory and imports them."""
    out = tempfile.mkdtemp(prefix="mesh-ca-proto-")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main([
        "protoc",
        f"-I{HERE.parent / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "ca.proto",
    ])
    if status != 0:
        raise SystemExit(f"protoc failed: {status}")
    sys.path.insert(0, out)
    import ca_pb2, ca_pb2_grpc  # noqa: E401 (generated just now)
    return ca_pb2, ca_pb2_grpc


def main():
    address, roots, token_file, csr_file, identity = sys.argv[1:6]
    ca_pb2, ca_pb2_grpc = stubs()
    credentials = grpc.ssl_channel_credentials(pathlib.Path(roots).read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        client = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        request = ca_pb2.IstioCertificateRequest(
            csr=pathlib.Path(csr_file).read_text(),
            validity_duration=3600,
        )
        request.metadata.update({"ImpersonatedIdentity": identity})
        token = pathlib.Path(token_file).read_text().strip()
        try:
            answer = client.CreateCertificate(
                request,
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
            print(json.dumps({"cert_chain": list(answer.cert_chain)}))
        except grpc.RpcError as error:
            print(json.dumps({"code": error.code().name, "details": error.details()}))


if __name__ == "__main__":
    main()

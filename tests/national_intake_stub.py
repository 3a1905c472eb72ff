"""A stand-in for the national aggregator's intake, run as a process of its own by the cell's
tests: `POST /snapshots` as the protocol of docs/national.md states it (Ed25519 signature over
the exact bytes, sequence numbers taken once and in order), and `GET /received`, what it took.

    python -m tests.national_intake_stub PORT CELL PUBLIC_KEY_PEM [--taken SEQ:SHA256 ...]

`--taken` starts it as if it had taken those snapshots already (a replay test). Memory only: a
restart forgets everything, as an aggregator restored from an old backup would.
"""

import argparse
import base64
import hashlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from national.format import CELL_HEADER, SIGNATURE_HEADER, SIGNATURE_PREFIX, Snapshot

PROBLEM = "https://iiot.example/problems/"


class Intake:
    def __init__(self, cell: str, key: Ed25519PublicKey, taken: dict[int, str]) -> None:
        self.cell = cell
        self.key = key
        self.lock = Lock()
        self.digests = dict(taken)  # sequence -> sha256 of the bytes taken
        self.bodies: list[dict[str, Any]] = []  # accepted snapshots, in order
        self.refused: list[str] = []

    @property
    def next_sequence(self) -> int:
        return max(self.digests, default=0) + 1

    def take(self, cell: str, signature: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if cell != self.cell:
                return self._refuse(403, "unknown-cell")
            try:
                self.key.verify(base64.b64decode(signature.removeprefix(SIGNATURE_PREFIX)), body)
            except (InvalidSignature, ValueError):
                return self._refuse(401, "bad-signature")
            try:
                snapshot = Snapshot.model_validate_json(body)
            except ValueError:
                return self._refuse(422, "invalid")
            n, digest = snapshot.sequence, hashlib.sha256(body).hexdigest()
            if n in self.digests:
                if self.digests[n] == digest:
                    return 200, {"status": "duplicate", "next_sequence": self.next_sequence}
                return self._refuse(409, "replayed")
            if n != self.next_sequence:
                return self._refuse(409, "out-of-order", next_sequence=self.next_sequence)
            self.digests[n] = digest
            self.bodies.append(json.loads(body))
            return 202, {"status": "accepted", "sequence": n, "next_sequence": n + 1}

    def _refuse(self, status: int, kind: str, **extra: Any) -> tuple[int, dict[str, Any]]:
        self.refused.append(kind)
        return status, {"type": PROBLEM + kind, "title": kind, "status": status, **extra}


def serve(port: int, intake: Intake) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, answer = intake.take(
                self.headers.get(CELL_HEADER, ""), self.headers.get(SIGNATURE_HEADER, ""), body
            )
            self._answer(status, answer)

        def do_GET(self) -> None:
            with intake.lock:
                self._answer(200, {"snapshots": intake.bodies, "refused": intake.refused})

        def _answer(self, status: int, document: dict[str, Any]) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            kind = "application/problem+json" if status >= 400 else "application/json"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("cell")
    parser.add_argument("public_key", type=Path)
    parser.add_argument("--taken", nargs="*", default=[])
    args = parser.parse_args()
    key = serialization.load_pem_public_key(args.public_key.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    taken = {int(s): d for s, d in (item.split(":") for item in args.taken)}
    serve(args.port, Intake(args.cell, key, taken))


if __name__ == "__main__":
    main()

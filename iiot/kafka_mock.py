"""librdkafka's mock cluster as a Kafka-protocol broker on loopback, for tests (no Kafka here).

`MockKafkaCluster` runs `python -m iiot.kafka_mock` in a helper process that keeps a
confluent-kafka producer (with `test.mock.num.brokers`) alive, reads the bootstrap address it
prints, and ends it when stopped. aiokafka produces, consumes and commits against it. Limits of
the mock (docs/testing.md): topics appear on first use with 4 partitions; a second group member
fails SyncGroup, so handover tests assign partitions explicitly.
"""

import subprocess
import sys
import time


class MockKafkaCluster:
    def __init__(self, brokers: int = 1) -> None:
        self._brokers = brokers
        self._process: subprocess.Popen[str] | None = None
        self.bootstrap = ""

    def start(self, timeout: float = 30) -> str:
        self._process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "iiot.kafka_mock", str(self._brokers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        deadline = time.monotonic() + timeout
        line = self._process.stdout.readline().strip()
        if not line or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError("the mock Kafka cluster did not report its address")
        self.bootstrap = line
        return line

    @property
    def pid(self) -> int | None:
        """The helper process running the cluster (benchmarks measure its CPU)."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is not None:
            if self._process.stdin is not None:
                self._process.stdin.close()  # the helper exits when its stdin closes
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None

    def __enter__(self) -> "MockKafkaCluster":
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _serve(brokers: int) -> None:
    from confluent_kafka import Producer  # noqa: PLC0415 - optional dependency

    producer = Producer({"test.mock.num.brokers": brokers, "bootstrap.servers": "unused"})
    metadata = producer.list_topics(timeout=10)
    addresses = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    print(addresses, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    producer.flush(1)


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 1)

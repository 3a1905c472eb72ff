"""The Kafka fixture: librdkafka's mock cluster speaks the Kafka protocol to aiokafka."""

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition


async def test_aiokafka_produces_consumes_and_commits(kafka: str, unique: str) -> None:
    topic = f"telemetry-{unique}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:
        for n in range(10):
            await producer.send_and_wait(topic, f"m{n}".encode(), key=b"demo/d1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka,
        group_id=f"g-{unique}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        received: list[bytes] = []
        partitions: set[TopicPartition] = set()
        while len(received) < 10:
            batches = await consumer.getmany(timeout_ms=5000)
            assert batches, "no records within 5 s"
            for partition, records in batches.items():
                partitions.add(partition)
                received += [r.value for r in records if r.value is not None]
                await consumer.commit({partition: records[-1].offset + 1})
        # One key, one partition: order is kept, and the commit is stored by the broker.
        assert received == [f"m{n}".encode() for n in range(10)]
        (partition,) = partitions
        assert await consumer.committed(partition) == 10
    finally:
        await consumer.stop()

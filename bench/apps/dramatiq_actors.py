"""The Dramatiq broker and actor of the benchmark (Redis broker, default middleware)."""

import dramatiq
from bench_common import LazyClient, latency_mode, record_task, redis_url
from dramatiq.brokers.redis import RedisBroker

dramatiq.set_broker(RedisBroker(url=redis_url()))

_client = LazyClient()
_record_start = latency_mode()


@dramatiq.actor(actor_name="bench_noop")
def noop(number: int) -> None:
    record_task(_client.get(), number, _record_start)

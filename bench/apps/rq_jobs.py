"""The RQ job function of the benchmark."""

from bench_common import LazyClient, latency_mode, record_task

QUEUE = "bench"

_client = LazyClient()
_record_start = latency_mode()


def noop(number: int) -> None:
    record_task(_client.get(), number, _record_start)

"""The Celery app of the benchmark: Redis broker, late acknowledgement, no result backend."""

from bench_common import LazyClient, latency_mode, record_task, redis_url
from celery import Celery

app = Celery("bench", broker=redis_url())
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    result_backend=None,
    broker_connection_retry_on_startup=True,
)

_client = LazyClient()
_record_start = latency_mode()


@app.task(name="bench.noop")
def noop(number: int) -> None:
    record_task(_client.get(), number, _record_start)

"""The monitor process: serves the checks of supervisor/monitor.py over HTTP.

The supervisor forks it like the intake and the mirror. It listens on `health.address`
and `health.port` with the standard library's ThreadingHTTPServer.
"""

import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import orjson

from shared import heartbeat
from shared.heartbeat import HeartbeatTable
from shared.process import stop_on_sigterm
from shared.settings import Config
from supervisor.monitor import Monitor
from worker.main import EXIT_BOOT_FAILURE

log = logging.getLogger(__name__)

# Seconds a client gets to send its request before the connection is closed.
REQUEST_TIMEOUT_SECONDS = 10.0
# Seconds between two heartbeats of the monitor's main loop.
LOOP_SECONDS = 0.5


class HealthHandler(BaseHTTPRequestHandler):
    server_version = "taskvisor-health"
    timeout = REQUEST_TIMEOUT_SECONDS
    server: "HealthServer"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        route = ROUTES.get(path)
        if route is None:
            self.send_json(404, {"error": f"not found: {path}", "paths": sorted(ROUTES)})
            return
        try:
            route(self)
        except Exception as exc:
            log.exception("health request failed path=%s", path)
            self.send_json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def send_json(self, code: int, body: dict) -> None:
        self.send_body(code, "application/json", orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")

    def send_body(self, code: int, content_type: str, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("health request from %s: %s", self.address_string(), format % args)


def _serve_json(check: Callable[["Monitor"], tuple[int, dict]]) -> Callable[[HealthHandler], None]:
    def serve(handler: HealthHandler) -> None:
        code, body = check(handler.server.monitor)
        handler.send_json(code, body)

    return serve


def _serve_metrics(handler: HealthHandler) -> None:
    text = handler.server.monitor.metrics()
    handler.send_body(200, "text/plain; version=0.0.4; charset=utf-8", text.encode("utf-8"))


ROUTES: dict[str, Callable[[HealthHandler], None]] = {
    "/healthz": _serve_json(Monitor.healthz),
    "/readyz": _serve_json(Monitor.readyz),
    "/status": _serve_json(Monitor.status),
    "/metrics": _serve_metrics,
}


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], monitor: Monitor) -> None:
        self.monitor = monitor
        super().__init__(address, HealthHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up with socket.getfqdn, which can
        # query DNS. The name is only used in CGI variables, so the address is used instead.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class HealthServer6(HealthServer):
    address_family = socket.AF_INET6


def endpoint_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class MonitorProcess:
    def __init__(self, config: Config, table: HeartbeatTable) -> None:
        self.config = config
        self.monitor = Monitor(config, table)
        self.stopping = False

    def run(self) -> int:
        stop_on_sigterm(self)
        settings = self.config.health
        server_class = HealthServer6 if ":" in settings.address else HealthServer
        try:
            server = server_class((settings.address, settings.port), self.monitor)
        except OSError as exc:
            log.error(
                "health endpoint cannot listen on %s: %s; stop the process that uses the port, or change "
                "health.port or health.address (health.enabled: false turns the endpoint off)",
                endpoint_url(settings.address, settings.port), exc,
            )  # fmt: skip
            self.monitor.close()
            return EXIT_BOOT_FAILURE
        host, port = server.server_address[:2]
        log.info("health endpoint listening url=%s pid=%d", endpoint_url(host, port), os.getpid())
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True)
        thread.start()

        parent = os.getppid()
        while not self.stopping:
            if os.getppid() != parent:
                log.warning("supervisor is gone; monitor exits pid=%d", os.getpid())
                break
            heartbeat.beat()
            # Reads the reconnect counters of processes before their slots are reused.
            self.monitor.flow.reconnects.collect()
            time.sleep(LOOP_SECONDS)
        server.shutdown()
        server.server_close()
        self.monitor.close()
        log.info("health endpoint stopped pid=%d", os.getpid())
        return 0


def monitor_main(config: Config, table: HeartbeatTable) -> int:
    """Entry point in a freshly forked child; returns the process exit code."""
    return MonitorProcess(config, table).run()

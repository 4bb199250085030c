"""Where the notification tests' messages go: an SMTP server (aiosmtpd) and a Slack-compatible incoming webhook (a
plain HTTP server), both on 127.0.0.1 on free ports, keeping everything they are sent."""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

FROM = "meshwave@example.test"


@dataclass(frozen=True)
class Mail:
    to: list[str]
    subject: str
    body: str


@dataclass
class NotifySink:
    mails: list[Mail] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)
    webhook_status: int = 200  # what the webhook answers (a test may make it fail)

    def __enter__(self) -> NotifySink:
        self.smtp_port = _free_port()
        self._smtp = Controller(_SmtpHandler(self), hostname="127.0.0.1", port=self.smtp_port)
        self._smtp.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _webhook_handler(self))
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._smtp.stop()
        self._http.shutdown()
        self._http.server_close()

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/services/T0/B0/meshwave"

    def connections(self, smtp_id: str, webhook_id: str) -> dict[str, dict[str, Any]]:
        """The two Airflow connections, as AirflowProcess / AIRFLOW_CONN_* take them."""
        return {smtp_id: {"conn_type": "smtp", "host": "127.0.0.1", "port": self.smtp_port,
                          "extra": {"disable_tls": True, "disable_ssl": True, "from_email": FROM, "timeout": 10,
                                    "retry_limit": 1}},
                webhook_id: {"conn_type": "slackwebhook", "password": self.webhook_url}}

    def texts(self) -> list[str]:
        return [str(p.get("text", "")) for p in self.posts]


class _SmtpHandler:
    def __init__(self, sink: NotifySink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        part = message.get_body(("html", "plain")) if message.is_multipart() else message
        self.sink.mails.append(Mail(list(envelope.rcpt_tos), str(message["subject"]),
                                    part.get_content() if part is not None else ""))
        return "250 OK"


def _webhook_handler(sink: NotifySink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            sink.posts.append(json.loads(body or b"{}"))
            self.send_response(sink.webhook_status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if sink.webhook_status == 200 else b"server_error")

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    return Handler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

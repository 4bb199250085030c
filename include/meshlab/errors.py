"""Kubernetes `Status` errors, raised anywhere in the lab and rendered by the API server."""

from __future__ import annotations

from typing import Any

REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
}


class ApiError(Exception):
    """An error the API answers with a `Status` object (`kind: Status`, `status: Failure`)."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # An empty reason stays empty: admission webhook denials carry none, and kubectl then prints no "(Reason)".
        self.reason = REASONS.get(code, "Unknown") if reason is None else reason
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        }
        if self.reason:
            body["reason"] = self.reason
        if self.details:
            body["details"] = self.details
        return body


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(
        404,
        f'{qualified} "{name}" not found',
        details={"name": name, "group": group, "kind": resource},
    )


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(
        409,
        f'{qualified} "{name}" already exists',
        reason="AlreadyExists",
        details={"name": name, "group": group, "kind": resource},
    )


def invalid(kind: str, name: str, causes: list[tuple[str, str]], group: str = "") -> ApiError:
    """422 Invalid with one cause per (field, message), worded like the real API server."""
    text = "; ".join(f"{field}: {msg}" for field, msg in causes)
    return ApiError(
        422,
        f'{kind} "{name}" is invalid: {text}',
        details={
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [{"reason": "FieldValueInvalid", "message": msg, "field": field} for field, msg in causes],
        },
    )


def webhook_denied(webhook: str, message: str) -> ApiError:
    """A validating admission webhook's refusal, as the API server relays it.

    The API server turns a denial without a code into 400 and prefixes the webhook's name; Istio's webhook sets
    no reason, so the Status has none.
    """
    return ApiError(400, f'admission webhook "{webhook}" denied the request: {message}', reason="")


def gatekeeper_denied(constraint: str, message: str) -> ApiError:
    """Gatekeeper's refusal (validation.gatekeeper.sh): its webhook answers with code 403 and, since Gatekeeper
    3.8, reason Forbidden; the API server prefixes the webhook's name and relays both."""
    return ApiError(403, f'admission webhook "validation.gatekeeper.sh" denied the request: [{constraint}] {message}',
                    reason="Forbidden")

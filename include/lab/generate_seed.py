#!/usr/bin/env python3
"""Generate include/lab/seed.yaml: the seed's fleet (seed/000_9dea183cfbb351ae.txt) at full size.

    .venv/bin/python include/lab/generate_seed.py            # writes include/lab/seed.yaml
    .venv/bin/python include/lab/generate_seed.py --check    # fails if seed.yaml is not what this script writes
    .venv/bin/python include/lab/generate_seed.py --stats    # also prints rates and latencies per entry point

Deterministic: no random module, no set or hash() ordering; every "random" choice is a SHA-256 of the
service name and a salt, so the same script always writes the same bytes, and adding a service does not
reshuffle the others. Only the standard library and PyYAML, so it runs without meshlab installed.

The fleet: 187 Kubernetes deployments (plus one istio-ingressgateway per cluster), 800 pods, three
clusters, two callers outside Kubernetes (batch-processor and the postgres it and data-export use).
Every service has a depth: the length of the longest call chain from its cluster's ingress gateway.
A service only calls deeper services, and every service at depth d has a caller at depth d - 1, so the
graph has no cycle, every deployment receives traffic, and the deepest chain is exactly MAX_DEPTH hops.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("seed.yaml")
MAX_DEPTH = 8  # the seed: "Our services had deep call chains (up to 8 hops)"
TARGET_PODS = 800  # the seed: "800+ pods"; counts the ingress gateways' pods
GATEWAY_REPLICAS = 2
ROOT_NAMESPACE = "istio-system"
CRITICAL_FOUR = ("auth-service", "payment-service", "user-service", "api-gateway")

# cluster -> (ingress requests per second at the istio-ingressgateway, entry service behind it)
CLUSTERS: dict[str, tuple[float, str]] = {
    "prod-eu-1": (200.0, "api-gateway"),
    "prod-us-1": (120.0, "edge-api-us"),
    "prod-ap-1": (80.0, "edge-api-ap"),
}

# cluster -> namespace -> "name depth criticality" lines (C critical, H high, M medium, L low).
# The criticality split is the seed's own tally on day 2: 12 critical, 48 high, 85 medium, 42 low.
FLEET: dict[str, dict[str, str]] = {
    "prod-eu-1": {
        "edge": """
            api-gateway 1 C
            web-bff 2 H
            mobile-bff 2 H
            partner-api 2 H
            graphql-gateway 2 M
            admin-portal 2 M
            rate-limiter 3 H
            geo-ip-service 3 M
            cdn-purger 3 L
        """,
        "identity": """
            auth-service 3 C
            user-service 3 C
            oauth-provider 3 H
            session-service 4 C
            token-service 4 C
            mfa-service 4 H
            profile-service 4 H
            permissions-service 4 H
            account-service 4 H
            password-reset 4 M
            sso-connector 4 M
            key-management 5 C
            identity-audit 5 M
            consent-service 5 M
            device-registry 5 M
        """,
        "payments": """
            payment-service 4 C
            billing-service 4 H
            fraud-detection 5 C
            ledger-service 5 C
            card-vault 5 C
            refund-service 5 H
            payment-gateway-adapter 5 H
            wallet-service 5 H
            invoice-service 5 M
            tax-service 5 M
            risk-scoring 6 H
            currency-service 6 M
            payout-service 6 M
            reconciliation-service 6 M
            chargeback-service 6 M
            settlement-service 7 M
        """,
        "commerce": """
            checkout-service 3 C
            cart-service 3 H
            catalog-service 3 H
            product-search 3 H
            review-service 3 M
            recommendation-service 3 M
            wishlist-service 3 L
            order-service 4 C
            pricing-service 4 H
            promotion-service 5 M
            inventory-service 5 H
            shipping-service 5 H
            gift-card-service 5 L
            order-history 5 M
            coupon-service 6 M
        """,
        "platform": """
            notification-service 5 H
            file-storage 5 M
            email-service 6 M
            sms-service 6 M
            push-service 6 M
            webhook-dispatcher 6 M
            image-resizer 6 M
            pdf-renderer 6 L
            template-service 7 L
            feature-flags 7 M
            cache-proxy 7 M
            id-generator 7 M
            config-service 7 H
            audit-log 8 H
        """,
        "data": """
            reporting-api 3 M
            clickstream-service 3 L
            legacy-reporting 4 L
            data-export 4 M
            event-collector 5 M
            gdpr-service 5 M
            analytics-ingest 6 M
            warehouse-loader 7 L
            metrics-aggregator 7 L
        """,
        "monitoring": """
            blackbox-exporter 0 M
        """,
    },
    "prod-us-1": {
        "edge": """
            edge-api-us 1 H
            storefront-bff 2 H
            app-bff 2 H
            store-locator 3 L
        """,
        "storefront": """
            order-router 3 H
            cart-sync 3 M
            customer-service 3 M
            chat-service 3 L
            price-engine 4 H
            deals-service 4 M
            loyalty-service 4 M
            subscription-service 4 M
            support-tickets 4 H
            store-inventory 5 M
            product-feed 5 L
            bundle-service 5 L
        """,
        "search": """
            search-service 3 H
            autocomplete-service 3 M
            query-parser 4 M
            ranking-service 4 M
            facet-service 4 M
            search-indexer 5 M
            spell-checker 5 L
            synonym-service 5 L
            search-analytics 6 L
        """,
        "fulfillment": """
            tracking-service 3 H
            returns-service 3 M
            fulfillment-service 4 H
            delivery-estimator 4 M
            warehouse-service 5 H
            route-planner 5 M
            picking-service 6 M
            packing-service 6 M
            carrier-gateway 6 H
            stock-sync 6 M
            label-printer 7 L
            dock-scheduler 7 L
        """,
        "personalization": """
            recommendation-engine 3 M
            personalization-api 3 M
            user-segments 4 M
            ab-testing 4 M
            trending-service 4 L
            similar-items 5 L
            embedding-service 6 L
            model-server 7 M
        """,
        "platform": """
            notification-relay 5 M
            messaging-service 5 M
            cache-service 6 M
            tracing-collector 6 L
            config-mirror 7 M
            secrets-proxy 7 H
            log-forwarder 7 L
        """,
        "data": """
            customer-360 4 M
            usage-metering 5 M
            bi-export 5 L
            event-bus-bridge 6 M
        """,
    },
    "prod-ap-1": {
        "edge": """
            edge-api-ap 1 H
            ap-storefront-bff 2 H
            mini-app-bff 2 H
            locale-router 3 M
        """,
        "storefront": """
            basket-service 3 H
            flash-sale-service 3 H
            order-intake 3 H
            voucher-service 4 M
            order-tracker 4 M
            payment-router 4 H
            group-buy-service 4 L
            points-service 5 M
        """,
        "marketplace": """
            seller-service 3 H
            listing-service 4 H
            seller-onboarding 4 M
            offer-service 4 M
            commission-service 5 M
            seller-ratings 5 L
            dispute-service 5 M
            kyc-service 5 H
            seller-payouts 6 M
            catalog-sync 6 L
        """,
        "content": """
            content-service 3 H
            cms-api 4 M
            translation-service 4 M
            banner-service 4 L
            seo-service 4 L
            media-service 5 M
            editorial-service 5 L
            video-transcoder 6 L
            thumbnail-service 6 L
            asset-cdn-sync 7 L
        """,
        "logistics": """
            logistics-api 3 H
            cross-border-service 4 H
            pickup-points 4 L
            customs-service 5 M
            last-mile-service 5 M
            address-validation 5 M
            duty-calculator 6 M
            courier-adapter 6 M
            eta-service 6 L
        """,
        "platform": """
            push-gateway 5 M
            geo-fence-service 5 L
            im-notifier 6 L
            queue-service 6 M
            config-agent 7 M
            cache-gateway 7 M
            sequence-service 7 L
            audit-forwarder 7 L
        """,
        "data": """
            report-builder 4 L
            behavior-tracker 5 L
            data-lake-loader 6 L
        """,
    },
}

# Which namespaces a namespace's services usually call (own namespace first). Used to pick callers for
# services that need one and the extra downstream calls; cross-cluster calls are only the hand-made ones.
AFFINITY: dict[str, dict[str, tuple[str, ...]]] = {
    "prod-eu-1": {
        "edge": ("edge", "identity", "commerce", "payments", "data"),
        "identity": ("identity", "platform", "data"),
        "payments": ("payments", "identity", "platform", "data"),
        "commerce": ("commerce", "payments", "platform", "data"),
        "platform": ("platform",),
        "data": ("data", "platform"),
    },
    "prod-us-1": {
        "edge": ("edge", "storefront", "search", "personalization", "fulfillment"),
        "storefront": ("storefront", "fulfillment", "personalization", "platform", "data"),
        "search": ("search", "personalization", "platform"),
        "fulfillment": ("fulfillment", "platform", "data"),
        "personalization": ("personalization", "data", "platform"),
        "platform": ("platform",),
        "data": ("data", "platform"),
    },
    "prod-ap-1": {
        "edge": ("edge", "storefront", "marketplace", "content", "logistics"),
        "storefront": ("storefront", "logistics", "marketplace", "content", "platform", "data"),
        "marketplace": ("marketplace", "content", "platform", "data"),
        "content": ("content", "platform"),
        "logistics": ("logistics", "platform", "data"),
        "platform": ("platform",),
        "data": ("data", "platform"),
    },
}

# Hand-made calls: the request paths the seed's story runs through. caller -> [(callee, per_request)].
# One of the 8-hop chains: istio-ingressgateway -> api-gateway -> web-bff -> checkout-service -> payment-service
#   -> ledger-service -> reconciliation-service -> settlement-service -> audit-log.
HAND_CALLS: dict[str, list[tuple[str, float]]] = {
    # prod-eu-1: every request is authenticated and rate limited, then routed to one front end.
    "api-gateway": [("auth-service", 1.0), ("rate-limiter", 1.0), ("web-bff", 0.5), ("mobile-bff", 0.35),
                    ("partner-api", 0.08), ("graphql-gateway", 0.05), ("admin-portal", 0.02)],
    "web-bff": [("user-service", 0.6), ("catalog-service", 0.8), ("product-search", 0.4), ("cart-service", 0.3),
                ("checkout-service", 0.1), ("recommendation-service", 0.3), ("clickstream-service", 1.0)],
    "mobile-bff": [("user-service", 0.6), ("catalog-service", 0.6), ("cart-service", 0.3),
                   ("checkout-service", 0.1), ("product-search", 0.4), ("wishlist-service", 0.2)],
    "partner-api": [("oauth-provider", 1.0), ("catalog-service", 0.5), ("order-service", 0.3)],
    "graphql-gateway": [("user-service", 0.5), ("catalog-service", 0.8), ("review-service", 0.4)],
    "admin-portal": [("reporting-api", 0.5), ("data-export", 0.1), ("user-service", 0.3)],
    "auth-service": [("session-service", 1.0), ("token-service", 1.0), ("mfa-service", 0.1),
                     ("permissions-service", 0.5)],
    "user-service": [("profile-service", 1.0), ("account-service", 0.5), ("consent-service", 0.2)],
    "token-service": [("key-management", 0.2)],
    "checkout-service": [("order-service", 1.0), ("payment-service", 1.0), ("pricing-service", 1.0),
                         ("inventory-service", 1.0)],
    "order-service": [("notification-service", 1.0), ("shipping-service", 0.5), ("order-history", 1.0),
                      ("event-collector", 1.0)],
    "payment-service": [("fraud-detection", 1.0), ("ledger-service", 1.0), ("card-vault", 0.8),
                        ("payment-gateway-adapter", 1.0)],
    "fraud-detection": [("risk-scoring", 1.0)],
    "ledger-service": [("reconciliation-service", 0.5)],
    "reconciliation-service": [("settlement-service", 0.5)],
    "settlement-service": [("audit-log", 1.0)],
    "notification-service": [("email-service", 0.6), ("sms-service", 0.2), ("push-service", 0.5)],
    "email-service": [("template-service", 1.0)],
    "reporting-api": [("legacy-reporting", 0.6), ("data-export", 0.3)],
    # prod-us-1 and prod-ap-1: regional entry points; identity and payments live in prod-eu-1.
    "edge-api-us": [("storefront-bff", 0.7), ("app-bff", 0.3), ("auth-service", 0.3), ("store-locator", 0.05)],
    "order-router": [("payment-service", 0.8), ("fulfillment-service", 1.0)],
    "edge-api-ap": [("ap-storefront-bff", 0.6), ("mini-app-bff", 0.4), ("auth-service", 0.3),
                    ("locale-router", 1.0)],
    "order-intake": [("payment-service", 0.8), ("cross-border-service", 0.3)],
}

# Services whose calls are exactly the hand-made ones (no generated extras).
NO_EXTRA_CALLS = ("blackbox-exporter", "email-service", "legacy-reporting", "data-export", "token-service",
                  "rate-limiter", "fraud-detection", "ledger-service", "reconciliation-service", "settlement-service")

# Services only the hand-made calls reach (no generated caller).
HAND_CALLERS_ONLY = ("legacy-reporting", "data-export")

# Comments written above a service in the YAML.
NOTES: dict[str, str] = {
    "api-gateway": "critical (seed: 'API Gateway 100% Error Rate'); 512Mi pod, no room for a sidecar",
    "auth-service": "critical: the seed's first OOMKilled pod (limit 512Mi, used 512Mi after injection)",
    "payment-service": "critical (seed: 'Payment Processing DOWN')",
    "user-service": "critical (seed: 'User Authentication FAILED')",
    "email-service": "seed problem service: Python 2.7, no longer maintained; crash-loops with a sidecar",
    "legacy-reporting": "seed problem service: ancient Java app with hardcoded IPs; cannot take a sidecar",
    "data-export": "seed problem service: direct DB connections (postgres:5432, TCP) that bypass the API",
    "blackbox-exporter": "the monitoring stack: probes the critical services in plaintext (namespace not "
                         "injected), so a mesh-wide STRICT cuts it off",
}


@dataclass
class Svc:
    name: str
    cluster: str
    namespace: str
    depth: int
    criticality: str
    kind: str = "deployment"
    gateway: bool = False
    replicas: int = 0
    port: int = 8080
    memory_limit_mi: int = 512
    app_memory_mi: int = 0
    sidecar_memory_mi: int = 0
    ingress_rps: float = 0.0
    latency_ms: float = 0.0
    legacy: bool = False
    calls: list[tuple[Svc, float, int, str]] = field(default_factory=list)  # (callee, per_request, port, proto)


CRITICALITY = {"C": "critical", "H": "high", "M": "medium", "L": "low"}
REPLICAS = {"critical": (5, 8), "high": (4, 6), "medium": (3, 5), "low": (2, 4)}


def _h(name: str, salt: str) -> int:
    """A stable pseudo-random number for (name, salt)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "big")


def _pick(name: str, salt: str, low: int, high: int) -> int:
    """A stable integer in [low, high]."""
    return low + _h(name, salt) % (high - low + 1)


def _rate(name: str, salt: str, low: float = 0.2, high: float = 1.0) -> float:
    """A stable per_request in [low, high], in steps of 0.05."""
    steps = round((high - low) / 0.05)
    return round(low + 0.05 * _pick(name, salt, 0, steps), 2)


PROXY_MEMORY_LIMIT = "sidecar.istio.io/proxyMemoryLimit"


def _fits(s: Svc) -> bool:
    """Whether the pod's memory budget has room for its sidecar: a pod without room has its sidecar capped at what
    the budget leaves (sidecar.istio.io/proxyMemoryLimit), which Envoy's 150-300 MB then exceeds."""
    return s.app_memory_mi + s.sidecar_memory_mi <= s.memory_limit_mi


def _ref(caller: Svc, callee: Svc) -> str:
    if callee.cluster != caller.cluster:
        return f"{callee.cluster}/{callee.namespace}/{callee.name}"
    if callee.namespace != caller.namespace:
        return f"{callee.namespace}/{callee.name}"
    return callee.name


# ---- building the fleet -------------------------------------------------------------------------
def build() -> tuple[list[Svc], dict[str, list[str]]]:
    """Every service (gateways and externals included) and the namespaces of each cluster."""
    fleet: list[Svc] = []
    namespaces: dict[str, list[str]] = {}
    for cluster, by_ns in FLEET.items():
        namespaces[cluster] = [ROOT_NAMESPACE, *by_ns]
        fleet.append(Svc("istio-ingressgateway", cluster, ROOT_NAMESPACE, 0, "critical", gateway=True))
        for ns, table in by_ns.items():
            for line in table.strip().splitlines():
                name, depth, crit = line.split()
                fleet.append(Svc(name, cluster, ns, int(depth), CRITICALITY[crit]))
    eu = next(iter(CLUSTERS))
    fleet.append(Svc("batch-processor", eu, "external", 0, "medium", kind="external"))
    fleet.append(Svc("postgres", eu, "databases", MAX_DEPTH, "high", kind="external"))
    by_name = {s.name: s for s in fleet if not s.gateway}
    assert len(by_name) == len(fleet) - len(CLUSTERS), "service names must be unique across the fleet"

    _size(fleet)
    _wire(fleet, by_name)
    _special(by_name)
    _fit_pods(fleet)
    return fleet, namespaces


def _size(fleet: list[Svc]) -> None:
    """Replicas, memory, latency. Criticals are the seed's undersized pods; others are a mix."""
    for s in fleet:
        if s.gateway:
            s.replicas, s.memory_limit_mi, s.app_memory_mi, s.latency_ms = GATEWAY_REPLICAS, 1024, 180, 1.0
            s.ingress_rps = CLUSTERS[s.cluster][0]
            continue
        if s.kind == "external":
            s.replicas, s.app_memory_mi = 1, 0
            continue
        s.replicas = _pick(s.name, "replicas", *REPLICAS[s.criticality])
        s.sidecar_memory_mi = _pick(s.name, "sidecar", 150, 300)  # the seed: "150-300MB RAM" per Envoy
        bucket = _h(s.name, "memory") % 10
        if s.criticality == "critical" or bucket < 4:
            # The seed's pods: 512Mi limit, 380-450Mi used: app + sidecar > 512 whatever the sidecar.
            s.memory_limit_mi, s.app_memory_mi = 512, _pick(s.name, "app", 380, 450)
        elif bucket < 7:
            # 512Mi with room: app + sidecar stays at or under 500Mi.
            s.memory_limit_mi, s.app_memory_mi = 512, _pick(s.name, "app", 180, 280)
            s.sidecar_memory_mi = min(s.sidecar_memory_mi, 500 - s.app_memory_mi)
        else:
            # Already at 1Gi: room for any sidecar.
            s.memory_limit_mi, s.app_memory_mi = 1024, _pick(s.name, "app", 300, 600)
        low, high = {1: (3, 6), 2: (5, 12)}.get(s.depth, (4, 15) if s.depth <= 5 else (2, 8))
        s.latency_ms = float(_pick(s.name, "latency", low, high))


def _wire(fleet: list[Svc], by_name: dict[str, Svc]) -> None:
    def call(caller: Svc, callee: Svc, per_request: float, port: int = 8080, proto: str = "http") -> None:
        assert callee.depth > caller.depth, f"{caller.name} -> {callee.name} does not go deeper"
        assert all(c is not callee for c, *_ in caller.calls), f"{caller.name} calls {callee.name} twice"
        caller.calls.append((callee, per_request, port, proto))

    for s in fleet:
        if s.gateway:
            call(s, by_name[CLUSTERS[s.cluster][1]], 1.0)
    for caller, callees in HAND_CALLS.items():
        for callee, per_request in callees:
            call(by_name[caller], by_name[callee], per_request)

    deployments = [s for s in fleet if s.kind == "deployment" and not s.gateway and s.depth > 0]
    # Every service at depth d >= 2 gets a caller at depth d - 1 (same cluster, an affine namespace,
    # the caller with the fewest calls so far): so the chain to it is exactly d hops, and traffic reaches it.
    for s in sorted(deployments, key=lambda s: (s.depth, s.name)):
        if s.depth < 2 or any(c is s and x.depth == s.depth - 1 for x in fleet for c, *_ in x.calls):
            continue
        candidates = [x for x in deployments if x.cluster == s.cluster and x.depth == s.depth - 1
                      and x.name not in NO_EXTRA_CALLS]
        affine = [x for x in candidates if s.namespace in AFFINITY[s.cluster][x.namespace]]
        pool = affine or candidates
        assert pool, f"nothing at depth {s.depth - 1} in {s.cluster} can call {s.name}"
        caller = min(pool, key=lambda x: (x.namespace != s.namespace, len(x.calls), _h(x.name + s.name, "caller")))
        call(caller, s, _rate(caller.name + s.name, "primary", 0.2, 0.8))
    # A few more calls downstream, mostly one to three levels deeper, into affine namespaces.
    for s in sorted(deployments, key=lambda s: (s.cluster, s.depth, s.name)):
        if s.name in NO_EXTRA_CALLS or s.name in HAND_CALLS:
            continue
        want = _pick(s.name, "fanout", 1, 2)
        deeper = [x for x in deployments if x.cluster == s.cluster and s.depth < x.depth <= s.depth + 3
                  and x.name not in HAND_CALLERS_ONLY
                  and x.namespace in AFFINITY[s.cluster][s.namespace] and all(c is not x for c, *_ in s.calls)]
        deeper.sort(key=lambda x: (x.namespace != s.namespace, x.depth - s.depth > 1, _h(s.name + x.name, "extra")))
        for x in deeper[: max(0, want - len(s.calls))]:
            call(s, x, _rate(s.name + x.name, "extra", 0.1, 0.4))


def _special(by_name: dict[str, Svc]) -> None:
    """The seed's problem services and the monitoring stack."""
    email = by_name["email-service"]  # Python 2.7: small, and memory is not why it fails
    email.legacy, email.memory_limit_mi, email.app_memory_mi, email.sidecar_memory_mi = True, 512, 160, 180
    email.latency_ms = 40.0
    reporting = by_name["legacy-reporting"]  # a big old JVM on a 1Gi pod
    reporting.legacy, reporting.memory_limit_mi, reporting.app_memory_mi = True, 1024, 700
    reporting.sidecar_memory_mi, reporting.latency_ms = 200, 120.0
    export = by_name["data-export"]  # room for a sidecar: its problem is the database traffic, not memory
    export.memory_limit_mi, export.app_memory_mi, export.latency_ms = 1024, 520, 60.0
    postgres = by_name["postgres"]
    postgres.port, postgres.latency_ms = 5432, 3.0
    export.calls.append((postgres, 1.0, 5432, "tcp"))
    batch = by_name["batch-processor"]  # outside Kubernetes: plaintext into the mesh, its job rate as ingress
    batch.ingress_rps, batch.latency_ms = 5.0, 50.0
    for callee, per_request in (("data-export", 0.5), ("legacy-reporting", 0.3), ("ledger-service", 1.0),
                                ("order-history", 0.5), ("user-service", 0.2), ("email-service", 0.3)):
        batch.calls.append((by_name[callee], per_request, 8080, "http"))
    blackbox = by_name["blackbox-exporter"]
    blackbox.replicas, blackbox.memory_limit_mi, blackbox.app_memory_mi = 2, 256, 64
    blackbox.sidecar_memory_mi, blackbox.ingress_rps, blackbox.latency_ms = 150, 1.0, 1.0
    for callee in CRITICAL_FOUR:
        blackbox.calls.append((by_name[callee], 0.25, 8080, "http"))


def _fit_pods(fleet: list[Svc]) -> None:
    """Nudge replicas (within each criticality's range) until the fleet has exactly TARGET_PODS pods."""
    pods = [s for s in fleet if s.kind == "deployment" and not s.gateway and s.name != "blackbox-exporter"]
    order = sorted(pods, key=lambda s: _h(s.name, "fit"))
    total = sum(s.replicas for s in fleet if s.kind == "deployment")
    while total != TARGET_PODS:
        step = 1 if total < TARGET_PODS else -1
        for s in order:
            low, high = REPLICAS[s.criticality]
            if low <= s.replicas + step <= high:
                s.replicas += step
                total += step
                break
        else:
            raise AssertionError(f"cannot reach {TARGET_PODS} pods")
        order = order[1:] + order[:1]


# ---- analysis -----------------------------------------------------------------------------------
def longest_chain(fleet: list[Svc]) -> list[Svc]:
    """The longest call path starting at an ingress gateway."""
    memo: dict[int, list[Svc]] = {}

    def longest(s: Svc) -> list[Svc]:
        if id(s) not in memo:
            tails = [longest(c) for c, *_ in s.calls]
            memo[id(s)] = [s, *max(tails, key=len, default=[])]
        return memo[id(s)]

    return max((longest(s) for s in fleet if s.gateway), key=len)


def baseline(fleet: list[Svc], sidecar_ms: float = 0.0) -> tuple[dict[int, float], dict[int, float]]:
    """Requests per second reaching each service and its latency, before any injection (as the lab computes)."""
    latency: dict[int, float] = {}

    def lat(s: Svc) -> float:
        if id(s) not in latency:
            latency[id(s)] = s.latency_ms + sum(pr * (lat(c) + (sidecar_ms if s.gateway else 0.0))
                                                for c, pr, _, proto in s.calls)
        return latency[id(s)]

    for s in fleet:
        lat(s)
    rate = {id(s): s.ingress_rps for s in fleet}
    for s in sorted(fleet, key=lambda s: s.depth):
        for c, pr, _, proto in s.calls:
            if proto == "http":
                rate[id(c)] += rate[id(s)] * pr
    return rate, latency


# ---- the YAML -----------------------------------------------------------------------------------
def _service_dict(s: Svc) -> dict[str, object]:
    d: dict[str, object] = {"name": s.name, "cluster": s.cluster, "namespace": s.namespace}
    if s.kind == "external":
        d["kind"] = "external"
    d["criticality"] = s.criticality
    if s.kind == "deployment":
        # The lab writes the topology's criticality on no object; as a Deployment label, where a team marks it,
        # `meshwave plan propose` reads it as on a real cluster (its pilot waves pick low-criticality services).
        d["labels"] = {"criticality": s.criticality}
        d["replicas"] = s.replicas
    if s.port != 8080:
        d["port"] = s.port
    if s.kind == "deployment":
        d["memory_limit_mi"] = s.memory_limit_mi
        d["app_memory_mi"] = s.app_memory_mi
        if not s.gateway:
            d["sidecar_memory_mi"] = s.sidecar_memory_mi
        if not s.gateway and not _fits(s):
            # The team gave the sidecar what its 512Mi budget had left: a limit of its own, below what Envoy uses.
            d["annotations"] = {PROXY_MEMORY_LIMIT: f"{s.memory_limit_mi - s.app_memory_mi}Mi"}
    if s.gateway:
        d["gateway"] = True
    if s.legacy:
        d["legacy"] = True
    if s.ingress_rps:
        d["ingress_rps"] = s.ingress_rps
    d["latency_ms"] = s.latency_ms
    if s.calls:
        calls = []
        for callee, per_request, port, proto in s.calls:
            c: dict[str, object] = {"service": _ref(s, callee), "per_request": per_request}
            if port != 8080:
                c["port"] = port
            if proto != "http":
                c["protocol"] = proto
            calls.append(c)
        d["calls"] = calls
    return d


HEADER = """\
# GENERATED by include/lab/generate_seed.py: do not edit by hand.
# Regenerate: .venv/bin/python include/lab/generate_seed.py   (check: ... generate_seed.py --check)
#
# The seed's fleet at full size (seed/000_9dea183cfbb351ae.txt), for rehearsing a migration onto Istio.
# Numbers from the seed:
#   - "187 microservices", "800+ pods": {deployments} deployments, plus an istio-ingressgateway per cluster:
#     {pods} pods in all;
#     criticality as the seed's day-2 tally: critical 12, high 48, medium 85, low 42.
#   - "12 Kubernetes clusters (multi-region)": three here ({clusters});
#     cross-cluster calls are rare (regional edges call identity and payments in the first cluster).
#   - critical services auth-service, payment-service, user-service, api-gateway (the seed's recovery list).
#   - "Memory Limit: 512Mi" and "Each Envoy sidecar consumed 150-300MB RAM": critical pods have a 512Mi limit
#     and use 380-450Mi, sidecar_memory_mi per service is 150-300. Each container has its own limit in
#     Kubernetes, so the seed's "app OOMKilled by its sidecar" is reproduced the way it happens on a real
#     cluster: those teams capped the sidecar at what the 512Mi budget left (sidecar.istio.io/proxyMemoryLimit
#     = 512Mi - app), Envoy uses more, and the istio-proxy container is OOMKilled once injected.
#     {fits} of the {deployments} deployments have room for their sidecar (smaller apps, or 1Gi pods), and
#     get Istio's default proxy limit (1024Mi).
#   - "Envoy proxy added 35-50ms per hop", "deep call chains (up to 8 hops)": mesh.sidecar_latency_ms 20
#     (the lab adds it once per proxy on a hop: a hop with a sidecar at both ends costs 40ms), and the longest
#     chain from an ingress gateway is {longest} hops, for instance
#       {chain}
#   - problem services: email-service (Python 2.7, legacy), legacy-reporting (hardcoded IPs, legacy),
#     batch-processor (outside Kubernetes, calls in plaintext), data-export (direct postgres:5432 over TCP).
#   - the monitoring stack (blackbox-exporter, namespace monitoring, istio-injection=disabled) probes the
#     critical services in plaintext.
# Start state: no namespace labelled for injection (monitoring: disabled), no PeerAuthentication. The
# outage is a mesh-wide STRICT PeerAuthentication named default in istio-system, applied later.
# Rates are scaled down (the seed's peak was 2.4M requests per minute):
#   ingress {ingress}.
"""


def generate() -> str:
    """The text of seed.yaml."""
    fleet, namespaces = build()
    deployments = [s for s in fleet if s.kind == "deployment" and not s.gateway]
    chain = longest_chain(fleet)
    head = {
        "name": "seed",
        "mesh": {"root_namespace": ROOT_NAMESPACE, "sidecar_memory_mi": 200, "sidecar_latency_ms": 20},
        "clusters": [
            {"name": cluster, "namespaces": [
                {"name": ns, "labels": {"istio-injection": "disabled"}} if ns == "monitoring" else {"name": ns}
                for ns in nss]}
            for cluster, nss in namespaces.items()
        ],
    }
    text = HEADER.format(
        deployments=len(deployments), fits=sum(1 for s in deployments if _fits(s)),
        pods=sum(s.replicas for s in fleet if s.kind == "deployment"),
        clusters=", ".join(CLUSTERS), longest=len(chain) - 1,
        chain="\n#         -> ".join(" -> ".join(s.name for s in chain[i:i + 4]) for i in range(0, len(chain), 4)),
        ingress=", ".join(f"{c} {rps:g} rps" for c, (rps, _) in CLUSTERS.items()),
    )
    text += "\n" + yaml.safe_dump(head, sort_keys=False, default_flow_style=None, width=120)
    text += "peer_authentications: []\n"
    text += "services:\n"
    group = None
    for s in fleet:
        if (s.cluster, s.namespace) != group:
            group = (s.cluster, s.namespace)
            what = "outside Kubernetes" if s.kind == "external" else "namespace"
            text += f"\n  # ---- {s.cluster} / {s.namespace} ({what}) ----\n"
        if s.name in NOTES:
            text += f"  # {NOTES[s.name]}\n"
        text += _emit(_service_dict(s))
    return text


def _flow(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000)
    return text.strip().removesuffix("...").strip()  # a bare scalar is dumped as a document: "x\n...\n"


def _emit(d: dict[str, object]) -> str:
    """One service as a block mapping, its calls one flow mapping a line."""
    lines = []
    for i, (key, value) in enumerate(d.items()):
        lead = "  - " if i == 0 else "    "
        if key == "calls":
            lines.append(f"{lead}calls:")
            lines.extend(f"      - {_flow(call)}" for call in value)  # type: ignore[union-attr]
        else:
            lines.append(f"{lead}{key}: {_flow(value)}")
    return "".join(line + "\n" for line in lines)


def summary(fleet: list[Svc], namespaces: dict[str, list[str]]) -> str:
    deployments = [s for s in fleet if s.kind == "deployment" and not s.gateway]
    gateways = [s for s in fleet if s.gateway]
    externals = [s for s in fleet if s.kind == "external"]
    pods = sum(s.replicas for s in fleet if s.kind == "deployment")
    crit = {c: sum(1 for s in deployments if s.criticality == c) for c in REPLICAS}
    chain = longest_chain(fleet)
    return (f"{OUT.name}: {len(deployments)} services (+{len(gateways)} ingress gateways, {len(externals)} external), "
            f"{pods} pods, {len(namespaces)} clusters, {sum(len(v) for v in namespaces.values())} namespaces, "
            f"criticality {'/'.join(str(n) for n in crit.values())}, longest chain {len(chain) - 1} hops "
            f"({' -> '.join(s.name for s in chain)})")


def stats(fleet: list[Svc]) -> str:
    rate, latency = baseline(fleet)
    lines = []
    for s in fleet:
        if s.gateway or s.ingress_rps:
            lines.append(f"  entry {s.cluster}/{s.name}: {s.ingress_rps:g} rps in, latency {latency[id(s)]:.0f} ms")
    busiest = sorted(fleet, key=lambda s: -rate[id(s)])[:8]
    lines.append("  busiest: " + ", ".join(f"{s.name} {rate[id(s)]:.0f}" for s in busiest))
    quiet = sorted((s for s in fleet if s.kind == "deployment"), key=lambda s: rate[id(s)])[:8]
    lines.append("  quietest: " + ", ".join(f"{s.name} {rate[id(s)]:.2f}" for s in quiet))
    fan = sorted(fleet, key=lambda s: -len(s.calls))[:5]
    lines.append("  widest fan-out: " + ", ".join(f"{s.name} {len(s.calls)}" for s in fan))
    fits = [s for s in fleet if s.kind == "deployment" and not s.gateway and _fits(s)]
    lines.append(f"  sidecar fits: {len(fits)} of {sum(1 for s in fleet if s.kind == 'deployment' and not s.gateway)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if seed.yaml differs from what would be written")
    parser.add_argument("--stats", action="store_true", help="print rates, latencies and fan-out as well")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
    else:
        args.output.write_text(text)
    fleet, namespaces = build()
    print(summary(fleet, namespaces))
    if args.stats:
        print(stats(fleet))
    return 0


if __name__ == "__main__":
    sys.exit(main())

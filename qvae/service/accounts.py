"""API keys, and the QPU-time ledger with its reservations (kept in the service `Store`)."""

from __future__ import annotations

import hashlib
import hmac
import uuid

from backends.dwave import QPUBudgetExceeded
from qvae.service.jobs import ServiceError
from qvae.service.settings import KeyConfig
from qvae.service.store import SERVER, BudgetRefused, Store, key_account


class Keys:
    """Look keys up by secret; `None` means no such key.

    The secret sent is compared with every configured key by `hmac.compare_digest` on SHA-256
    digests, with no early exit on a match: neither a dict lookup's hashing nor `==`'s first
    differing byte nor the position of the matching key shows up in the response time."""

    def __init__(self, keys: list[KeyConfig]):
        self.entries = [(_digest(k.key), k) for k in keys]

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, secret: str) -> KeyConfig | None:
        sent, found = _digest(secret), None
        for digest, key in self.entries:
            if hmac.compare_digest(digest, sent):
                found = key
        return found


def _digest(secret: str) -> bytes:
    # equal-length inputs, so compare_digest's time does not even depend on the key's length
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class QPUBudgetRefused(ServiceError):
    """429: a QPU budget (the key's or the service's) cannot cover this request or call.

    The body carries `qpu_budget` (scope, key, used_s, reserved_s, estimate_s, limit_s) beside
    `detail`; no Retry-After, since waiting does not refill a budget."""

    def __init__(self, refused: BudgetRefused, key: str):
        scope = "server" if refused.account == SERVER else "key"
        whose = ("this service (qpu_time_budget_s, shared by every key)" if scope == "server"
                 else f"key {key!r}")
        fix = ("ask the service's operator to raise backends.dwave.options.qpu_time_budget_s"
               if scope == "server" else "ask the service's operator to raise its qpu_budget_s")
        super().__init__(429, f"QPU-time budget exhausted for {whose}: {refused.used_s:.4f} s "
                         f"used + {refused.reserved_s:.4f} s held by requests in flight + "
                         f"{refused.estimate_s:.4f} s estimated for this request > "
                         f"{refused.limit_s:g} s. Ask for fewer reads, {fix}, or use a CPU "
                         "backend.")
        self.body = {"qpu_budget": {"scope": scope, "key": key, "used_s": refused.used_s,
                                    "reserved_s": refused.reserved_s,
                                    "estimate_s": refused.estimate_s,
                                    "limit_s": refused.limit_s}}


class Ledger:
    """QPU seconds per key and for the whole service, kept in a `Store` (shared by every process
    using it), with reservations: admission holds a request's estimate, every QPU call is checked
    again just before it runs and charged with its reported access time right after."""

    def __init__(self, store: Store, server_budget_s: float | None = None):
        self.store, self.server_budget_s = store, server_budget_s

    def used(self, label: str) -> float:
        return self.store.used(key_account(label))

    def server_used(self) -> float:
        return self.store.used(SERVER)

    def reserve(self, key: KeyConfig, estimate_s: float) -> Reservation:
        """Hold `estimate_s` against the key's and the service's budgets, or raise 429."""
        reservation = Reservation(self, key)
        try:
            self.store.reserve(reservation.id, reservation.limits, estimate_s)
        except BudgetRefused as refused:
            raise QPUBudgetRefused(refused, key.label()) from None
        return reservation


class Reservation:
    """One request's hold on the QPU budgets; the `dwave` backend's `meter` while it runs."""

    def __init__(self, ledger: Ledger, key: KeyConfig):
        self.ledger, self.key = ledger, key.label()
        self.id = uuid.uuid4().hex
        self.limits = {key_account(self.key): key.qpu_budget_s, SERVER: ledger.server_budget_s}
        self.charged_s = 0.0

    def before_call(self, estimated_s: float) -> None:
        try:
            self.ledger.store.admit_call(self.id, self.limits, estimated_s)
        except BudgetRefused as refused:
            raise QPUBudgetExceeded(str(QPUBudgetRefused(refused, self.key))) from None

    def after_call(self, estimated_s: float, charged_s: float) -> None:
        self.ledger.store.charge(self.id, list(self.limits), charged_s, estimated_s)
        self.charged_s += charged_s

    def release(self) -> None:
        self.ledger.store.release(self.id)

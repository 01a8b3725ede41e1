"""Result types shared by the probes and the report writers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProbeResult:
    """The outcome of one probe.

    ``detail`` says what was seen on success and "expected ..., got ..." on failure;
    for a skipped probe it gives the reason. A skipped probe does not fail a run.
    """

    name: str
    ok: bool
    detail: str
    seconds: float
    skipped: bool = False

    @property
    def status(self) -> str:
        """``PASS``, ``FAIL`` or ``SKIP``."""
        if self.skipped:
            return "SKIP"
        return "PASS" if self.ok else "FAIL"

    @property
    def failed(self) -> bool:
        return not self.ok and not self.skipped


@dataclass
class ProbeRun:
    """All probe results for one endpoint."""

    target: str
    base_url: str
    results: list[ProbeResult] = field(default_factory=list)
    model: str | None = None
    started_at: str | None = None  # ISO 8601, UTC
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when at least one probe ran and none failed (skips do not count)."""
        return bool(self.results) and not any(r.failed for r in self.results)

    @property
    def counts(self) -> dict[str, int]:
        counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        for r in self.results:
            counts[r.status] += 1
        return counts

"""Schemathesis against the real app: every operation of /openapi.json, positive and negative
cases, the response checks below; failures are collected, not stopped at.

Used by tests/test_schemathesis.py (a bounded run) and by scripts/schemathesis (a longer one:
`PYTHONPATH=tests .venv/bin/python tests/fuzzing.py --max-examples 200 --json out.json`). In
positive mode half the cases on a session path get a real session's id and bearer token, so the
authorised code paths (extend, cancel, frames, mp4, delete) are reached too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
SESSION_PATH = "/api/sessions/{session_id}"
# schemathesis' default list plus 413: a body over the size limit is refused before it is parsed
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428",
                     "429"]
"""


def fuzz_limits():
    """Small limits, so generated valid requests stay cheap on a CPU worker."""
    from lumos.cluster.limits import Limits

    return Limits(
        max_prompt_chars=40,
        max_frames_per_request=2,
        max_frames_per_session=6,
        max_image_bytes=3000,
        max_image_side=64,
        steps=(1, 2),
        max_sessions=3,
        rate_per_s=1000,
        rate_burst=100_000,
        owner_rate_per_s=1000,
        owner_rate_burst=100_000,
    )


@dataclass
class Report:
    """What a run did: cases per operation and mode, status codes, failures (deduplicated)."""

    cases: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": sum(self.cases.values()),
            "operations": len({label for label, _ in self.cases}),
            "cases_by_operation": {f"{op} [{mode}]": n for (op, mode), n in self.cases.items()},
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "failures": list(self.failures.values()),
            "seconds": round(self.seconds, 1),
        }


class RealSession:
    """A live session of the server (re-created when a DELETE case removed it)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.sid: str | None = None
        self.token = ""

    def get(self) -> tuple[str, str]:
        if self.sid is not None:
            r = self.http.get(f"/api/sessions/{self.sid}", headers=self._auth())
            if r.status_code == 200:
                return self.sid, self.token
        body = {"prompt": "a red sneaker moves left", "frames": 1, "steps": 1}
        for _ in range(100):  # the cap may be full of generated sessions: wait for a place
            r = self.http.post("/api/sessions", json=body)
            if r.status_code == 201:
                self.sid, self.token = r.json()["id"], r.json()["token"]
                return self.sid, self.token
            time.sleep(0.2)
        raise RuntimeError(f"could not create a session: {r.status_code} {r.text}")

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def close(self) -> None:
        self.http.close()


def run(url: str, max_examples: int, seed: int = 0) -> Report:
    """Fuzz every operation of the server at url; returns the report (never raises on a
    failed check: failures are collected)."""
    report = Report()
    spec = httpx.get(url + "/openapi.json", timeout=60).json()
    schema = schemathesis.openapi.from_dict(spec, config=SchemathesisConfig.from_str(CONFIG))
    real = RealSession(url)
    flip = itertools.count()
    started = time.monotonic()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(operation, mode, url, max_examples, seed, report, real, flip)
    finally:
        real.close()
    report.seconds = time.monotonic() - started
    return report


def _fuzz(operation, mode, url, max_examples, seed, report, real, flip) -> None:
    label = operation.label

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=seed == 0,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: collect failures and go on
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case) -> None:
        if (
            mode == GenerationMode.POSITIVE
            and operation.path.startswith(SESSION_PATH)
            and next(flip) % 2 == 0
        ):
            sid, token = real.get()
            case.path_parameters = {**(case.path_parameters or {}), "session_id": sid}
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        report.cases[(label, mode.value)] += 1
        try:
            response = case.call(base_url=url, timeout=60)
        except Exception as e:  # the server closed the connection: as bad as a 500
            _record(report, label, mode, "transport", repr(e)[:300], case)
            return
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except AssertionError as e:
            _record(report, label, mode, type(e).__name__, str(e)[:600], case)
        except BaseExceptionGroup as group:
            for e in group.exceptions:
                _record(report, label, mode, type(e).__name__, str(e)[:600], case)

    try:
        one()
    except Unsatisfiable:  # negative mode of an operation without inputs: nothing to break
        pass


def _record(report: Report, label: str, mode, kind: str, text: str, case) -> None:
    key = f"{label}|{mode.value}|{kind}|{text.splitlines()[0] if text else ''}"
    entry = report.failures.setdefault(
        key,
        {"operation": label, "mode": mode.value, "kind": kind, "message": text, "count": 0},
    )
    entry["count"] += 1
    if "reproduce" not in entry:
        try:
            entry["reproduce"] = case.as_curl_command()
        except Exception:
            entry["reproduce"] = repr(case)[:600]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="schemathesis against the real Lumos app")
    p.add_argument("--max-examples", type=int, default=200, help="per operation and mode")
    p.add_argument("--seed", type=int, default=0, help="0: derandomized (reproducible)")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)

    import ray

    import serving

    with tempfile.TemporaryDirectory() as tmp:
        cfg = serving.local_ray_config(
            f"lumos-fuzz-{uuid.uuid4().hex[:8]}",
            f"{tmp}/lumos.db",
            limits=fuzz_limits(),
            admin_token="admin-" + uuid.uuid4().hex,
        )
        server = serving.Server(cfg)
        try:
            report = run(server.url.rstrip("/"), a.max_examples, a.seed)
        finally:
            server.stop()
            ray.shutdown()
    out = report.as_dict()
    print(
        f"schemathesis: {out['cases']} cases over {out['operations']} operations "
        f"in {out['seconds']} s; {len(out['failures'])} distinct failures"
    )
    print("status codes:", out["statuses"])
    for f in out["failures"]:
        print(
            f"FAIL {f['operation']} [{f['mode']}] {f['kind']} x{f['count']}: "
            f"{f['message'].splitlines()[0]}"
        )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

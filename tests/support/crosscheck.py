"""Cross-check harness: grpcio's own xDS client and meshpatch, same xDS, same servers.

One control plane serves every row's resources (each row is its own service,
``<row>.default.svc.cluster.local:7070``).  Two long-lived client processes run
the same driver: grpcio's native client (``xds:///<host>:7070`` with
``GRPC_XDS_BOOTSTRAP``) and an unmodified app under ``meshpatch-run`` using
``grpc.insecure_channel("<host>:7070")``.  A row's batches are sent to both at
once; the "pods" (real gRPC servers on 127.0.0.2 …) keep what they saw per
client (the driver tags every call with ``x-client``, ``x-row``, ``x-batch``
and a request id ``x-req`` that retries repeat), and fail, delay or hold calls
as the row tells them per row.  A row's check then compares both sides.

    Row("weighted", endpoints=[Ep("p1", {"v": "1"}), Ep("p2", {"v": "2"})],
        vs_http="- route: [...]", batches=[Batch(400)], check=same_split({"p1": .2, "p2": .8}))
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import grpc
from google.protobuf.message import Message

from tests.support.controlplane import ControlPlane, write_bootstrap
from tests.support.servers import app_env, free_port, venv_bin

NAMESPACE = "default"
PORT = 7070
DEFAULT_METHOD = "/echo.Echo/Call"
NATIVE, MESHPATCH = "native", "meshpatch"
CLIENTS = (NATIVE, MESHPATCH)
DOWN = "down"  # an endpoint with nothing listening (connection refused)


def fqdn(row: str) -> str:
    return f"{row}.{NAMESPACE}.svc.cluster.local"


# --------------------------------------------------------------------------- client driver

#: Run by both client processes: ``python -c DRIVER <target prefix> <client tag>``.
#: One JSON command per stdin line, one JSON answer per stdout line.
DRIVER = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import grpc

prefix, tag = sys.argv[1], sys.argv[2]
channels, warmed = {}, set()


def run(cmd):
    target = prefix + cmd["target"]
    ch = channels.get(target) or channels.setdefault(target, grpc.insecure_channel(target))
    call = ch.unary_unary(cmd["method"])
    base = [("x-row", cmd["row"]), ("x-client", tag), ("x-batch", str(cmd["batch"]))]
    if target not in warmed:  # resolve xDS first; servers neither count nor fail x-warm calls
        warmed.add(target)
        try:
            # grpcio queues the call until xDS resolves only with wait_for_ready; meshpatch's
            # first call waits for xDS itself (and would wait out the deadline on a dead pod).
            call(b"", timeout=15, wait_for_ready=bool(prefix), metadata=base + [("x-warm", "1")])
        except grpc.RpcError:
            pass
    each = cmd.get("md_each")

    def one(i):
        md = base + [("x-req", str(i))] + [tuple(x) for x in cmd["md"]]
        if each:
            md += [tuple(x) for x in each[i % len(each)]]
        md = [(k, v.encode() if k.endswith("-bin") else v) for k, v in md]
        t0 = time.monotonic()
        try:
            out = "ok:" + call(b"", timeout=cmd["timeout"], metadata=md).decode()
        except grpc.RpcError as exc:
            out = "error:" + exc.code().name
        return [out, round((time.monotonic() - t0) * 1000, 1)]

    with ThreadPoolExecutor(max(1, cmd["concurrency"])) as ex:
        return list(ex.map(one, range(cmd["n"])))


print(json.dumps({"ready": tag}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd.get("sleep"):
            time.sleep(cmd["sleep"])
            answer = []
        else:
            answer = run(cmd)
    except Exception as exc:
        answer = {"exception": repr(exc)}
    print(json.dumps(answer), flush=True)
"""


class ClientProcess:
    """One driver process; ``request`` sends a command and returns its answer."""

    def __init__(self, tag: str, bootstrap: str, meshpatch: bool, scratch: str) -> None:
        self.tag = tag
        python = os.path.join(venv_bin(), "python")
        if meshpatch:
            command = [os.path.join(venv_bin(), "meshpatch-run"), python, "-c", DRIVER, "", tag]
            env = app_env({"GRPC_XDS_BOOTSTRAP": bootstrap, "MESHPATCH_RESOLVE_TIMEOUT": "5"})
        else:
            command = [python, "-c", DRIVER, "xds:///", tag]
            env = {k: v for k, v in app_env().items() if not k.startswith("GRPC_XDS_")}
            env["GRPC_XDS_BOOTSTRAP"] = bootstrap
        self._stderr = tempfile.TemporaryFile(mode="w+", dir=scratch)
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=env, cwd=scratch)

    def wait_ready(self, timeout: float = 30) -> None:
        self._read(timeout)

    def request(self, cmd: Dict[str, Any], timeout: float = 60) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if isinstance(answer, dict) and "exception" in answer:
            raise AssertionError(f"{self.tag} driver failed: {answer['exception']}\n{self.stderr()[-3000:]}")
        return answer

    def _read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        box: List[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise AssertionError(f"{self.tag} client gave no answer within {timeout}s: {self.stderr()[-3000:]}")
        return json.loads(box[0])

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


# --------------------------------------------------------------------------- pods


@dataclass(frozen=True)
class Behaviour:
    """What a pod does with a row's calls: wait ``delay`` seconds, then fail with
    ``fail`` (a grpc.StatusCode name) — for every attempt, or only for the first
    ``fail_first`` attempts of each request (counted over all pods)."""

    fail: str = ""
    fail_first: int = 0
    delay: float = 0.0


class Pods:
    """Real gRPC servers on 127.0.0.2 …, answering any method with their name."""

    def __init__(self, count: int) -> None:
        self.names = [f"p{i + 1}" for i in range(count)]
        self.behaviours: Dict[Tuple[str, str], Behaviour] = {}
        self.addresses: Dict[str, Tuple[str, int]] = {}
        self._servers: List[grpc.Server] = []
        self._lock = threading.Lock()
        # (row, client, batch) → request id → pods that got an attempt, in order (and when)
        self._attempts: Dict[Tuple[str, str, str], Dict[str, List[str]]] = defaultdict(lambda: defaultdict(list))
        self._times: Dict[Tuple[str, str, str], Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
        for i, name in enumerate(self.names):
            ip = f"127.0.0.{i + 2}"
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"pod-{name}"),
                                 options=[("grpc.so_reuseport", 0)])
            server.add_generic_rpc_handlers((_AnyMethod(self, name),))
            port = server.add_insecure_port(f"{ip}:0")
            server.start()
            self._servers.append(server)
            self.addresses[name] = (ip, port)
        self.addresses[DOWN] = ("127.0.0.9", free_port("127.0.0.9"))

    def handle(self, name: str, context: grpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        if md.get("x-warm"):
            return name.encode()
        row = str(md.get("x-row", ""))
        key = (row, str(md.get("x-client", "")), str(md.get("x-batch", "")))
        with self._lock:
            req = str(md.get("x-req", ""))
            tried = self._attempts[key][req]
            tried.append(name)
            self._times[key][req].append(time.monotonic())
            attempt = len(tried)
        b = self.behaviours.get((row, name), Behaviour())
        if b.delay:
            time.sleep(b.delay)
        if b.fail and (b.fail_first == 0 or attempt <= b.fail_first):
            context.abort(getattr(grpc.StatusCode, b.fail), f"{name} fails on purpose")
        return name.encode()

    def attempts(self, row: str, client: str, batch: int) -> Dict[str, List[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._attempts.get((row, client, str(batch)), {}).items()}

    def attempt_times(self, row: str, client: str, batch: int) -> Dict[str, List[float]]:
        with self._lock:
            return {k: list(v) for k, v in self._times.get((row, client, str(batch)), {}).items()}

    def stop(self) -> None:
        for server in self._servers:
            server.stop(grace=None)


class _AnyMethod(grpc.GenericRpcHandler):
    def __init__(self, pods: Pods, name: str) -> None:
        self._handler = grpc.unary_unary_rpc_method_handler(lambda request, context: pods.handle(name, context))

    def service(self, handler_call_details: Any) -> Any:
        return self._handler


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Ep:
    """A ServiceEntry endpoint on pod ``pod`` (or :data:`DOWN`)."""

    pod: str
    labels: Mapping[str, str] = field(default_factory=dict)
    locality: str = ""
    weight: int = 0


@dataclass(frozen=True)
class Batch:
    """``n`` calls (``concurrency`` at a time) of ``method`` with ``md`` (+ ``md_each[i % len]``);
    ``sleep`` > 0 makes this a pause instead."""

    n: int = 0
    method: str = DEFAULT_METHOD
    md: Sequence[Tuple[str, str]] = ()
    md_each: Sequence[Sequence[Tuple[str, str]]] = ()
    timeout: float = 10.0
    concurrency: int = 1
    sleep: float = 0.0


@dataclass
class Outcome:
    """One client's view of one batch: per call (result, ms) and what the pods saw."""

    results: List[Tuple[str, float]]
    attempts: Dict[str, List[str]]
    client: str = ""
    attempt_times: Dict[str, List[float]] = field(default_factory=dict)  # monotonic, as the pods saw them

    @property
    def retry_gaps_ms(self) -> List[List[float]]:
        """Per request, the pauses between its attempts (backoff + one round trip)."""
        return [[(b - a) * 1000 for a, b in zip(t, t[1:])] for t in self.attempt_times.values()]

    @property
    def codes(self) -> Counter:
        return Counter(r for r, _ in self.results)

    @property
    def served(self) -> Counter:
        """Attempts each pod received (retries included)."""
        return Counter(p for tried in self.attempts.values() for p in tried)

    @property
    def tries(self) -> Counter:
        """How many requests needed how many attempts."""
        return Counter(len(tried) for tried in self.attempts.values())

    @property
    def latencies(self) -> List[float]:
        return [ms for _, ms in self.results]

    def result_of(self, i: int) -> str:
        return self.results[i][0]


Check = Callable[[List[Outcome], List[Outcome]], None]


@dataclass
class Row:
    name: str
    endpoints: Sequence[Ep]
    batches: Sequence[Batch]
    check: Check
    vs_http: str = ""  # YAML list for VirtualService spec.http ({host} = this row's FQDN)
    dr_spec: str = ""  # YAML mapping body for DestinationRule spec besides host (trafficPolicy, subsets)
    behaviours: Mapping[str, Behaviour] = field(default_factory=dict)
    patch: Optional[Callable[[str, Message], None]] = None  # amend this row's xDS resources
    meshpatch_missing: str = ""  # meshpatch lacks the feature yet: strict xfail with this reason
    # A deliberate difference (meshpatch follows Envoy where grpcio does less): the
    # check meshpatch's outcome must pass instead of matching grpcio, and why.
    divergence: Optional[Check] = None
    divergence_reason: str = ""

    @property
    def host(self) -> str:
        return fqdn(self.name)

    def yaml(self, pods: Pods) -> str:
        eps = []
        for ep in self.endpoints:
            ip, port = pods.addresses[ep.pod]
            fields = [f"address: {ip}", f"ports: {{grpc: {port}}}", f"labels: {json.dumps(dict(ep.labels) or {'pod': ep.pod})}"]
            if ep.locality:
                fields.append(f"locality: {ep.locality}")
            if ep.weight:
                fields.append(f"weight: {ep.weight}")
            eps.append("  - {" + ", ".join(fields) + "}")
        docs = [f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {self.name}, namespace: {NAMESPACE}}}
spec:
  hosts: [{self.host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {PORT}, name: grpc, protocol: GRPC}}]
  endpoints:
""" + "\n".join(eps)]
        if self.dr_spec:
            docs.append(f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {self.name}, namespace: {NAMESPACE}}}
spec:
  host: {self.host}
""" + _indent(self.dr_spec.strip("\n"), 2))
        if self.vs_http:
            docs.append(f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {self.name}, namespace: {NAMESPACE}}}
spec:
  hosts: [{self.host}]
  http:
""" + _indent(self.vs_http.strip("\n").replace("{host}", self.host), 2))
        return "\n---\n".join(docs) + "\n"


def _indent(text: str, n: int) -> str:
    import textwrap

    return textwrap.indent(textwrap.dedent(text), " " * n)


def resource_name(type_url: str, msg: Message) -> str:
    return getattr(msg, "cluster_name", "") if type_url.endswith("ClusterLoadAssignment") else getattr(msg, "name", "")


class Harness:
    """Pods, one control plane with every row, and the two client processes."""

    def __init__(self, rows: Sequence[Row], pods: int = 6) -> None:
        self.rows = {r.name: r for r in rows}
        self._outcomes: Dict[str, Dict[str, List[Outcome]]] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="meshpatch-xcheck-")
        self.pods = Pods(pods)
        for r in rows:
            for pod, b in r.behaviours.items():
                self.pods.behaviours[(r.name, pod)] = b
        self.cp = ControlPlane("\n---\n".join(r.yaml(self.pods) for r in rows), resource_hook=self._hook).start()
        assert self.cp.server.snapshot.config.skipped == [], self.cp.server.snapshot.config.skipped
        scratch = self._scratch.name
        boot: Dict[str, str] = {}
        for tag in CLIENTS:
            # same namespace, locality and labels (so the same resources); the pod name tells NACKs apart
            boot[tag] = write_bootstrap(os.path.join(scratch, f"{tag}.json"), self.cp.address,
                                        node_id=f"sidecar~127.0.0.1~{tag}-client.{NAMESPACE}~{NAMESPACE}.svc.cluster.local",
                                        locality={"region": "r1", "zone": "z1", "sub_zone": "s1"},
                                        metadata={"LABELS": {"app": "client"}})
        self.clients = {tag: ClientProcess(tag, boot[tag], tag == MESHPATCH, scratch) for tag in CLIENTS}
        for c in self.clients.values():
            c.wait_ready()

    def _hook(self, type_url: str, msg: Message) -> None:
        name = resource_name(type_url, msg)
        for row in self.rows.values():
            if row.patch is not None and row.host in name:
                row.patch(type_url, msg)

    def outcome(self, row: Row) -> Dict[str, List[Outcome]]:
        """:meth:`run`, once per row (several tests judge the same run)."""
        if row.name not in self._outcomes:
            self._outcomes[row.name] = self.run(row)
        return self._outcomes[row.name]

    def run(self, row: Row) -> Dict[str, List[Outcome]]:
        """Every batch of ``row`` on both clients at once."""
        out: Dict[str, List[Outcome]] = {tag: [] for tag in CLIENTS}
        with futures.ThreadPoolExecutor(len(CLIENTS)) as ex:
            for i, b in enumerate(row.batches):
                cmd: Dict[str, Any] = {"sleep": b.sleep} if b.sleep else {
                    "row": row.name, "batch": i, "target": f"{row.host}:{PORT}", "method": b.method, "n": b.n,
                    "md": [list(x) for x in b.md], "md_each": [[list(x) for x in m] for m in b.md_each],
                    "timeout": b.timeout, "concurrency": b.concurrency,
                }
                answers = dict(zip(CLIENTS, ex.map(lambda tag: self.clients[tag].request(cmd), CLIENTS)))
                if b.sleep:
                    continue
                for tag in CLIENTS:
                    results = [(r, ms) for r, ms in answers[tag]]
                    out[tag].append(Outcome(results, self.pods.attempts(row.name, tag, i), tag,
                                            self.pods.attempt_times(row.name, tag, i)))
        return out

    def nacks(self, tag: str) -> List[str]:
        """Resource types the client NACKed (last error per type), from the control plane's view."""
        errors = []
        for s in self.cp.server.streams():
            if str(s["node_id"]).split("~")[2].startswith(f"{tag}-client"):
                for t, sub in s["subscriptions"].items():  # type: ignore[union-attr]
                    if sub["last_error"]:
                        errors.append(f"{t.rsplit('.', 1)[-1]}: {sub['last_error']}")
        return errors

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.cp.stop()
        self.pods.stop()
        self._scratch.cleanup()


# --------------------------------------------------------------------------- checks


def chi2_same(a: Mapping[str, int], b: Mapping[str, int], what: str, p_min: float = 1e-4) -> None:
    """The two samples come from one distribution (chi-square test of homogeneity).
    p_min 1e-4: a run makes ~30 such tests, so a correct meshpatch fails one
    by chance in about 0.3 % of runs; real differences give p < 1e-10."""
    from scipy.stats import chi2_contingency

    keys = sorted(k for k in set(a) | set(b) if a.get(k, 0) or b.get(k, 0))
    if len(keys) < 2:
        assert dict(a).keys() == dict(b).keys(), f"{what}: native {dict(a)} vs meshpatch {dict(b)}"
        return
    table = [[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]]
    p = chi2_contingency(table).pvalue
    assert p > p_min, f"{what}: native {dict(a)} vs meshpatch {dict(b)} differ (chi-square p={p:.2g})"


def chi2_fits(counts: Mapping[str, int], expected: Mapping[str, float], what: str, p_min: float = 1e-4) -> None:
    """``counts`` fit the ``expected`` shares (chi-square goodness of fit)."""
    from scipy.stats import chisquare

    n = sum(counts.values())
    assert set(counts) <= set(expected), f"{what}: unexpected outcomes {dict(counts)} (expected only {sorted(expected)})"
    keys = sorted(k for k in expected if expected[k] > 0)
    p = chisquare([counts.get(k, 0) for k in keys], [expected[k] * n for k in keys]).pvalue
    assert p > p_min, f"{what}: {dict(counts)} does not fit {dict(expected)} (chi-square p={p:.2g})"


def both(native: Sequence[Outcome], mesh: Sequence[Outcome]) -> Iterator[Tuple[str, Sequence[Outcome]]]:
    yield NATIVE, native
    yield MESHPATCH, mesh

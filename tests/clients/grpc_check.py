#!/usr/bin/env python3
"""Checks kas-gateway's gRPC API with grpcio, the way a new user would script it.

The stubs are generated at run time from the repository's proto/ with grpcio-tools
(`python -m grpc_tools.protoc`), with the well-known types that grpcio-tools ships.

Environment:
  KAS_GATEWAY_URL            base URL of a running gateway, e.g. http://127.0.0.1:8080
                             (gRPC is served in h2c on the same port)
  KAS_GATEWAY_TOKEN          personal access token of the administrator `root`
  KAS_GATEWAY_GITLAB_SECRET  base64 of the gateway's GitLab secret (optional: without it the
                             JWT step is skipped)
  KAS_GATEWAY_BIN            path of the kas-gateway binary, to start `agent-sim`

Each step prints one line (PASS or FAIL with the reason); the last line is
"grpc: N passed, M failed". Exit status 0 only if every step passed.

Run it with tests/clients/run-checks.sh grpc, which starts a gateway for it.
"""

import atexit
import base64
import hashlib
import hmac
import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_tools import protoc
except ImportError:  # pragma: no cover - environment problem, not a check
    sys.exit(
        "grpcio, grpcio-tools or grpcio-health-checking is not installed: "
        "pip install -r tests/clients/grpc-requirements.txt"
    )


def env(name, required=True):
    value = os.environ.get(name, "").strip()
    if required and not value:
        sys.exit(f"error: environment variable {name} is not set (see the top of {__file__})")
    return value


URL = env("KAS_GATEWAY_URL").rstrip("/")
TOKEN = env("KAS_GATEWAY_TOKEN")
GITLAB_SECRET = env("KAS_GATEWAY_GITLAB_SECRET", required=False)
GATEWAY_BIN = env("KAS_GATEWAY_BIN")
SUFFIX = uuid.uuid4().hex[:8]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO_ROOT, "proto")
GATEWAY_PROTO = "kas_gateway/v1/gateway.proto"
TIMEOUT = 10  # seconds, for each RPC

_parsed = urllib.parse.urlsplit(URL)
if _parsed.scheme != "http" or not _parsed.hostname or not _parsed.port:
    sys.exit(f"error: KAS_GATEWAY_URL must be http://host:port, got {URL!r}")
GRPC_TARGET = f"{_parsed.hostname}:{_parsed.port}"
ADMIN = (("private-token", TOKEN),)


# --------------------------------------------------------------------------- stubs


def generate_stubs():
    """Runs grpc_tools.protoc on proto/ into a temporary directory and imports the modules."""
    out = tempfile.mkdtemp(prefix="kas-gateway-grpc-stubs-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(PROTO_DIR, GATEWAY_PROTO),
    ]
    code = protoc.main(args)
    if code != 0:
        sys.exit(f"error: grpc_tools.protoc failed with status {code} on {GATEWAY_PROTO}")
    sys.path.insert(0, out)
    from kas_gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402

    return gateway_pb2, gateway_pb2_grpc


pb, pb_grpc = generate_stubs()
channel = grpc.insecure_channel(GRPC_TARGET)
url_configs = pb_grpc.UrlConfigurationsStub(channel)
sessions = pb_grpc.SessionsStub(channel)

# State shared between steps; a step whose prerequisite failed fails with a clear reason.
ctx = {}


class PrerequisiteFailed(AssertionError):
    """A step could not run because an earlier step it builds on failed."""


class Skipped(Exception):
    """A step that does not apply here (reported as SKIP, counted neither way)."""


def need(key, step):
    if key not in ctx:
        raise PrerequisiteFailed(f"not run: needs the result of step {step}, which failed")
    return ctx[key]


def expect_rpc_error(code, fn, request, **kwargs):
    """Calls fn(request), asserts it fails with `code`, returns the grpc.RpcError."""
    kwargs.setdefault("timeout", TIMEOUT)
    try:
        result = fn(request, **kwargs)
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()!r}"
        return e
    raise AssertionError(f"expected {code.name}, call returned {result!r}")


def rest(method, path, body=None):
    """A REST call with the admin token; returns (status, parsed JSON or None)."""
    data = None
    headers = {"Private-Token": TOKEN}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(f"{URL}/api/v4{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        raise AssertionError(f"{method} {path} returned HTTP {e.code}: {raw[:300]!r}") from None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def gitlab_jwt(secret_b64, audience="gitlab-kas", issuer="gitlab.example.com", lifetime=60):
    """An HS256 JWT as GitLab signs its calls to KAS, keyed with the decoded secret.

    As GitLab's JSONWebToken::HMACToken writes it: header {"typ":"JWT","alg":"HS256"}, then
    jti (a UUID), aud, iss (GitLab's host name), iat, nbf five seconds back, exp a minute on.
    """
    key = base64.b64decode(secret_b64)
    now = int(time.time())
    header = {"typ": "JWT", "alg": "HS256"}
    claims = {
        "jti": str(uuid.uuid4()),
        "aud": audience,
        "iss": issuer,
        "iat": now,
        "nbf": now - 5,
        "exp": now + lifetime,
    }
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    tag = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(tag)}"


# --------------------------------------------------------------------------- steps


def step_health():
    """grpc.health.v1.Health/Check without credentials: SERVING"""
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING, (
        f"status is {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
    )


def step_auth():
    """no credentials: UNAUTHENTICATED; admin token in private-token metadata: OK"""
    req = pb.ListUrlConfigurationsRequest()
    expect_rpc_error(grpc.StatusCode.UNAUTHENTICATED, url_configs.ListUrlConfigurations, req)
    expect_rpc_error(
        grpc.StatusCode.UNAUTHENTICATED,
        url_configs.ListUrlConfigurations,
        req,
        metadata=(("private-token", "glpat-not-a-real-token-" + SUFFIX),),
    )
    resp = url_configs.ListUrlConfigurations(req, metadata=ADMIN, timeout=TIMEOUT)
    assert resp.total == len(resp.url_configurations), f"list returned {resp}"
    sresp = sessions.ListSessions(pb.ListSessionsRequest(), metadata=ADMIN, timeout=TIMEOUT)
    assert isinstance(list(sresp.sessions), list)


def step_create_url_configuration():
    """REST setup, then CreateUrlConfiguration: key, duplicate, invalid URL"""
    _, project = rest("POST", "/projects", {"name": f"grpc-check-{SUFFIX}"})
    assert isinstance(project.get("id"), int), f"project create returned {project}"
    pid = project["id"]
    _, agent = rest("POST", f"/projects/{pid}/cluster_agents", {"name": "agent-1"})
    assert isinstance(agent.get("id"), int), f"agent create returned {agent}"
    aid = agent["id"]
    _, tok = rest("POST", f"/projects/{pid}/cluster_agents/{aid}/tokens", {"name": "t"})
    assert str(tok.get("token", "")).startswith("glagent-"), f"token create returned {tok}"
    ctx.update(project_id=pid, agent_id=aid, agent_token=tok["token"])

    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    created = url_configs.CreateUrlConfiguration(
        pb.CreateUrlConfigurationRequest(agent_id=aid, url=url), metadata=ADMIN, timeout=TIMEOUT
    )
    assert created.agent_id == aid, f"agent_id is {created.agent_id}, expected {aid}"
    assert created.url == url, f"url is {created.url!r}"
    assert created.project_id == pid, f"project_id is {created.project_id}, expected {pid}"
    assert created.HasField("public_key"), "no public_key in JWT mode"
    key = created.public_key
    assert len(key) == 44, f"public_key {key!r} is {len(key)} chars, expected 44"
    assert len(base64.b64decode(key, validate=True)) == 32, f"public_key {key!r} is not 32 bytes"
    assert not created.HasField("client_cert"), f"client_cert is {created.client_cert!r}"
    ctx.update(url_config_id=created.id, public_key=key, agent_port=port, agent_url=url)

    e = expect_rpc_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        url_configs.CreateUrlConfiguration,
        pb.CreateUrlConfigurationRequest(agent_id=aid, url=f"grpc://127.0.0.1:{free_port()}"),
        metadata=ADMIN,
    )
    assert "already exists" in e.details(), f"duplicate details are {e.details()!r}"

    e = expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        url_configs.CreateUrlConfiguration,
        pb.CreateUrlConfigurationRequest(agent_id=aid, url="not a url"),
        metadata=ADMIN,
    )
    assert "Url is not a valid URL" in e.details(), f"invalid URL details are {e.details()!r}"

    got = url_configs.GetUrlConfiguration(
        pb.GetUrlConfigurationRequest(id=created.id), metadata=ADMIN, timeout=TIMEOUT
    )
    assert got == created, f"GetUrlConfiguration returned {got}, created {created}"


def step_gitlab_jwt():
    """ListUrlConfigurations signed as GitLab signs (bearer, host-name iss, jti); bad JWTs refused"""
    if not GITLAB_SECRET:
        raise Skipped("KAS_GATEWAY_GITLAB_SECRET is not set")
    aid = need("agent_id", 3)
    config_id = need("url_config_id", 3)
    # Exactly GitLab's metadata: Gitlab::Kas::Client sends a lower-case `bearer`.
    jwt = gitlab_jwt(GITLAB_SECRET)
    resp = url_configs.ListUrlConfigurations(
        pb.ListUrlConfigurationsRequest(agent_id=aid),
        metadata=(("authorization", f"bearer {jwt}"),),
        timeout=TIMEOUT,
    )
    ids = [c.id for c in resp.url_configurations]
    assert ids == [config_id], f"list for agent {aid} returned ids {ids}, expected [{config_id}]"
    assert resp.total == 1 and resp.next_page == 0, f"total {resp.total}, next_page {resp.next_page}"
    assert resp.url_configurations[0].public_key == ctx["public_key"]

    for what, bad in (
        ("wrong audience", gitlab_jwt(GITLAB_SECRET, audience="gitlab-agent")),
        # No KAS_GATEWAY_GITLAB_ISSUER here: any host name is GitLab's, but one is needed.
        ("empty issuer", gitlab_jwt(GITLAB_SECRET, issuer="")),
        ("exp too far ahead", gitlab_jwt(GITLAB_SECRET, lifetime=3600)),
        ("wrong secret", gitlab_jwt(base64.b64encode(os.urandom(32)).decode())),
    ):
        try:
            expect_rpc_error(
                grpc.StatusCode.UNAUTHENTICATED,
                url_configs.ListUrlConfigurations,
                pb.ListUrlConfigurationsRequest(),
                metadata=(("authorization", f"Bearer {bad}"),),
            )
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None


def step_agent_sim_session():
    """agent-sim: GetSession reaches CONNECTED, agent info, PingAgent round trip"""
    aid = need("agent_id", 3)
    port = need("agent_port", 3)
    # This script's KAS_GATEWAY_* variables are not the binary's settings: keep them out.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("KAS_GATEWAY_")}
    log = tempfile.NamedTemporaryFile(prefix="agent-sim-", suffix=".log", delete=False)
    cmd = [
        GATEWAY_BIN, "agent-sim",
        "--listen", f"127.0.0.1:{port}",
        "--token", ctx["agent_token"],
        "--jwt-public-key", ctx["public_key"],
    ]
    proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    ok = False
    try:
        deadline = time.monotonic() + 30
        session = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"agent-sim exited with status {proc.returncode}")
            session = sessions.GetSession(
                pb.GetSessionRequest(agent_id=aid), metadata=ADMIN, timeout=TIMEOUT
            )
            if session.state == pb.SESSION_STATE_CONNECTED:
                break
            time.sleep(0.25)
        state = pb.SessionState.Name(session.state) if session else "none"
        assert session is not None and session.state == pb.SESSION_STATE_CONNECTED, (
            f"session still {state} after 30 s (last_error {session.last_error!r})"
        )
        assert session.url == ctx["agent_url"], f"session url is {session.url!r}"
        assert session.url_configuration_id == ctx["url_config_id"], (
            f"session url_configuration_id is {session.url_configuration_id}"
        )
        assert session.HasField("connected_since"), "no connected_since on a connected session"
        assert session.HasField("agent"), "no agent info on a connected session"
        assert session.agent.version.startswith("agent-sim"), (
            f"agent version is {session.agent.version!r}"
        )

        payload = f"hello-{SUFFIX}".encode()
        pong = sessions.PingAgent(
            pb.PingAgentRequest(agent_id=aid, payload=payload), metadata=ADMIN, timeout=TIMEOUT
        )
        assert pong.payload == payload, f"PingAgent payload is {pong.payload!r}, sent {payload!r}"
        assert pong.round_trip_us > 0, f"round_trip_us is {pong.round_trip_us}"
        ok = True
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if not ok:
            with open(log.name, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()[-20:]
            for line in lines:
                print(f"      agent-sim: {line}", flush=True)
        os.unlink(log.name)


def step_rest_visibility_and_delete():
    """REST lists the configuration; DeleteUrlConfiguration; REST list empty"""
    pid = need("project_id", 3)
    aid = need("agent_id", 3)
    config_id = need("url_config_id", 3)
    path = f"/projects/{pid}/cluster_agents/{aid}/url_configurations"
    _, listed = rest("GET", path)
    assert isinstance(listed, list), f"GET {path} returned {listed!r}"
    assert [c.get("id") for c in listed] == [config_id], f"GET {path} returned {listed}"
    assert listed[0].get("public_key") == ctx["public_key"], (
        f"REST public_key {listed[0].get('public_key')!r}, gRPC {ctx['public_key']!r}"
    )
    assert listed[0].get("url") == ctx["agent_url"], f"REST url is {listed[0].get('url')!r}"

    url_configs.DeleteUrlConfiguration(
        pb.DeleteUrlConfigurationRequest(id=config_id), metadata=ADMIN, timeout=TIMEOUT
    )
    _, listed = rest("GET", path)
    assert listed == [], f"GET {path} after the delete returned {listed}"
    expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        url_configs.GetUrlConfiguration,
        pb.GetUrlConfigurationRequest(id=config_id),
        metadata=ADMIN,
    )
    expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        sessions.GetSession,
        pb.GetSessionRequest(agent_id=aid),
        metadata=ADMIN,
    )


STEPS = [
    step_health,
    step_auth,
    step_create_url_configuration,
    step_gitlab_jwt,
    step_agent_sim_session,
    step_rest_visibility_and_delete,
]


def step_frames(exc):
    """The traceback's frames in this file's steps (not in the helpers they call)."""
    tb = traceback.extract_tb(exc.__traceback__)
    return [f for f in tb if f.filename == __file__ and f.name.startswith("step_")]


def run_step(number, fn):
    """Runs one step; returns True (pass), False (fail) or None (skipped)."""
    title = fn.__doc__.strip().splitlines()[0]
    try:
        fn()
    except Skipped as e:
        print(f"[{number}] SKIP {title}: {e}", flush=True)
        return None
    except AssertionError as e:
        print(f"[{number}] FAIL {title}: {e or 'assertion failed'}", flush=True)
        here = step_frames(e)
        if here and not isinstance(e, PrerequisiteFailed):
            print(f"      at line {here[-1].lineno}: {here[-1].line}", flush=True)
        return False
    except grpc.RpcError as e:
        print(
            f"[{number}] FAIL {title}: unexpected gRPC error {e.code().name}: {e.details()!r}",
            flush=True,
        )
        here = step_frames(e)
        if here:
            print(f"      at line {here[-1].lineno}: {here[-1].line}", flush=True)
        return False
    except Exception as e:  # noqa: BLE001 - report any crash as a failed step
        print(f"[{number}] FAIL {title}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        return False
    print(f"[{number}] PASS {title}", flush=True)
    return True


def main():
    print(f"grpcio {grpc.__version__} against {GRPC_TARGET} (h2c)", flush=True)
    passed = failed = 0
    for number, fn in enumerate(STEPS, start=1):
        result = run_step(number, fn)
        if result is True:
            passed += 1
        elif result is False:
            failed += 1
    channel.close()
    print(f"grpc: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Checks kas-gateway with python-gitlab, the way a new user would script it.

Environment:
  KAS_GATEWAY_URL    base URL of a running gateway, e.g. http://127.0.0.1:8080
  KAS_GATEWAY_TOKEN  personal access token (scope api) of the administrator `root`

Each step prints one line (PASS or FAIL with the reason); the last line is
"python-gitlab: N passed, M failed". Exit status 0 only if every step passed.

Run it with tests/clients/run-checks.sh python-gitlab, which starts a gateway for it.
"""

import os
import sys
import traceback
import uuid
import warnings

try:
    import gitlab
    from gitlab.exceptions import (
        GitlabAuthenticationError,
        GitlabCreateError,
        GitlabError,
        GitlabGetError,
        GitlabHttpError,
    )
except ImportError:  # pragma: no cover - environment problem, not a check
    sys.exit(
        "python-gitlab is not installed: pip install -r tests/clients/requirements.txt"
    )


def env(name):
    value = os.environ.get(name, "").strip()
    if not value:
        sys.exit(f"error: environment variable {name} is not set (see the top of {__file__})")
    return value


URL = env("KAS_GATEWAY_URL").rstrip("/")
TOKEN = env("KAS_GATEWAY_TOKEN")
SUFFIX = uuid.uuid4().hex[:8]

# State shared between steps; a step whose prerequisite failed fails with a clear reason.
ctx = {}


class PrerequisiteFailed(AssertionError):
    """A step could not run because an earlier step it builds on failed."""


def need(key, step):
    if key not in ctx:
        raise PrerequisiteFailed(f"not run: needs the result of step {step}, which failed")
    return ctx[key]


def expect_error(exc_type, code, fn, *args, **kwargs):
    """Calls fn, asserts it raises exc_type with response_code == code, returns the exception."""
    try:
        result = fn(*args, **kwargs)
    except exc_type as e:
        assert e.response_code == code, (
            f"expected HTTP {code}, got {e.response_code}: {e.error_message!r}"
        )
        return e
    raise AssertionError(f"expected {exc_type.__name__} ({code}), call returned {result!r}")


def tokens_path(project_id, agent_id):
    return f"/projects/{project_id}/cluster_agents/{agent_id}/tokens"


# --------------------------------------------------------------------------- steps


def step_auth():
    """gitlab.Gitlab(url, private_token=...).auth() and gl.user is root"""
    gl = gitlab.Gitlab(URL, private_token=TOKEN)
    gl.auth()
    assert gl.user is not None, "gl.user is None after auth()"
    assert gl.user.username == "root", f"gl.user.username is {gl.user.username!r}"
    assert isinstance(gl.user.id, int), f"user id {gl.user.id!r} is not an integer"
    ctx["gl"] = gl
    ctx["root_id"] = gl.user.id


def step_project():
    """gl.projects.create() and gl.projects.get("root/<path>")"""
    gl = need("gl", 1)
    name = f"pgl-check-{SUFFIX}"
    created = gl.projects.create({"name": name})
    assert created.name == name, f"created project name is {created.name!r}"
    assert isinstance(created.id, int), f"project id {created.id!r} is not an integer"
    full_path = f"root/{created.path}"
    assert created.path_with_namespace == full_path, (
        f"path_with_namespace is {created.path_with_namespace!r}, expected {full_path!r}"
    )
    # python-gitlab URL-encodes the path: GET /projects/root%2F<path>
    project = gl.projects.get(full_path)
    assert project.id == created.id, f"get by path returned project {project.id}, expected {created.id}"
    assert project.name == name
    same = gl.projects.get(created.id)
    assert same.path_with_namespace == full_path
    expect_error(GitlabGetError, 404, gl.projects.get, f"root/no-such-project-{SUFFIX}")
    ctx["project"] = project


def step_agents():
    """project.cluster_agents: create two, list (order, pagination), get, delete"""
    project = need("project", 2)
    root_id = need("root_id", 1)
    agents = project.cluster_agents
    # Created in reverse order so that the name ordering of the list is visible.
    b = agents.create({"name": "agent-b"})
    a = agents.create({"name": "agent-a"})
    for agent, name in ((a, "agent-a"), (b, "agent-b")):
        assert agent.name == name, f"created agent name is {agent.name!r}"
        assert isinstance(agent.id, int), f"agent id {agent.id!r} is not an integer"
        assert agent.config_project["id"] == project.id, f"config_project is {agent.config_project!r}"
        assert agent.created_by_user_id == root_id, (
            f"created_by_user_id is {agent.created_by_user_id!r}, expected {root_id}"
        )
        assert agent.created_at, "created_at is empty"

    listed = agents.list(get_all=True)
    names = [x.name for x in listed]
    assert names == ["agent-a", "agent-b"], f"list(get_all=True) returned {names}"

    # One per page: python-gitlab must follow the Link rel="next" header.
    paged = agents.list(get_all=True, per_page=1)
    names = [x.name for x in paged]
    assert names == ["agent-a", "agent-b"], f"list(get_all=True, per_page=1) returned {names}"

    it = agents.list(iterator=True, per_page=1)
    assert it.total == 2, f"iterator total (X-Total) is {it.total!r}"
    assert it.total_pages == 2, f"iterator total_pages (X-Total-Pages) is {it.total_pages!r}"
    assert it.per_page == 1, f"iterator per_page (X-Per-Page) is {it.per_page!r}"
    names = [x.name for x in it]
    assert names == ["agent-a", "agent-b"], f"list(iterator=True, per_page=1) yielded {names}"

    page2 = agents.list(page=2, per_page=1)
    assert [x.name for x in page2] == ["agent-b"], f"page 2 returned {[x.name for x in page2]}"

    got = agents.get(b.id)
    assert got.id == b.id and got.name == "agent-b", f"get({b.id}) returned {got.attributes}"

    got.delete()  # DELETE /projects/:id/cluster_agents/:agent_id
    e = expect_error(GitlabGetError, 404, agents.get, b.id)
    assert "Not found" in str(e.error_message), f"404 message is {e.error_message!r}"
    names = [x.name for x in agents.list(get_all=True)]
    assert names == ["agent-a"], f"list after delete returned {names}"


def step_duplicate_agent():
    """creating an agent with a taken name: GitlabCreateError 400"""
    project = need("project", 2)
    project.cluster_agents.create({"name": "dup-agent"})
    e = expect_error(GitlabCreateError, 400, project.cluster_agents.create, {"name": "dup-agent"})
    assert "Name has already been taken" in str(e.error_message), (
        f"error message is {e.error_message!r}"
    )


def step_tokens():
    """agent tokens with gl.http_post/http_get/http_list/http_delete"""
    gl = need("gl", 1)
    project = need("project", 2)
    root_id = need("root_id", 1)
    agent = project.cluster_agents.create({"name": "token-agent"})
    path = tokens_path(project.id, agent.id)

    t1 = gl.http_post(path, post_data={"name": "t1", "description": "d"})
    assert isinstance(t1, dict), f"create returned {t1!r}"
    secret = t1.get("token")
    assert isinstance(secret, str) and secret.startswith("glagent-"), f"token is {secret!r}"
    assert t1["name"] == "t1" and t1["description"] == "d", f"create returned {t1}"
    assert t1["agent_id"] == agent.id, f"agent_id is {t1['agent_id']!r}"
    assert t1["status"] == "active", f"status is {t1['status']!r}"
    assert t1["created_by_user_id"] == root_id, f"created_by_user_id is {t1['created_by_user_id']!r}"
    assert t1["created_at"], "created_at is empty"
    assert "last_used_at" in t1 and t1["last_used_at"] is None, f"create returned {t1}"

    one = gl.http_get(f"{path}/{t1['id']}")
    assert "token" not in one, "GET of a token returned its secret"
    assert "last_used_at" in one, f"GET of a token has no last_used_at: {one}"
    assert one["last_used_at"] is None, f"last_used_at is {one['last_used_at']!r}"
    assert one["id"] == t1["id"] and one["status"] == "active", f"GET returned {one}"

    t2 = gl.http_post(path, post_data={"name": "t2"})
    assert t2["token"].startswith("glagent-") and t2["token"] != secret

    listed = gl.http_list(path, get_all=True)
    ids = sorted(x["id"] for x in listed)
    assert ids == sorted([t1["id"], t2["id"]]), f"http_list returned ids {ids}"
    assert all(x["status"] == "active" for x in listed), f"http_list returned {listed}"
    assert all("token" not in x for x in listed), "token list returned a secret"
    as_get = gl.http_get(path)
    assert isinstance(as_get, list) and sorted(x["id"] for x in as_get) == ids, (
        f"http_get of the list returned {as_get!r}"
    )

    e = expect_error(GitlabHttpError, 400, gl.http_post, path, post_data={"name": "t3"})
    assert "An agent can have only two active tokens at a time" in str(e.error_message), (
        f"error message is {e.error_message!r}"
    )

    resp = gl.http_delete(f"{path}/{t1['id']}")
    assert resp.status_code == 204, f"DELETE returned {resp.status_code}"
    expect_error(GitlabHttpError, 404, gl.http_get, f"{path}/{t1['id']}")
    ids = [x["id"] for x in gl.http_list(path, get_all=True)]
    assert ids == [t2["id"]], f"list after revoke returned ids {ids}"

    # With one active token left, a new one can be created again.
    t3 = gl.http_post(path, post_data={"name": "t3"})
    assert t3["token"].startswith("glagent-")
    ids = sorted(x["id"] for x in gl.http_list(path, get_all=True))
    assert ids == sorted([t2["id"], t3["id"]]), f"list after re-create returned ids {ids}"
    ctx["token_agent_id"] = agent.id


def step_read_api_token():
    """a Developer with a read_api token can list agents but not create one (403)"""
    gl = need("gl", 1)
    project = need("project", 2)
    username = f"pgl-ro-{SUFFIX}"
    user = gl.users.create(
        {"email": f"{username}@example.com", "username": username, "name": "Read Only"}
    )
    assert user.username == username and isinstance(user.id, int), f"created {user.attributes}"
    pat = gl.http_post(
        f"/users/{user.id}/personal_access_tokens",
        post_data={"name": "ro", "scopes": ["read_api"]},
    )
    assert pat.get("scopes") == ["read_api"], f"token scopes are {pat.get('scopes')!r}"
    ro_token = pat["token"]

    member = project.members.create({"user_id": user.id, "access_level": 30})
    assert member.id == user.id and member.access_level == 30, f"member is {member.attributes}"

    ro = gitlab.Gitlab(URL, private_token=ro_token)
    ro.auth()
    assert ro.user.username == username, f"read_api client is {ro.user.username!r}"
    ro_project = ro.projects.get(project.path_with_namespace)
    assert ro_project.id == project.id
    names = [x.name for x in ro_project.cluster_agents.list(get_all=True)]
    assert "agent-a" in names or "dup-agent" in names or "token-agent" in names, (
        f"read_api list returned {names}"
    )
    if "token_agent_id" in ctx:
        agent_id = ctx["token_agent_id"]
        assert ro_project.cluster_agents.get(agent_id).name == "token-agent"
        tokens = ro.http_list(tokens_path(project.id, agent_id), get_all=True)
        assert len(tokens) == 2, f"read_api token list returned {tokens}"

    e = expect_error(GitlabCreateError, 403, ro_project.cluster_agents.create, {"name": "ro-agent"})
    assert e.error_message in ("insufficient_scope", "403 Forbidden"), (
        f"403 message is {e.error_message!r}"
    )
    names = [x.name for x in project.cluster_agents.list(get_all=True)]
    assert "ro-agent" not in names, "the refused agent was created anyway"


def step_version():
    """gl.version() names the API's GitLab release and gl.metadata's agent server is the gateway"""
    gl = need("gl", 1)
    version, revision = gl.version()
    assert version == "17.4.0", f"gl.version() is {version!r}"
    assert revision.startswith("kas-gateway-"), f"revision is {revision!r}"
    metadata = gl.http_get("/metadata")
    assert metadata["kas"]["enabled"] is True, f"metadata is {metadata}"
    assert metadata["kas"]["externalUrl"], f"metadata is {metadata}"


def step_sudo():
    """sudo (by username and by id) with an administrator's sudo token; refused for a non-admin"""
    gl = need("gl", 1)
    root = gl.users.get(ctx["root_id"])
    sudo_token = root.personal_access_tokens.create({"name": "sudo", "scopes": ["api", "sudo"]})
    admin = gitlab.Gitlab(URL, private_token=sudo_token.token)
    username = f"pgl-sudo-{SUFFIX}"
    user = gl.users.create(
        {"email": f"{username}@example.com", "username": username, "name": "Sudo Target"}
    )
    me = admin.http_get("/user", sudo=username)
    assert me["id"] == user.id, f"sudo by username ran as {me['username']!r}"
    me = admin.http_get("/user", sudo=user.id)
    assert me["username"] == username, f"sudo by id ran as {me['username']!r}"
    projects = admin.projects.list(sudo=username, get_all=True)
    assert projects == [], f"the target sees {[p.path_with_namespace for p in projects]}"
    e = expect_error(GitlabHttpError, 404, admin.http_get, "/user", sudo=f"nobody-{SUFFIX}")
    assert "Not Found" in str(e.error_message), f"404 message is {e.error_message!r}"
    pat = gl.http_post(
        f"/users/{user.id}/personal_access_tokens", post_data={"name": "api", "scopes": ["api"]}
    )
    plain = gitlab.Gitlab(URL, private_token=pat["token"])
    e = expect_error(GitlabHttpError, 403, plain.http_get, "/user", sudo="root")
    assert "Must be admin to use sudo" in str(e.error_message), f"403 message is {e.error_message!r}"


def step_token_revocation():
    """gl.personal_access_tokens: list, get, rotate, delete; a revoked token stops working"""
    gl = need("gl", 1)
    username = f"pgl-pat-{SUFFIX}"
    user = gl.users.create(
        {"email": f"{username}@example.com", "username": username, "name": "Token Owner"}
    )
    created = gl.http_post(
        f"/users/{user.id}/personal_access_tokens", post_data={"name": "leaky", "scopes": ["api"]}
    )
    owner = gitlab.Gitlab(URL, private_token=created["token"])
    owner.auth()
    listed = gl.personal_access_tokens.list(user_id=user.id, get_all=True)
    assert [t.id for t in listed] == [created["id"]], f"listed {[t.id for t in listed]}"
    token = gl.personal_access_tokens.get(created["id"])
    assert token.name == "leaky" and token.active, f"token is {token.attributes}"
    own = owner.personal_access_tokens.list(get_all=True)
    assert [t.id for t in own] == [created["id"]], f"the owner lists {[t.id for t in own]}"
    token.rotate()
    assert token.id != created["id"] and token.token, f"rotated to {token.attributes}"
    expect_error(GitlabAuthenticationError, 401, owner.auth)
    rotated = gitlab.Gitlab(URL, private_token=token.token)
    rotated.auth()
    gl.personal_access_tokens.delete(token.id)
    expect_error(GitlabAuthenticationError, 401, rotated.auth)
    revoked = gl.personal_access_tokens.list(user_id=user.id, revoked=True, get_all=True)
    assert len(revoked) == 2, f"revoked tokens: {[t.id for t in revoked]}"


STEPS = [
    step_auth,
    step_project,
    step_agents,
    step_duplicate_agent,
    step_tokens,
    step_read_api_token,
    step_version,
    step_sudo,
    step_token_revocation,
]


def run_step(number, fn):
    title = fn.__doc__.strip().splitlines()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            # python-gitlab warns, e.g., when a Link header points elsewhere than the
            # configured URL or a list was silently truncated: a user would see that.
            ours = [w for w in caught if "gitlab" in (w.filename or "")]
            if ours:
                raise AssertionError(
                    "python-gitlab warned: " + "; ".join(str(w.message) for w in ours)
                )
        except AssertionError as e:
            print(f"[{number}] FAIL {title}: {e or 'assertion failed'}", flush=True)
            tb = traceback.extract_tb(e.__traceback__)
            if tb and not isinstance(e, PrerequisiteFailed):
                print(f"      at line {tb[-1].lineno}: {tb[-1].line}", flush=True)
            return False
        except GitlabError as e:
            print(
                f"[{number}] FAIL {title}: unexpected {type(e).__name__} "
                f"(HTTP {e.response_code}): {e.error_message!r}",
                flush=True,
            )
            tb = traceback.extract_tb(e.__traceback__)
            here = [f for f in tb if f.filename == __file__]
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
    print(f"python-gitlab {gitlab.__version__} against {URL}", flush=True)
    passed = failed = 0
    for number, fn in enumerate(STEPS, start=1):
        if run_step(number, fn):
            passed += 1
        else:
            failed += 1
    print(f"python-gitlab: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Image references, registry digests and the site's image lock file.

``FakeRegistry`` is a local stand-in speaking the Registry HTTP API v2 (manifests by tag and by
digest, ``Docker-Content-Digest``, the bearer-token challenge and token endpoint), served over
real HTTP on 127.0.0.1; it is not a recording of a real registry's answers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml

from servekit.images.lock import (
    LOCK_NAME,
    LockError,
    LockStatus,
    check,
    lock,
    lock_path,
    read_lock,
    render_status_table,
    write_lock,
)
from servekit.images.registry import (
    MANIFEST_TYPES,
    ImageRef,
    RegistryError,
    parse_reference,
    resolve_digest,
)

OCI_INDEX, DOCKER_LIST, DOCKER_MANIFEST, OCI_MANIFEST = MANIFEST_TYPES
SERVICE = "fake-registry"
TOKEN = "tok-3f9a"
REPO = "servekit/vllm-cpu"
T0 = datetime(2026, 12, 6, 10, 0, 0, tzinfo=UTC)
T1 = datetime(2026, 12, 7, 11, 30, 0, tzinfo=UTC)


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def fake_digest(char: str) -> str:
    return "sha256:" + char * 64


class FakeRegistry:
    """Manifests by (repository, tag or digest); switches for token auth and the digest header."""

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.require_token = False
        self.send_digest_header = True
        self.digest_header: str | None = None  # sent instead of the true digest
        self.requests: list[tuple[str, str]] = []
        self.token_auth: list[str | None] = []
        self.basic_login: tuple[str, str] | None = None  # the token endpoint's login
        self.registry_login: tuple[str, str] | None = None  # HTTP basic on the registry itself
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def push(self, repository: str, tag: str, body: bytes, media_type: str) -> str:
        digest = digest_of(body)
        self.manifests[(repository, tag)] = (media_type, body)
        self.manifests[(repository, digest)] = (media_type, body)
        return digest

    def ref(self, repository: str = REPO, tag: str = "v0.32.0") -> str:
        return f"{self.host}/{repository}:{tag}"

    def start(self) -> FakeRegistry:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                fake._manifest(self, send_body=False)

            def do_GET(self) -> None:
                if self.path.startswith("/token"):
                    fake._token(self)
                else:
                    fake._manifest(self, send_body=True)

        return Handler

    def _answer(self, handler, code: int, body: bytes = b"", headers=(), send_body=True) -> None:
        handler.send_response(code)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)

    def _manifest(self, handler, *, send_body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        _, _, rest = handler.path.partition("/v2/")
        repository, _, reference = rest.rpartition("/manifests/")
        if self.require_token and handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            challenge = (
                f'Bearer realm="http://{self.host}/token",service="{SERVICE}",'
                f'scope="repository:{repository}:pull"'
            )
            self._answer(handler, 401, headers=[("WWW-Authenticate", challenge)])
            return
        if self.registry_login and handler.headers.get("Authorization") != _basic(
            *self.registry_login
        ):
            self._answer(handler, 401, headers=[("WWW-Authenticate", 'Basic realm="fake"')])
            return
        found = self.manifests.get((repository, reference))
        accepted = [t.strip() for t in handler.headers.get("Accept", "").split(",")]
        # A real registry will not serve an index to a client that did not ask for one.
        if found is None or found[0] not in accepted:
            body = b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
            self._answer(handler, 404, body, [("Content-Type", "application/json")], send_body)
            return
        media_type, body = found
        headers = [("Content-Type", media_type)]
        if self.send_digest_header:
            headers.append(("Docker-Content-Digest", self.digest_header or digest_of(body)))
        self._answer(handler, 200, body, headers, send_body)

    def _token(self, handler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        auth = handler.headers.get("Authorization")
        self.token_auth.append(auth)
        scope = query.get("scope", [""])[0]
        scope_ok = scope.startswith("repository:") and scope.endswith(":pull")
        if query.get("service") != [SERVICE] or not scope_ok:
            self._answer(handler, 400, b'{"details":"bad service or scope"}')
            return
        if self.basic_login and auth != _basic(*self.basic_login):
            self._answer(handler, 401, b'{"details":"bad login"}')
            return
        self._answer(handler, 200, json.dumps({"token": TOKEN}).encode())


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def fake_registry(monkeypatch) -> Iterator[FakeRegistry]:
    monkeypatch.delenv("SERVEKIT_REGISTRY_USER", raising=False)
    monkeypatch.delenv("SERVEKIT_REGISTRY_PASSWORD", raising=False)
    server = FakeRegistry().start()
    yield server
    server.stop()


def manifest_body(seed: str) -> bytes:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": fake_digest(seed)}
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config}).encode()


def index_body() -> bytes:
    """Two platforms; odd spacing, so only the exact bytes give the right digest."""
    platforms = [("amd64", "a"), ("arm64", "b")]
    manifests = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest_of(manifest_body(seed)),
            "platform": {"architecture": arch, "os": "linux"},
        }
        for arch, seed in platforms
    ]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(index, indent=3).encode()


# --- parse_reference ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("ubuntu", ImageRef("docker.io", "library/ubuntu", None, None)),
        ("ubuntu:24.04", ImageRef("docker.io", "library/ubuntu", "24.04", None)),
        ("vllm/vllm-openai:v0.32.0", ImageRef("docker.io", "vllm/vllm-openai", "v0.32.0", None)),
        (
            "docker.io/vllm/vllm-openai:v0.32.0",
            ImageRef("docker.io", "vllm/vllm-openai", "v0.32.0", None),
        ),
        ("docker.io/ubuntu:24.04", ImageRef("docker.io", "library/ubuntu", "24.04", None)),
        ("index.docker.io/library/ubuntu", ImageRef("docker.io", "library/ubuntu", None, None)),
        (
            "servekit-control:5000/servekit/vllm-cpu:v0.32.0",
            ImageRef("servekit-control:5000", "servekit/vllm-cpu", "v0.32.0", None),
        ),
        ("localhost/app:1", ImageRef("localhost", "app", "1", None)),
        ("localhost:5000/app", ImageRef("localhost:5000", "app", None, None)),
        ("quay.io/ubuntu:24.04", ImageRef("quay.io", "ubuntu", "24.04", None)),
        (
            "ghcr.io/org/team/img@" + fake_digest("a"),
            ImageRef("ghcr.io", "org/team/img", None, fake_digest("a")),
        ),
        (
            "nginx:1.27@" + fake_digest("b"),
            ImageRef("docker.io", "library/nginx", "1.27", fake_digest("b")),
        ),
    ],
)
def test_parse_reference_normalises_like_docker(ref: str, expected: ImageRef) -> None:
    assert parse_reference(ref) == expected


def test_reference_names() -> None:
    assert str(parse_reference("ubuntu:24.04")) == "docker.io/library/ubuntu:24.04"
    assert parse_reference("ubuntu").name == "docker.io/library/ubuntu"
    pinned = parse_reference("nginx:1.27@" + fake_digest("c"))
    assert pinned.name == "docker.io/library/nginx:1.27"
    assert str(pinned) == "docker.io/library/nginx:1.27@" + fake_digest("c")
    port = parse_reference("servekit-control:5000/servekit/vllm-cpu:v0.32.0")
    assert port.name == "servekit-control:5000/servekit/vllm-cpu:v0.32.0"


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "repo:",
        "ubuntu/UPPER:1",
        "a//b:1",
        "repo:tag:extra",
        "repo:t\u00e4g",
        "repo@sha256:abc",
        "repo@md5:" + "a" * 32,
        "repo:t@" + fake_digest("a") + "@x",
        " ubuntu",
        "http://registry/app:1",
        "-bad.host/app:1",
    ],
)
def test_parse_reference_rejects_garbage(ref: str) -> None:
    with pytest.raises(ValueError, match=r"reference|bad|digest|tag"):
        parse_reference(ref)


# --- resolve_digest ---------------------------------------------------------------------------


def test_resolve_plain_manifest(fake_registry: FakeRegistry) -> None:
    digest = fake_registry.push(REPO, "v0.32.0", manifest_body("a"), OCI_MANIFEST)
    assert resolve_digest(fake_registry.ref()) == digest
    assert fake_registry.requests == [("HEAD", f"/v2/{REPO}/manifests/v0.32.0")]


def test_resolve_multi_arch_tag_gives_the_index_digest(fake_registry: FakeRegistry) -> None:
    body = index_body()
    fake_registry.push(REPO, "v0.32.0", body, OCI_INDEX)
    digest = resolve_digest(fake_registry.ref())
    assert digest == digest_of(body)
    # ... and that digest is what `docker pull repo@digest` asks the registry for.
    pulled = requests.get(
        f"http://{fake_registry.host}/v2/{REPO}/manifests/{digest}",
        headers={"Accept": OCI_INDEX},
        timeout=10,
    )
    assert pulled.content == body


def test_resolve_docker_manifest_list(fake_registry: FakeRegistry) -> None:
    body = b'{"schemaVersion":2,"mediaType":"%s","manifests":[]}' % DOCKER_LIST.encode()
    expected = fake_registry.push("app", "1", body, DOCKER_LIST)
    assert resolve_digest(fake_registry.ref("app", "1")) == expected


def test_resolve_with_bearer_token(fake_registry: FakeRegistry) -> None:
    fake_registry.require_token = True
    digest = fake_registry.push(REPO, "v0.32.0", manifest_body("a"), OCI_MANIFEST)
    assert resolve_digest(fake_registry.ref()) == digest
    assert [m for m, _ in fake_registry.requests] == ["HEAD", "HEAD"]
    assert fake_registry.token_auth == [None]  # anonymous


def test_token_request_uses_the_login_from_the_environment(
    fake_registry: FakeRegistry, monkeypatch
) -> None:
    fake_registry.require_token = True
    fake_registry.basic_login = ("ops", "s3cret-pw")
    digest = fake_registry.push(REPO, "v0.32.0", manifest_body("a"), OCI_MANIFEST)
    monkeypatch.setenv("SERVEKIT_REGISTRY_USER", "ops")
    monkeypatch.setenv("SERVEKIT_REGISTRY_PASSWORD", "s3cret-pw")
    assert resolve_digest(fake_registry.ref()) == digest
    assert fake_registry.token_auth == [_basic("ops", "s3cret-pw")]


def test_refused_login_names_the_reference_not_the_password(
    fake_registry: FakeRegistry, monkeypatch
) -> None:
    fake_registry.require_token = True
    fake_registry.basic_login = ("ops", "right-pw")
    fake_registry.push(REPO, "v0.32.0", manifest_body("a"), OCI_MANIFEST)
    monkeypatch.setenv("SERVEKIT_REGISTRY_USER", "ops")
    monkeypatch.setenv("SERVEKIT_REGISTRY_PASSWORD", "wrong-pw")
    with pytest.raises(RegistryError) as err:
        resolve_digest(fake_registry.ref())
    assert f"{fake_registry.host}/{REPO}:v0.32.0" in str(err.value)
    assert "HTTP 401" in str(err.value)
    assert "wrong-pw" not in str(err.value)


def test_registry_with_basic_login(fake_registry: FakeRegistry, monkeypatch) -> None:
    fake_registry.registry_login = ("ops", "pw")
    digest = fake_registry.push(REPO, "v0.32.0", manifest_body("a"), OCI_MANIFEST)
    with pytest.raises(RegistryError, match="SERVEKIT_REGISTRY_USER"):
        resolve_digest(fake_registry.ref())
    monkeypatch.setenv("SERVEKIT_REGISTRY_USER", "ops")
    monkeypatch.setenv("SERVEKIT_REGISTRY_PASSWORD", "pw")
    assert resolve_digest(fake_registry.ref()) == digest


def test_missing_digest_header_falls_back_to_the_body(fake_registry: FakeRegistry) -> None:
    fake_registry.send_digest_header = False
    fake_registry.require_token = True
    body = index_body()
    fake_registry.push(REPO, "v0.32.0", body, OCI_INDEX)
    assert resolve_digest(fake_registry.ref()) == digest_of(body)
    assert [m for m, _ in fake_registry.requests] == ["HEAD", "HEAD", "GET"]
    assert len(fake_registry.token_auth) == 1  # the GET reuses the token


def test_unknown_tag_is_a_registry_error_naming_the_reference(fake_registry: FakeRegistry) -> None:
    with pytest.raises(RegistryError, match=r"servekit/vllm-cpu:v9\.9\.9.*HTTP 404"):
        resolve_digest(fake_registry.ref(tag="v9.9.9"))


def test_unreachable_registry_is_a_registry_error(fake_registry: FakeRegistry) -> None:
    host = fake_registry.host
    fake_registry.stop()
    with pytest.raises(RegistryError, match=rf"{host}/{REPO}:v1: registry unreachable"):
        resolve_digest(f"{host}/{REPO}:v1", timeout=5)


def test_resolve_needs_a_tag() -> None:
    with pytest.raises(ValueError, match="no tag"):
        resolve_digest("ubuntu")
    with pytest.raises(ValueError, match="no tag"):
        resolve_digest("ubuntu@" + fake_digest("a"))


class _RecordingSession(requests.Session):
    """Records the URLs asked for and fails them all, so nothing leaves this machine."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def request(self, method, url, *args, **kwargs):
        self.urls.append(url)
        raise requests.ConnectionError("offline test")


@pytest.mark.parametrize(
    ("ref", "insecure", "url"),
    [
        (
            "vllm/vllm-openai:v1",
            (),
            "https://registry-1.docker.io/v2/vllm/vllm-openai/manifests/v1",
        ),
        ("ghcr.io/o/i:v1", (), "https://ghcr.io/v2/o/i/manifests/v1"),
        ("mirror:5000/o/i:v1", ("mirror:5000",), "http://mirror:5000/v2/o/i/manifests/v1"),
        ("mirror:5000/o/i:v1", ("other:5000",), "https://mirror:5000/v2/o/i/manifests/v1"),
        ("localhost:5000/i:v1", (), "http://localhost:5000/v2/i/manifests/v1"),
    ],
)
def test_api_url_and_scheme(ref: str, insecure: tuple[str, ...], url: str) -> None:
    session = _RecordingSession()
    with pytest.raises(RegistryError, match="offline test"):
        resolve_digest(ref, insecure=insecure, session=session)
    assert session.urls == [url]


def test_bad_digest_from_the_registry_is_refused(fake_registry: FakeRegistry) -> None:
    fake_registry.push(REPO, "v0.32.0", manifest_body("a"), OCI_MANIFEST)
    fake_registry.digest_header = "sha512:abc"
    with pytest.raises(RegistryError, match="unexpected digest"):
        resolve_digest(fake_registry.ref())


# --- the lock file ----------------------------------------------------------------------------


def test_lock_path_is_beside_the_inventory(tmp_path: Path) -> None:
    inventory = tmp_path / "site"
    inventory.mkdir()
    (inventory / "hosts.yml").write_text("all: {}\n")
    assert lock_path(inventory) == inventory / LOCK_NAME
    assert lock_path(inventory / "hosts.yml") == inventory / LOCK_NAME


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    entries = {
        "vllm/vllm-openai:v0.32.0": fake_digest("a"),
        "servekit-control:5000/servekit/vllm-cpu:v0.32.0": fake_digest("b"),
    }
    write_lock(path, entries, now=T0)
    assert read_lock(path) == {
        "docker.io/vllm/vllm-openai:v0.32.0": fake_digest("a"),
        "servekit-control:5000/servekit/vllm-cpu:v0.32.0": fake_digest("b"),
    }
    text = path.read_text()
    assert text.startswith("# ") and "make lock-images" in text and "crane digest" in text
    assert (
        "images:\n"
        "  docker.io/vllm/vllm-openai:v0.32.0:\n"
        f"    digest: {fake_digest('a')}\n"
        '    resolved: "2026-12-06T10:00:00Z"\n'
    ) in text
    assert text.index("\n  docker.io/vllm") < text.index("\n  servekit-control:5000/")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # no temporary file left


def test_rewrite_keeps_the_time_of_unchanged_digests(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    write_lock(path, {"a/same:1": fake_digest("a"), "a/moved:1": fake_digest("b")}, now=T0)
    write_lock(
        path,
        {"a/same:1": fake_digest("a"), "a/moved:1": fake_digest("c"), "a/new:1": fake_digest("d")},
        now=T1,
    )
    images = _yaml(path)["images"]
    assert images["docker.io/a/same:1"]["resolved"] == "2026-12-06T10:00:00Z"
    assert images["docker.io/a/moved:1"] == {
        "digest": fake_digest("c"),
        "resolved": "2026-12-07T11:30:00Z",
    }
    assert images["docker.io/a/new:1"]["resolved"] == "2026-12-07T11:30:00Z"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_empty_and_missing_lock(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    assert read_lock(path) == {}
    write_lock(path, {}, now=T0)
    assert read_lock(path) == {}


def test_hand_pinned_entry_is_read_normalised(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text(f"images:\n  vllm/vllm-openai:v0.32.0:\n    digest: {fake_digest('e')}\n")
    assert read_lock(path) == {"docker.io/vllm/vllm-openai:v0.32.0": fake_digest("e")}


@pytest.mark.parametrize(
    "text",
    [
        "images: [\n",
        "- just a list\n",
        "other: {}\n",
        "images: [a, b]\n",
        "images:\n  vllm/vllm-openai:v1:\n    digest: sha256:short\n",
        "images:\n  vllm/vllm-openai:v1: sha256:" + "a" * 64 + "\n",
        "images:\n  Not A Ref:\n    digest: " + fake_digest("a") + "\n",
        "images:\n  vllm/vllm-openai:\n    digest: " + fake_digest("a") + "\n",
    ],
)
def test_malformed_lock_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text(text)
    with pytest.raises(LockError) as err:
        read_lock(path)
    message = str(err.value)
    assert str(path) in message
    assert "make lock-images" in message and "fix it by hand" in message


# --- check, lock and the table ----------------------------------------------------------------


def _resolver(digests: dict[str, str]):
    def resolve(tag: str, **kwargs) -> str:
        if tag not in digests:
            raise RegistryError(f"{tag}: registry unreachable (offline)")
        return digests[tag]

    return resolve


def test_check_states() -> None:
    lock_file = {
        "docker.io/a/same:1": fake_digest("a"),
        "docker.io/a/moved:1": fake_digest("b"),
        "docker.io/a/down:1": fake_digest("c"),
    }
    registry_now = {
        "docker.io/a/same:1": fake_digest("a"),
        "docker.io/a/moved:1": fake_digest("d"),
        "docker.io/a/new:1": fake_digest("e"),
    }
    statuses = check(
        ["a/same:1", "a/moved:1", "a/new:1", "a/down:1", "a/gone:1"],
        lock_file,
        resolve=_resolver(registry_now),
    )
    states = {s.tag: s.state for s in statuses}
    assert states == {
        "docker.io/a/same:1": "locked",
        "docker.io/a/moved:1": "moved",
        "docker.io/a/new:1": "unlocked",
        "docker.io/a/down:1": "unchecked",
        "docker.io/a/gone:1": "unlocked",
    }
    down = statuses[3]
    assert down.locked == fake_digest("c") and down.current is None and "offline" in down.error


def test_check_passes_options_to_the_resolver() -> None:
    seen = []

    def resolve(tag: str, **kwargs) -> str:
        seen.append(kwargs)
        return fake_digest("a")

    check(["a/x:1"], {}, resolve=resolve, insecure=["mirror:5000"], timeout=3)
    assert seen == [{"insecure": ["mirror:5000"], "timeout": 3}]


def test_lock_against_the_registry(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    write_lock(
        path, {"other/kept:1": fake_digest("f"), fake_registry.ref(): fake_digest("a")}, now=T0
    )
    fake_registry.require_token = True
    body = index_body()
    fake_registry.push(REPO, "v0.32.0", body, OCI_INDEX)

    statuses = lock([fake_registry.ref()], path, now=T1)

    assert [(s.state, s.locked, s.current) for s in statuses] == [
        ("moved", fake_digest("a"), digest_of(body))
    ]
    assert read_lock(path) == {
        "docker.io/other/kept:1": fake_digest("f"),
        fake_registry.ref(): digest_of(body),
    }
    assert [s.state for s in check([fake_registry.ref()], read_lock(path))] == ["locked"]


def test_lock_keeps_the_old_entry_when_the_registry_fails(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    write_lock(path, {"a/down:1": fake_digest("c")}, now=T0)
    statuses = lock(["a/down:1", "a/new:1"], path, resolve=_resolver({}), now=T1)
    assert [s.state for s in statuses] == ["unchecked", "unlocked"]
    assert read_lock(path) == {"docker.io/a/down:1": fake_digest("c")}


def test_status_table() -> None:
    statuses = [
        LockStatus("docker.io/a/same:1", fake_digest("a"), fake_digest("a"), None),
        LockStatus("docker.io/vllm/vllm-openai:v0.32.0", fake_digest("b"), fake_digest("d"), None),
        LockStatus("docker.io/a/new:1", None, fake_digest("e"), None),
        LockStatus("docker.io/a/down:1", fake_digest("c"), None, "a/down:1: HTTP 503"),
    ]
    table = render_status_table(statuses, "inventories/site-a")
    lines = table.splitlines()
    assert lines[0].split() == ["IMAGE", "STATE", "LOCKED", "REGISTRY", "NOW"]
    state_col = lines[0].index("STATE")
    assert [line[state_col:].split()[0] for line in lines[1:5]] == [
        "locked",
        "moved",
        "unlocked",
        "unchecked",
    ]
    assert "sha256:bbbbbbbbbbbb\u2026" in lines[2] and "sha256:dddddddddddd\u2026" in lines[2]
    assert (
        "docker.io/vllm/vllm-openai:v0.32.0: the tag moved: deploys keep the locked digest; "
        "run `make lock-images INVENTORY=inventories/site-a` to take the new one"
    ) in table
    assert "HTTP 503" in table
    assert "the tag moved" not in render_status_table(statuses[:1], "inv")


def test_the_roles_filter_reads_the_digest_the_lock_holds(tmp_path):
    """What the roles run: ``name:tag@digest`` from the lock's text, ``name:tag@`` without
    an entry (preflight refuses that with the command to run)."""
    from servekit_images import locked_image  # ansible/plugins/filter (pytest's pythonpath)

    path = tmp_path / LOCK_NAME
    tag = "docker.io/vllm/vllm-openai:v0.32.0"
    digest = fake_digest("c")
    write_lock(path, {tag: digest})
    assert locked_image(path.read_text(), tag) == f"{tag}@{digest}"
    assert locked_image(path.read_text(), "docker.io/vllm/vllm-openai:v0.31.0") == (
        "docker.io/vllm/vllm-openai:v0.31.0@"
    )
    assert locked_image("", tag) == f"{tag}@"

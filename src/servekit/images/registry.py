"""Image references and the manifest digest a registry serves for a tag (Registry HTTP API v2).

``parse_reference`` normalises a reference as Docker does; ``resolve_digest`` asks the registry
which manifest a tag names now. For a multi-arch tag that is the image index (manifest list), the
digest ``docker pull repo@digest`` needs on every architecture.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import requests

DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io"}

#: Index types first: a multi-arch tag must resolve to its index, not one platform's manifest.
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)

USER_ENV = "SERVEKIT_REGISTRY_USER"
PASSWORD_ENV = "SERVEKIT_REGISTRY_PASSWORD"

_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?")
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(RuntimeError):
    """The registry could not say which digest a tag names (HTTP error, network, bad answer)."""


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``registry/repository:tag`` (no ``:tag`` when there is none); the lock file's key."""
        base = f"{self.registry}/{self.repository}"
        return f"{base}:{self.tag}" if self.tag else base

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else self.name


def parse_reference(ref: str) -> ImageRef:
    """``ref`` normalised as Docker does: ``ubuntu:24.04`` is ``docker.io/library/ubuntu:24.04``.

    ``ref`` is ``name``, ``name:tag``, ``name@sha256:...`` or ``name:tag@sha256:...``; the tag
    is None when absent (no implied ``latest``).
    """
    name, tag, digest = split_reference(ref)
    registry, repository = _split_registry(name, ref)
    return ImageRef(registry, repository, tag, digest)


def split_reference(ref: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@sha256:...]`` -> (name as written, tag, digest); tag and digest are None
    when absent. The name is not normalised (``parse_reference`` does that)."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"not an image reference: {ref!r}")
    remainder, _, digest = ref.partition("@")
    if digest and not DIGEST_RE.fullmatch(digest):
        raise ValueError(f"{ref!r}: the digest must be sha256:<64 lowercase hex>, got {digest!r}")
    name, tag = _split_tag(remainder, ref)
    return name, tag, digest or None


def _split_tag(remainder: str, ref: str) -> tuple[str, str | None]:
    colon = remainder.rfind(":")
    if colon <= remainder.rfind("/"):
        return remainder, None
    tag = remainder[colon + 1 :]
    if not _TAG_RE.fullmatch(tag):
        raise ValueError(f"{ref!r}: bad tag {tag!r} (letters, digits, '_', '.', '-'; max 128)")
    return remainder[:colon], tag


def _split_registry(name: str, ref: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    # Docker's rule: the first component is a registry only if it looks like a host.
    is_host = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if slash and is_host:
        if not _DOMAIN_RE.fullmatch(first):
            raise ValueError(f"{ref!r}: bad registry host {first!r}")
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    components = repository.split("/")
    if not all(_COMPONENT_RE.fullmatch(c) for c in components):
        raise ValueError(
            f"{ref!r}: bad repository {repository!r} (lowercase letters, digits and "
            "'.', '_', '-' separators between '/')"
        )
    return registry, repository


def api_base(registry: str, insecure: Iterable[str] = ()) -> str:
    """``scheme://host`` of a registry's API: plain HTTP only for ``insecure`` and loopback."""
    host = _DOCKER_HUB_API if registry == DOCKER_HUB else registry
    insecure = {insecure} if isinstance(insecure, str) else set(insecure)
    plain = registry in insecure or _is_loopback(registry)
    return f"{'http' if plain else 'https'}://{host}"


def _is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if ":" in registry else registry
    return host == "localhost" or host.startswith("127.")


def resolve_digest(
    ref: str,
    *,
    insecure: Iterable[str] = (),
    session: requests.Session | None = None,
    timeout: float = 30,
) -> str:
    """The digest of the manifest (or index) the registry serves for ``ref``'s tag now."""
    image = parse_reference(ref)
    if image.tag is None:
        raise ValueError(f"{ref!r} has no tag: resolving a digest needs repository:tag")
    url = f"{api_base(image.registry, insecure)}/v2/{image.repository}/manifests/{image.tag}"
    http = session or requests.Session()
    try:
        return _resolve(http, image, url, timeout)
    except requests.RequestException as exc:
        message = f"{image.name}: registry unreachable ({type(exc).__name__}: {exc})"
        raise RegistryError(message) from exc
    finally:
        if session is None:
            http.close()


def _resolve(http: requests.Session, image: ImageRef, url: str, timeout: float) -> str:
    headers = {"Accept": ", ".join(MANIFEST_TYPES)}
    response = _send(http, "HEAD", url, headers, image, timeout)
    digest = response.headers.get("Docker-Content-Digest", "").strip()
    if not digest:
        # Not every registry sends the header; the digest is by definition that of the bytes.
        body = _send(http, "GET", url, headers, image, timeout).content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if not DIGEST_RE.fullmatch(digest):
        raise RegistryError(f"{image.name}: the registry sent an unexpected digest {digest!r}")
    return digest


def _send(
    http: requests.Session,
    method: str,
    url: str,
    headers: dict[str, str],
    image: ImageRef,
    timeout: float,
) -> requests.Response:
    """``method url``, authenticating once on 401; ``headers`` keeps the credential for reuse."""
    response = http.request(method, url, headers=headers, timeout=timeout)
    if response.status_code == 401 and "Authorization" not in headers:
        headers["Authorization"] = _authorization(http, response, image, timeout)
        response = http.request(method, url, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise RegistryError(_status_message(image, method, url, response))
    return response


def _status_message(image: ImageRef, method: str, url: str, response: requests.Response) -> str:
    login = f"{USER_ENV}/{PASSWORD_ENV}"
    hint = {
        401: f"access refused: the repository may not exist, or it needs {login}",
        404: "no such tag or repository in the registry",
        429: "the registry's pull rate limit was hit; retry later or log in",
    }.get(response.status_code, "the registry refused the request")
    return f"{image.name}: {hint} ({_status(response)} on {method} {url})"


def _status(response: requests.Response) -> str:
    return f"HTTP {response.status_code} {response.reason or ''}".strip()


def _credentials() -> tuple[str, str] | None:
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    return (user, password) if user and password else None


def _authorization(
    http: requests.Session, response: requests.Response, image: ImageRef, timeout: float
) -> str:
    """The ``Authorization`` value that answers the registry's 401 challenge."""
    challenge = response.headers.get("WWW-Authenticate", "")
    scheme = challenge.split(" ", 1)[0].lower()
    credentials = _credentials()
    if scheme == "basic" and credentials:
        raw = f"{credentials[0]}:{credentials[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode()
    params = dict(_CHALLENGE_PARAM_RE.findall(challenge))
    if scheme != "bearer" or not params.get("realm"):
        raise RegistryError(
            f"{image.name}: HTTP 401 and no usable bearer challenge ({challenge or 'none'}); "
            f"a login-only registry needs {USER_ENV}/{PASSWORD_ENV}"
        )
    return "Bearer " + _token(http, params, image, credentials, timeout)


def _token(
    http: requests.Session,
    params: dict[str, str],
    image: ImageRef,
    credentials: tuple[str, str] | None,
    timeout: float,
) -> str:
    realm = params["realm"]
    query = {
        "service": params.get("service"),
        "scope": params.get("scope") or f"repository:{image.repository}:pull",
    }
    response = http.get(
        realm, params={k: v for k, v in query.items() if v}, auth=credentials, timeout=timeout
    )
    if response.status_code != 200:
        raise RegistryError(
            f"{image.name}: the token service {realm} refused ({_status(response)})"
        )
    try:
        data = response.json()
    except ValueError:
        data = None
    token = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"{image.name}: the token service {realm} sent no token")
    return token

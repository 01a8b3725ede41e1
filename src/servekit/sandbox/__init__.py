"""The local sandbox: a "GPU host" in a container that Ansible provisions like a real one.

* ``ensure_image(name)`` builds (once, cached by recipe hash) the images in ``docker/``:
  ``base``, ``sandbox-host``, ``vllm-cpu``, ``registry``.
* ``up(hosts=1)`` / ``down()`` / ``status()`` manage the sandbox hosts, the image registry
  and the model mirror (see ``servekit.sandbox.manager``, which calls on ``hosts``,
  ``registry`` and ``model_mirror``; names, ports and ``.sandbox/`` are in ``state``).
* ``ensure_docker_engine()`` installs and starts a local Docker engine when none answers.

Command line: ``python -m servekit.sandbox {up,down,status,images,engine}``.
"""

from .common import SandboxError
from .engine import ensure_docker_engine
from .images import IMAGE_NAMES, ensure_image, ensure_images, image_ref
from .manager import down, status, up
from .state import SandboxHost, SandboxState, load_state

__all__ = [
    "IMAGE_NAMES",
    "SandboxError",
    "SandboxHost",
    "SandboxState",
    "down",
    "ensure_docker_engine",
    "ensure_image",
    "ensure_images",
    "image_ref",
    "load_state",
    "status",
    "up",
]

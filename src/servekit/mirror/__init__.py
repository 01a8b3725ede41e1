"""A ModelScope-compatible model mirror: serve models to the SDK from local disk, and fill it.

- :func:`make_app` / :func:`serve`: the HTTP server (``python -m servekit.mirror ROOT``);
- :func:`fetch`: download a model from an upstream hub into the mirror's root.

Models live at ``ROOT/<owner>/<name>/...``, exactly as ``snapshot_download(local_dir=...)``
leaves them.
"""

from servekit.mirror.fetch import FetchError, fetch
from servekit.mirror.server import make_app, serve

__all__ = ["FetchError", "fetch", "make_app", "serve"]

"""Image references from the site's lock (images.lock.yml beside the inventory).

``make lock-images`` (servekit.images.lock) writes the file; the roles read it with the file
lookup and this filter, so what a host runs is ``name:tag@<locked digest>``, or ``name:tag@``
when the lock has no entry, which the roles' preflight refuses with the command to run.
Unit-tested in tests/unit/test_image_lock.py.
"""

from __future__ import annotations

import yaml


def locked_image(lock_text: str | None, tagged: str) -> str:
    """``tagged@digest`` from the lock's text, or ``tagged@`` without an entry (or a file)."""
    data = yaml.safe_load(lock_text or "") or {}
    images = data.get("images") if isinstance(data, dict) else None
    entry = images.get(tagged) if isinstance(images, dict) else None
    digest = entry.get("digest") if isinstance(entry, dict) else None
    return f"{tagged}@{digest or ''}"


class FilterModule:
    def filters(self):
        return {"servekit_locked_image": locked_image}

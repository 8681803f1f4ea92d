"""Feature-network files fetched on first use, as ADM's evaluator and pytorch-fid do, but verified before
they are moved into place: the download goes to a temporary file beside the destination, a check runs on
it (a hash prefix, a size, an import), and only then is it renamed; a failed or offline download leaves
nothing behind and says in one line which URL failed and which flag takes a local file."""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "guided_diffusion"
TIMEOUT_S = 60.0


class DownloadError(FileNotFoundError):
    """A file that is neither on disk nor downloadable (offline, HTTP error, failed verification)."""


def fetch_verified(
    url: str, dest: str | os.PathLike, verify: Callable[[Path], None], flag: str, timeout: float = TIMEOUT_S
) -> Path:
    """`dest` if it exists; else `url` downloaded to a temporary file in dest's folder, passed to `verify`
    (which raises ValueError on a bad file) and renamed to `dest`. DownloadError names the URL and `flag`."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".download", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
            out.flush()
            os.fsync(out.fileno())
            declared = response.headers.get("Content-Length")
            if declared is not None and out.tell() != int(declared):
                raise ValueError(f"truncated: {out.tell()} of {declared} bytes")
        verify(Path(tmp))
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(
            f"{dest.name} is not in {dest.parent} and could not be downloaded from {url} ({reason}); "
            f"download it by hand and pass {flag} FILE"
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)  # after a failure or an interrupt; gone already after the rename
    return dest

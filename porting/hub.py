"""Getting a checkpoint file: the torch hub cache, else a verified download.

Files live where ``torch.hub`` keeps them (``$TORCH_HOME/hub/checkpoints``,
``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch`` and that to
``~/.cache/torch``), so a checkpoint torchvision already downloaded is reused
and vice versa. A download goes to a temporary file in the destination
directory, is checked against the hash prefix in the file name (the leading
hex digits of its sha256, as ``torch.hub.download_url_to_file`` checks them),
and only then renamed into place; on any failure the partial file is removed,
so the cache never holds a truncated or unverified checkpoint. Torch is not
needed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from jaxnets.cli import progress_bar

__all__ = ["DownloadError", "torch_home", "hub_checkpoints_dir", "download_url_to_file",
           "cached_download"]

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded or failed its hash check."""



def usual_permissions(path: str | os.PathLike) -> None:
    """Gives a file written by ``tempfile`` (mode 0600, folders 0700) the mode a
    plain ``open`` would have, 0666 (folders 0777) less the umask, so that a
    checkpoint or converted folder moved into place is as readable as any other
    file (a cache shared by a group, a file copied elsewhere). Folders: their
    entries too."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)

def torch_home() -> Path:
    """Torch's cache root, resolved exactly as ``torch.hub._get_torch_home`` does.

    Returns:
      ``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``.
    """
    default = os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", default)))


def hub_checkpoints_dir() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches checkpoints.

    Returns:
      ``torch_home() / "hub" / "checkpoints"``.
    """
    return torch_home() / "hub" / "checkpoints"


def download_url_to_file(url: str, dst: str | os.PathLike, hash_prefix: str | None = None,
                         progress: bool = True, timeout: float = 30.0) -> Path:
    """Downloads ``url`` to ``dst`` atomically, checking the sha256 prefix.

    Args:
      url: the source.
      dst: the final path; its directory is created.
      hash_prefix: expected leading hex digits of the sha256, or None.
      progress: show a progress bar on stderr (``jaxnets.cli.progress_bar``).
      timeout: socket timeout in seconds.

    Returns:
      ``dst`` as a Path.

    Raises:
      DownloadError: unreachable URL, HTTP error, short body or hash mismatch;
        the message names the URL and ``dst``. Nothing is left at ``dst`` or
        beside it.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dst.name + ".", suffix=".partial", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        sha = hashlib.sha256()
        out = os.fdopen(fd, "wb")
        try:
            with out, urllib.request.urlopen(url, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                got = 0
                with progress_bar(total=total, disable=not progress, unit="B",
                                  unit_scale=True, unit_divisor=1024, desc=dst.name) as bar:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        sha.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                if total is not None and got != total:
                    raise DownloadError(f"download of {url} ended early ({got} of {total} bytes)")
        except DownloadError:
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code} {e.reason}"
            else:
                reason = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            raise DownloadError(
                f"cannot download {url} ({reason}); put the file at "
                f"{dst} yourself, or pass a local checkpoint (weights=PATH / --weights PATH)"
            ) from None
        if hash_prefix:
            digest = sha.hexdigest()
            if not digest.startswith(hash_prefix):
                raise DownloadError(
                    f"hash mismatch for {url}: sha256 {digest[:len(hash_prefix)]}... but the "
                    f"file name expects {hash_prefix}...; the download was discarded")
        usual_permissions(tmp)
        os.replace(tmp, dst)
    except BaseException:
        # Also on KeyboardInterrupt: a partial file must never look like a checkpoint.
        tmp.unlink(missing_ok=True)
        raise
    return dst


def cached_download(url: str, hash_prefix: str | None = None, *, progress: bool = True,
                    directory: str | os.PathLike | None = None) -> Path:
    """The local path of a checkpoint, downloading it on a cache miss.

    A cached file is trusted without re-hashing it, as ``torch.hub`` does: it
    only ever gets there through a verified download (or the user's hands).

    Args:
      url: the checkpoint URL; its last path component is the file name.
      hash_prefix: expected sha256 prefix for a download.
      progress: show a progress bar while downloading.
      directory: cache directory; :func:`hub_checkpoints_dir` when None.

    Returns:
      The path of the file in the cache.

    Raises:
      DownloadError: as :func:`download_url_to_file`.
    """
    directory = Path(directory) if directory is not None else hub_checkpoints_dir()
    dst = directory / url.rsplit("/", 1)[-1]
    if dst.is_file():
        return dst
    return download_url_to_file(url, dst, hash_prefix, progress=progress)

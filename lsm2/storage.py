"""Where lsm2 reads and writes: local paths and gs:// buckets through one API (etils.epath).

Every path the project reads or writes (dataset directories, workdirs,
checkpoints, exports, lsm2.json, evaluation outputs, sweep roots) is an
`epath.Path`, so a `gs://bucket/dir` works wherever a local directory does:
etils reaches buckets through TensorFlow's GCS filesystem (tf.io.gfile), Orbax
writes arrays through TensorStore's own `gcs` driver, TensorBoard events go
through tf.summary. (pathlib would fold `gs://b/x` into a local `gs:/b/x`.)

A path that cannot be used must fail before a run starts, naming the path and
the reason (`check_writable`, `check_reachable`), not half-way through with a
library's exception, and never with a local directory made of a URL.
docs/launching.md shows data and workdirs on a bucket.
"""
from __future__ import annotations

import os
import pathlib
import re
import socket
import urllib.parse

from etils import epath

from lsm2 import errors

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MANGLED_RE = re.compile(r"^(gs|s3|az):/?[^/]")  # "gs:/b/x", "gs:b/x": a URL that lost its //.


class StorageError(errors.Error, OSError):
  """A path that cannot be read or written: the message names the path and the reason."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://...) rather than a local path."""
  return bool(_URL_RE.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path; refuses a URL that lost a slash (e.g. after pathlib)."""
  text = os.fspath(path)
  if _MANGLED_RE.match(text):
    raise StorageError(f"{text!r} is neither a local path nor a URL: a bucket path is written "
                       f"gs://BUCKET/PATH (two slashes)")
  if text.startswith("gs://") and not text[len("gs://"):].split("/", 1)[0]:
    raise StorageError(f"{text!r} names no bucket: a bucket path is written gs://BUCKET/PATH")
  return epath.Path(text)


def _credentials_hint() -> str:
  """Why a bucket request may have been refused, when no Google credentials are configured."""
  adc = pathlib.Path(os.environ.get("CLOUDSDK_CONFIG", pathlib.Path.home() / ".config/gcloud"))
  if (os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
      or (adc / "application_default_credentials.json").exists()):
    return ""
  return (" No Google Cloud credentials are configured here (GOOGLE_APPLICATION_CREDENTIALS is "
          "unset and `gcloud auth application-default login` was not run); on a Cloud TPU VM or "
          "GKE the machine's or workload's service account needs access to the bucket.")


def _bucket(path: epath.Path) -> str | None:
  """The bucket of a gs:// path (None for other paths)."""
  text = os.fspath(path)
  return text[len("gs://"):].split("/", 1)[0] if text.startswith("gs://") else None


def _missing_bucket(path: epath.Path) -> str | None:
  """The bucket of gs:// `path` when it certainly does not exist; None otherwise.

  Asked only after a request failed or found nothing: reading a bucket's
  metadata needs storage.buckets.get, which object-only roles lack.
  """
  bucket = _bucket(path)
  try:
    return None if bucket is None or epath.Path(f"gs://{bucket}").exists() else bucket
  except Exception:  # pylint: disable=broad-except  # Forbidden, unreachable: cannot tell.
    return None


def _failure(path: epath.Path, what: str, action: str, error: Exception) -> StorageError:
  """The StorageError for a failed request: a missing bucket by name, else the storage's answer."""
  if (bucket := _missing_bucket(path)) is not None:
    return _no_bucket(path, what, bucket)
  reason = " ".join(f"{type(error).__name__}: {error}".split())[:600]
  hint = _credentials_hint() if is_remote(path) else ""
  return StorageError(f"{what} {path}: {action} ({reason}).{hint}")


def _no_bucket(path: epath.Path, what: str, bucket: str) -> StorageError:
  return StorageError(f"{what} {path}: bucket gs://{bucket} does not exist (or these "
                      f"credentials may not see it); create it with `gcloud storage buckets "
                      f"create gs://{bucket}`.{_credentials_hint()}")


def check_reachable(path: str | os.PathLike, what: str) -> epath.Path:
  """`path` as an epath.Path once its storage answers; StorageError naming it and why if not.

  Only proves that the storage can be asked (the bucket exists, the credentials
  may read it); whether `path` itself exists is the caller's question, with
  its own message. `what` names the path for the user ("config.data.dir").
  """
  p = as_path(path)
  if not is_remote(p):
    return p
  try:
    exists = p.exists()
  except Exception as e:  # pylint: disable=broad-except  # TF/gcsfs raise their own types.
    raise _failure(p, what, "cannot read it", e) from None
  if not exists and (bucket := _missing_bucket(p)) is not None:
    raise _no_bucket(p, what, bucket)
  return p


def check_writable(path: str | os.PathLike, what: str) -> epath.Path:
  """Proves that directory `path` can be written (creating it if local), or raises StorageError.

  Writes and deletes a small probe file, so that missing permissions show up
  before a run starts, not at its first checkpoint. On a bucket, which has no
  directories, nothing is left behind.
  """
  p = as_path(path)
  probe = p / f".lsm2-write-check-{socket.gethostname()}-{os.getpid()}"
  try:
    if not is_remote(p):
      p.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise _failure(p, what, "cannot write to it", e) from None
  return p


def _escape(name: str) -> str | None:
  """Why relative `name` would lead outside its directory, or None.

  Read as written and percent-decoded (`%2e%2e%2f` is `../` to any layer that
  decodes it), with a backslash as a separator (Windows tools read it so). A
  trailing '/' (a directory's name) is allowed; an empty part is not: 'p//x'
  under prefix 'p/' is the absolute name '/x'.
  """
  for text in dict.fromkeys((name, urllib.parse.unquote(name))):
    parts = text.replace("\\", "/").split("/")
    if not text or not parts[0]:
      return "a leading '/'" if text else "an empty name"
    if ".." in parts:
      return "a '..' part"
    if "" in parts[:-1]:
      return "an empty part ('//')"
  return None


def contained(root: str | os.PathLike, name: str, what: str) -> epath.Path:
  """root/name once `name`, a relative name from outside (an object, zip member or file name
  inside an export), is proven to stay inside directory `root`; else StorageError naming it.

  Refused: an absolute name, a '..' or empty part, also percent-encoded or written
  with backslashes (see _escape); below a local `root` also a name whose resolved
  path (symlinks followed) leaves the resolved `root`. Callers check every name
  before they write anything, so a refused input leaves nothing behind.
  """
  reason = _escape(name)
  target = as_path(root) / name
  if reason is None and not is_remote(root):
    base = pathlib.Path(root).resolve()
    if not pathlib.Path(target).resolve().is_relative_to(base):
      reason = f"it resolves to {pathlib.Path(target).resolve()}"
  if reason is not None:
    raise StorageError(f"{what} {name!r} leads outside {root} ({reason}): refused, nothing "
                       "was written")
  return target


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `path` so that a reader sees the old text or the new one, never a part.

  The text goes to a temporary name beside `path`, which one rename then puts in
  its place (on a bucket a single-object copy: also all or nothing).
  """
  path = as_path(path)
  tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
  tmp.write_text(text)
  tmp.replace(path)


def renames_atomically(path: str | os.PathLike) -> bool:
  """Whether renaming a directory at `path` is one atomic step (a local disk), not a copy and
  a delete object by object (a bucket), which a kill can interrupt half-way."""
  return not is_remote(path)


def _file_names(root: epath.Path) -> list[str]:
  """Every file below directory `root`, as its path relative to `root` ("a/b")."""
  prefix = len(os.fspath(root).rstrip("/")) + 1
  return [os.fspath(directory / name)[prefix:]
          for directory, _, files in root.walk() for name in files]


def list_files(root: str | os.PathLike) -> dict[str, int]:
  """Every file below directory `root`, as its path relative to `root` ("a/b"), with its size."""
  root = as_path(root)
  return {name: (root / name).stat().length for name in _file_names(root)}


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, *, last: str = "") -> None:
  """Copies every file below `src` to the same place below `dst`, overwriting; `last`
  (a path relative to `src`, e.g. a manifest that marks the copy complete) after all others.

  On a bucket each object is copied whole by the server, so a copy killed
  half-way holds some of the files, each complete; running it again completes it.
  """
  src, dst = as_path(src), as_path(dst)
  for name in sorted(_file_names(src), key=lambda name: name == last):
    target = dst / name
    if not is_remote(target):
      target.parent.mkdir(parents=True, exist_ok=True)
    (src / name).copy(target, overwrite=True)


def delete_tree(root: str | os.PathLike, *, first: str = "", last: str = "") -> None:
  """Deletes directory `root`: file `first` (relative to it) before the others, `last` after.

  A bucket deletes object by object, so the order is what a kill half-way leaves:
  deleting a completion marker first, or a marker that makes a directory visible
  last, never leaves a part that looks whole.
  """
  root = as_path(root)
  for name in (first, *(n for n in _file_names(root) if n not in (first, last)), last):
    if name:
      (root / name).unlink(missing_ok=True)
  if root.exists():
    root.rmtree()


def place_tree(src: str | os.PathLike, dst: str | os.PathLike, *, last: str = "") -> None:
  """copy_tree without copying bytes where it can: on a local disk each file gets a second
  name below `dst` (a hard link), so `src` stays whole until it is deleted, at no cost.

  Where a filesystem cannot link (across devices, some FUSE mounts) and on a bucket,
  files are copied. `last` goes after all others, as in copy_tree.
  """
  src, dst = as_path(src), as_path(dst)
  if is_remote(src) or is_remote(dst):
    copy_tree(src, dst, last=last)
    return
  for name in sorted(_file_names(src), key=lambda name: name == last):
    target = dst / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # A rerun after a kill half-way links it again.
    try:
      os.link(src / name, target)
    except OSError:
      (src / name).copy(target, overwrite=True)

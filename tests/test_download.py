"""converters/download.py against a local HTTP server serving generated files.

The server (127.0.0.1, a free port, Range support, optional cut-off responses) runs in a daemon
thread for the module and is shut down after it. The converter is replaced by a recorder; the
orbax writing is real.
"""

import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

from converters import download


class _Handler(http.server.BaseHTTPRequestHandler):
  """GET with `Range: bytes=N-`; cuts a response short when the server says so. HTTP/1.0."""

  timeout = 10  # A stalled client cannot hold the thread.

  def do_GET(self):
    server = self.server
    server.requests.append((self.path, self.headers.get('Range')))
    data = server.files.get(self.path)
    if data is None:
      self.send_error(404)
      return
    start = 0
    if match := re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or ''):
      start = int(match.group(1))
      if start >= len(data):
        self.send_response(416)
        self.send_header('Content-Range', f'bytes */{len(data)}')
        self.end_headers()
        return
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
    else:
      self.send_response(200)
    self.send_header('Content-Length', str(len(data) - start))
    self.end_headers()
    body = data[start:]
    if server.cut_after:  # Announce the whole body, send part of it, close.
      body, server.cut_after = body[: server.cut_after], 0
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture(scope='module')
def server():
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.daemon_threads = True
  httpd.files, httpd.requests, httpd.cut_after = {}, [], 0
  thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05})
  thread.daemon = True
  thread.start()
  try:
    yield httpd
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture()
def serve(server):
  """serve(path, data) → its URL; resets what the server recorded."""
  server.files.clear()
  server.requests.clear()
  server.cut_after = 0

  def add(path: str, data: bytes) -> str:
    server.files[path] = data
    return f'http://127.0.0.1:{server.server_port}{path}'

  return add


@pytest.fixture()
def converter(monkeypatch):
  """Replaces the real converters: records (source, path), returns a tiny variables tree."""
  calls = []
  tree = {
    'params': {'Logits': {'biases': np.arange(3, dtype=np.float32)}},
    'batch_stats': {'Logits': {'moving_mean': np.ones(2, np.float32)}},
  }

  def fake(source):
    def convert(path):
      calls.append((source, path))
      return tree

    return convert

  monkeypatch.setattr(download, '_converter', fake)
  return calls


def _slim_archive() -> bytes:
  """A .tar.gz laid out like the slim release: one `inception_v3.ckpt` at the top, ~200 kB."""
  payload = np.random.default_rng(0).bytes(200_000)
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
    info = tarfile.TarInfo('inception_v3.ckpt')
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
  return buffer.getvalue()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_recorded_digests():
  keras = download.RELEASES['keras'].digests
  assert re.fullmatch('[0-9a-f]{32}', keras['md5'])
  assert re.fullmatch('[0-9a-f]{64}', keras['sha256'])
  assert download.RELEASES['slim'].digests == {}  # None published: checked with a warning.


def test_slim_download_unpacks_and_converts(tmp_path, serve, server, converter, capsys):
  archive = _slim_archive()
  url = serve('/slim.tar.gz', archive)
  out = download.fetch('slim', str(tmp_path), url=url)

  assert 'WARNING: no published digest' in capsys.readouterr().err
  assert (tmp_path / 'inception_v3_2016_08_28.tar.gz').read_bytes() == archive
  assert not (tmp_path / 'inception_v3_2016_08_28.tar.gz.part').exists()
  calls = converter
  ckpt = tmp_path / 'inception_v3_2016_08_28' / 'inception_v3.ckpt'
  assert calls == [('slim', str(ckpt))] and ckpt.stat().st_size == 200_000
  assert out == download.output_dir('slim', str(tmp_path))
  restored = ocp.StandardCheckpointer().restore(out)
  np.testing.assert_array_equal(restored['params']['Logits']['biases'], [0, 1, 2])

  # Done already: a second run neither downloads nor converts.
  assert download.fetch('slim', str(tmp_path), url=url) == out
  assert len(server.requests) == 1 and len(calls) == 1


def test_wrong_checksum_leaves_no_file(tmp_path, serve, converter):
  url = serve('/model.h5', b'not the published weights')
  with pytest.raises(download.DownloadError, match=r'expected 0+, got') as error:
    download.fetch('keras', str(tmp_path), url=url, sha256='0' * 64)
  assert 'deleted' in str(error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == []
  assert converter == []


def test_recorded_digests_are_checked(tmp_path, serve, converter):
  url = serve('/model.h5', b'some other file')
  with pytest.raises(download.DownloadError, match='md5: expected 9a0d5805'):
    download.fetch('keras', str(tmp_path), url=url)
  assert not any(tmp_path.iterdir())


def test_cut_off_transfer_resumes(tmp_path, serve, server, converter):
  data = np.random.default_rng(1).bytes(300_000)
  url = serve('/model.h5', data)
  server.cut_after = 120_000
  download.fetch('keras', str(tmp_path), url=url, sha256=_sha256(data))

  assert server.requests == [('/model.h5', None), ('/model.h5', 'bytes=120000-')]
  final = tmp_path / download.RELEASES['keras'].filename
  assert final.read_bytes() == data
  assert converter == [('keras', str(final))]


def test_partial_file_from_an_earlier_run_resumes(tmp_path, serve, server, converter):
  data = np.random.default_rng(2).bytes(50_000)
  url = serve('/model.h5', data)
  final = tmp_path / download.RELEASES['keras'].filename
  (tmp_path / (final.name + '.part')).write_bytes(data[:20_000])
  download.fetch('keras', str(tmp_path), url=url, sha256=_sha256(data))
  assert server.requests == [('/model.h5', 'bytes=20000-')]
  assert final.read_bytes() == data


def test_unreachable_fails_fast_then_uses_a_manual_copy(tmp_path, converter):
  url = f'http://127.0.0.1:{_closed_port()}/model.h5'
  final = tmp_path / download.RELEASES['keras'].filename
  with pytest.raises(download.DownloadError, match='cannot reach') as error:
    download.fetch('keras', str(tmp_path), url=url, timeout=2)
  assert str(final) in str(error.value) and 'run this command again' in str(error.value)
  assert converter == []

  data = b'fetched by hand'
  final.write_bytes(data)
  download.fetch('keras', str(tmp_path), url=url, sha256=_sha256(data), timeout=2)
  assert converter == [('keras', str(final))]


def test_command_line_reports_errors(tmp_path, converter):
  url = f'http://127.0.0.1:{_closed_port()}/x.tar.gz'
  with pytest.raises(SystemExit, match='error: cannot reach'):
    download.main(['slim', str(tmp_path), '--url', url, '--timeout', '2'])

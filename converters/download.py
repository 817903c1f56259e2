r"""Fetches a released ImageNet InceptionV3 and converts it into an orbax directory.

  python -m converters.download slim  DEST   # TF-Slim's 2016 checkpoint: 1001 classes + aux head
  python -m converters.download keras DEST   # Keras's .h5: 1000 classes, no aux head

The file lands in DEST under its published name, then DEST/inception_v3_<source>_orbax is written
(pass it as --config.init_checkpoint). Downloads go to `<name>.part` and resume with an HTTP Range
request when interrupted (so the part is kept, not written through `atomic.atomic_file`); only a
file whose digests match is renamed to its final name. Without
network, put a copy fetched by other means at the path the error names and run the command again.
"""

import argparse
import dataclasses
import hashlib
import http.client
import os
import re
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from pneumo_jax import atomic
from pneumo_jax.errors import ConfigError
from pneumo_jax.models.inception_v3 import keras_weights, slim_weights
from pneumo_jax.models.weights import save_variables

_CHUNK = 1 << 20
_MAX_ATTEMPTS = 5  # Transfers in one run; each must add bytes for the next to start.


@dataclasses.dataclass(frozen=True)
class Release:
  """A published weights file and what is known about its content."""

  url: str
  filename: str
  # hashlib algorithm → hex digest, as published by `digest_source`; empty when none is known.
  digests: dict[str, str]
  digest_source: str


RELEASES = {
  'slim': Release(
    url='http://download.tensorflow.org/models/inception_v3_2016_08_28.tar.gz',
    filename='inception_v3_2016_08_28.tar.gz',
    # The TF-Slim model zoo lists this archive without any checksum, and no published digest
    # could be found (Nov 2026); `--sha256` pins one once you have checked a copy.
    digests={},
    digest_source='none published',
  ),
  'keras': Release(
    url=(
      'https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/'
      'inception_v3_weights_tf_dim_ordering_tf_kernels.h5'
    ),
    filename='inception_v3_weights_tf_dim_ordering_tf_kernels.h5',
    digests={
      # keras/src/applications/inception_v3.py passes this as `file_hash` to get_file (32 hex
      # digits, which get_file's 'auto' mode treats as MD5).
      'md5': '9a0d58056eeedaa3f26cb7ebd46da564',
      # gomlx/gomlx examples/inceptionv3/download.go (WeightsH5Checksum) for the same URL.
      'sha256': '00c9ea4e4762f716ac4d300d6d9c2935639cc5e4d139b5790d765dcbeea539d0',
    },
    digest_source='Keras applications source (md5); gomlx inceptionv3 example (sha256)',
  ),
}


class DownloadError(RuntimeError):
  """The file could not be fetched or verified; the message says what to do next."""


def output_dir(source: str, dest: str) -> str:
  return os.path.join(dest, f'inception_v3_{source}_orbax')


def _manual_hint(url: str, final: str) -> str:
  return (
    f'Download {url} by other means, put it at {final} and run this command again: it then '
    'verifies and converts that file without going online.'
  )


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
  request = urllib.request.Request(url)
  if offset:
    request.add_header('Range', f'bytes={offset}-')
  return urllib.request.urlopen(request, timeout=timeout)


def _expected_size(response: http.client.HTTPResponse, offset: int) -> int | None:
  """Total file size from Content-Range (206) or Content-Length (200); None when not sent."""
  if response.status == 206:
    match = re.fullmatch(r'bytes (\d+)-\d+/(\d+|\*)', response.headers.get('Content-Range', ''))
    if not match or int(match.group(1)) != offset:
      raise DownloadError(
        f'{response.url} answered the resume request with Content-Range '
        f'{response.headers.get("Content-Range")!r} instead of bytes {offset}-; delete the '
        '.part file and run again.'
      )
    return None if match.group(2) == '*' else int(match.group(2))
  length = response.headers.get('Content-Length')
  return int(length) if length is not None else None


def _transfer(url: str, part: str, timeout: float) -> bool:
  """One request appending to `part`. True when the file is complete, False when cut short."""
  offset = os.path.getsize(part) if os.path.exists(part) else 0
  try:
    response = _open(url, offset, timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and offset:  # Nothing left past `offset`: the part is already whole.
      return True
    raise
  with response:
    if response.status == 200:
      offset = 0  # The server ignored Range: start over.
    total = _expected_size(response, offset)
    with open(part, 'ab' if offset else 'wb') as f:
      try:
        while chunk := response.read(_CHUNK):
          f.write(chunk)
      except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
        print(f'transfer interrupted ({type(e).__name__}) at {f.tell()} bytes', file=sys.stderr)
        return False
      return total is None or f.tell() >= total


def _download(url: str, final: str, timeout: float) -> None:
  """Fetches `url` into `final + '.part'`, resuming it, in at most _MAX_ATTEMPTS requests."""
  part = final + '.part'
  for _ in range(_MAX_ATTEMPTS):
    before = os.path.getsize(part) if os.path.exists(part) else 0
    print(f'fetching {url}' + (f' from byte {before}' if before else ''), file=sys.stderr)
    try:
      if _transfer(url, part, timeout):
        return
    except urllib.error.HTTPError as e:
      raise DownloadError(f'{url}: HTTP {e.code} {e.reason}. {_manual_hint(url, final)}') from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # DNS, refused, timeout.
      reason = getattr(e, 'reason', e)
      kept = f' The partial file {part} is kept for the next run.' if before else ''
      raise DownloadError(f'cannot reach {url} ({reason}).{kept} {_manual_hint(url, final)}') from e
    if not os.path.exists(part) or os.path.getsize(part) <= before:
      break
  raise DownloadError(
    f'{url} keeps breaking off; {part} holds what arrived: run again to resume. '
    + _manual_hint(url, final)
  )


def _verify(path: str, digests: dict[str, str]) -> None:
  """Raises if any recorded digest differs; warns (with the sha256 to pin) when none is known."""
  actual = {}
  for name in digests or ['sha256']:
    with open(path, 'rb') as f:
      actual[name] = hashlib.file_digest(f, name).hexdigest()
  if not digests:
    print(
      f'WARNING: no published digest is recorded for {os.path.basename(path)}, so its content is '
      f'NOT verified. Its sha256 is {actual["sha256"]}; compare it with a trusted copy and pass it '
      'as --sha256 to pin it.',
      file=sys.stderr,
    )
    return
  wrong = [
    f'{name}: expected {want}, got {actual[name]}'
    for name, want in digests.items()
    if actual[name] != want.lower()
  ]
  if wrong:
    raise DownloadError(f'{path} is not the published file ({"; ".join(wrong)}).')


def _unpack_checkpoint(archive: str, into: str) -> str:
  """Extracts a slim .tar.gz into `into`, replacing it whole (an interrupted extraction leaves no
  half of it); returns the checkpoint path tf.train reads."""
  with tarfile.open(archive) as tar, atomic.atomic_folder(into) as unpacking:
    names = tar.getnames()
    tar.extractall(unpacking, filter='data')
  for name in names:
    if name.endswith('.ckpt.index'):
      return os.path.join(into, name.removesuffix('.index'))
    if name.endswith('.ckpt'):
      return os.path.join(into, name)
  raise DownloadError(f'{archive} holds no .ckpt checkpoint (members: {names}).')


def _converter(source: str) -> Callable[[str], dict[str, Any]]:
  """InceptionV3's reader for the release's file (TF and Keras are imported only when reading)."""
  return {'slim': slim_weights.read, 'keras': keras_weights.read}[source]


def fetch(
  source: str,
  dest: str,
  url: str | None = None,
  sha256: str | None = None,
  timeout: float = 15.0,
) -> str:
  """Downloads (or reuses), verifies, unpacks and converts release `source`; returns the orbax dir.

  Args:
    source: a key of RELEASES ('slim' or 'keras').
    dest: folder for the download, its unpacked content and the orbax directory.
    url: a mirror of the same file instead of the published address.
    sha256: a digest to check instead of the recorded ones.
    timeout: seconds to wait on connecting and on each read, so that no network fails fast.
  """
  if source not in RELEASES:
    raise ConfigError(f'unknown source {source!r}; choose one of {sorted(RELEASES)}')
  release = RELEASES[source]
  url = url or release.url
  digests = {'sha256': sha256} if sha256 else release.digests
  os.makedirs(dest, exist_ok=True)
  out = output_dir(source, dest)
  if os.path.isdir(out):
    print(f'{out} already exists; delete it to convert again.', file=sys.stderr)
    return out

  final = os.path.join(dest, release.filename)
  if not os.path.exists(final):
    _download(url, final, timeout)
    try:
      _verify(final + '.part', digests)
    except DownloadError as e:
      os.remove(final + '.part')  # Corrupt, so resuming it cannot help.
      raise DownloadError(f'{e} It was deleted; run again to download it afresh.') from e
    os.replace(final + '.part', final)
  else:
    try:
      _verify(final, digests)
    except DownloadError as e:
      raise DownloadError(f'{e} Delete it and run again, or replace it with a good copy.') from e

  weights = final
  if final.endswith('.tar.gz'):
    unpacked = os.path.join(dest, release.filename.removesuffix('.tar.gz'))
    weights = _unpack_checkpoint(final, unpacked)
  save_variables(_converter(source)(weights), out)
  print(f'wrote {out}; use --config.init_checkpoint={out}')
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog='python -m converters.download', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('source', choices=sorted(RELEASES))
  parser.add_argument('dest', help='folder for the download and the converted orbax directory')
  parser.add_argument('--url', help='fetch from this mirror instead of the published address')
  parser.add_argument('--sha256', help='check this digest instead of the recorded ones')
  parser.add_argument('--timeout', type=float, default=15.0, help='network timeout, seconds')
  args = parser.parse_args(argv)
  try:
    fetch(args.source, args.dest, url=args.url, sha256=args.sha256, timeout=args.timeout)
  except DownloadError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()

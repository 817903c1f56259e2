"""What the package declares: its licence, version, dependencies, and what the default install
(no GPL decoder) reads of DICOM."""

import ast
import importlib.metadata
import importlib.util
import os
import sys
import tomllib

import numpy as np
import pydicom
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydicom.pixels import get_decoder

import pneumo_jax
from pneumo_jax.data import dicom
from pneumo_jax.errors import DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as _f:
  PROJECT = tomllib.load(_f)['project']


def test_version_has_one_source():
  assert PROJECT['dynamic'] == ['version'] and 'version' not in PROJECT
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    dynamic = tomllib.load(f)['tool']['setuptools']['dynamic']
  assert dynamic == {'version': {'attr': 'pneumo_jax.__version__'}}
  assert pneumo_jax.__version__ == importlib.metadata.version('pneumo_jax')


def test_licence():
  assert PROJECT['license'] == 'Apache-2.0' and PROJECT['license-files'] == ['LICENSE']
  with open(os.path.join(REPO, 'LICENSE')) as f:
    text = f.read()
  assert 'Apache License\n                           Version 2.0, January 2004' in text
  assert 'END OF TERMS AND CONDITIONS' in text


def _module_imports(folder: str) -> set[str]:
  """Top-level names imported at module level (not inside functions: those are the optional
  extras' lazy imports) by every .py file under `folder`."""
  names = set()
  for root, _, files in os.walk(os.path.join(REPO, folder)):
    for file in files:
      if file.endswith('.py'):
        with open(os.path.join(root, file)) as f:
          tree = ast.parse(f.read())
        for node in tree.body:
          if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
          elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
  return names


def test_everything_imported_at_run_time_is_declared():
  declared = {canonicalize_name(Requirement(r).name) for r in PROJECT['dependencies']}
  provided = importlib.metadata.packages_distributions()
  ours = {'pneumo_jax', 'configs', 'converters'}
  imported = (_module_imports('pneumo_jax') | _module_imports('configs')) - ours
  third_party = imported - set(sys.stdlib_module_names)
  assert {'jax', 'etils', 'pydicom'} <= third_party
  missing = {
    name: provided.get(name)
    for name in third_party
    if not {canonicalize_name(d) for d in provided.get(name, [])} & declared
  }
  assert not missing, f'imported but not in [project] dependencies: {missing}'


def test_no_gpl_dependency_and_no_torch_for_tests():
  extras = PROJECT['optional-dependencies']
  names = lambda reqs: {canonicalize_name(Requirement(r).name) for r in reqs}
  assert 'pylibjpeg-libjpeg' not in names(PROJECT['dependencies'])
  assert names(extras['dicom-gpl']) == {'pylibjpeg-libjpeg'}
  assert not names(extras['test']) & {'torch', 'torchvision', 'triton'}
  assert extras['cuda'] == ['jax[cuda12]'] and PROJECT['scripts'] == {
    'pneumo-jax': 'pneumo_jax.__main__:run'
  }


# ---------------------------------------------------------------------------- DICOM


@pytest.fixture
def without_libjpeg(monkeypatch):
  """pydicom and dicom.read as in the default install: pylibjpeg-libjpeg is not there (pydicom's
  pylibjpeg plugin keeps JPEG 2000, which pylibjpeg-openjpeg decodes)."""
  decoders = {get_decoder(s) for s in dicom._LIBJPEG_SYNTAXES}
  for decoder in decoders:
    monkeypatch.setitem(decoder._available, 'pylibjpeg', decoder._available['pylibjpeg'])
    del decoder._available['pylibjpeg']
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == 'libjpeg' else find_spec(name, *a)
  )


# One of pydicom's own files per transfer syntax, and whether its decoders may differ (lossy).
PERMISSIVE = {
  'MR_small_RLE.dcm': False,  # RLE: pydicom.
  'SC_rgb_jpeg_dcmtk.dcm': True,  # JPEG baseline: Pillow or GDCM.
  'SC_rgb_jpeg_gdcm.dcm': False,  # JPEG lossless (process 14, SV1): GDCM.
  'MR_small_jpeg_ls_lossless.dcm': False,  # JPEG-LS: GDCM.
  'JPEGLSNearLossless_16.dcm': False,  # JPEG-LS near-lossless, 16 bits: GDCM (exact decode).
  'JPEG2000.dcm': False,  # JPEG 2000: pylibjpeg-openjpeg.
}


def _shipped(name: str) -> str:
  return pydicom.data.get_testdata_file(name, download=False)


def test_default_install_reads_all_but_12_bit_jpeg_extended(without_libjpeg):
  for name in PERMISSIVE:
    got = dicom.read(_shipped(name), dicom.DEFAULT_WINDOW)
    assert got.dtype == np.uint8 and got.std() > 0, name
  with pytest.raises(DatasetError) as e:
    dicom.read(_shipped('JPGExtended.dcm'), dicom.DEFAULT_WINDOW)
  assert 'JPEG Extended (Process 2 and 4)' in str(e.value)
  assert "pip install 'pneumo_jax[dicom-gpl]'" in str(e.value)


def test_permissive_decoders_decode_what_libjpeg_decodes():
  """Pixel for pixel (lossy JPEG: within a grey level or two of IDCT rounding)."""
  for name, lossy in PERMISSIVE.items():
    path = _shipped(name)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if syntax not in dicom._LIBJPEG_SYNTAXES:
      continue
    libjpeg = pydicom.pixels.pixel_array(path, decoding_plugin='pylibjpeg').astype(np.int64)
    for plugin in ('gdcm', 'pillow'):
      if plugin in get_decoder(syntax)._available:
        got = pydicom.pixels.pixel_array(path, decoding_plugin=plugin).astype(np.int64)
        assert np.abs(got - libjpeg).max() <= (2 if lossy else 0), (name, plugin)


def test_version_in_the_model_card_and_export_metadata():
  """(The eval report's provenance and summary.json: tests/test_densenet_modes.py.)"""
  from configs import default
  from pneumo_jax.evaluation import model_card
  from pneumo_jax.modes import common, export

  config = default.get_config()
  header = model_card._header(config, {'label_names': ['a', 'b'], 'step': 3}, '')
  assert f'Made by pneumo_jax {pneumo_jax.__version__}.' in header
  restored = common.Restored(None, {}, 3, ['a', 'b'])
  metadata = export._metadata(config, 'w', restored, dicom.DEFAULT_WINDOW, False, '2.21', None)
  assert metadata['versions']['pneumo_jax'] == pneumo_jax.__version__

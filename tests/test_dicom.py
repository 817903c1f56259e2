"""DICOM and the grey window: every transfer syntax pydicom's wheel ships an example of, files
written here with pydicom (windows, MONOCHROME1, rescale, VOI LUT, compression, no extension),
the files refused, and a build of a DICOM class folder. Each expected image is computed here
from the decoded pixels with plain numpy formulas (PS3.3 C.11.2.1.2 for LINEAR windows)."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
  MPEG2MPML,
  ComprehensiveSRStorage,
  DigitalXRayImageStorageForPresentation,
  ExplicitVRLittleEndian,
  JPEG2000Lossless,
  RLELossless,
  generate_uid,
)

from configs import default
from pneumo_jax import validate
from pneumo_jax.data import dicom, folder_builder, images
from pneumo_jax.data.images import DatasetError, GreyWindow
from pneumo_jax.errors import ConfigError

RNG = np.random.default_rng(12)
# 12-bit values, as CR/DX store them; 32 px or more, as OpenJPEG needs for its 6 resolutions.
FILM = RNG.integers(0, 4096, (48, 40), dtype=np.uint16)


def shipped(name: str) -> str:
  """A file from pydicom's wheel; skipped where this pydicom would have to download it."""
  path = pydicom.data.get_testdata_file(name, download=False)
  if path is None:
    pytest.skip(f'{name} is not in the installed pydicom')
  return path


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
  """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0–255, rounded."""
  c, w = center - 0.5, width - 1
  y = np.clip(((x - c) / w + 0.5) * 255, 0, 255)
  return np.rint(np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y))).astype(np.uint8)


def onto8(x: np.ndarray, low: float, high: float) -> np.ndarray:
  """low → 0, high → 255, linear, rounded and clipped."""
  return np.clip(np.rint((x.astype(float) - low) / (high - low) * 255), 0, 255).astype(np.uint8)


def write(
  path: Path,
  pixels: np.ndarray,
  photometric: str = 'MONOCHROME2',
  bits: int = 12,
  syntax: str | None = None,
  **elements: object,
) -> Path:
  """A DX file holding `pixels`, with `elements` set, compressed to `syntax` when given."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID = DigitalXRayImageStorageForPresentation
  ds.Modality = 'DX'
  ds.set_pixel_data(pixels, photometric, bits)
  for key, value in elements.items():
    setattr(ds, key, value)
  if syntax:
    ds.compress(syntax, pixels)
  ds.save_as(path, enforce_file_format=True)
  return path


def read(path: str | Path, rule: str = 'file', fixed: tuple | None = None) -> np.ndarray:
  """load_stored's grey image [H, W] (asserting it is one-channel uint8)."""
  out = images.load_stored(path, None, window=GreyWindow(rule, fixed))
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 1, out.shape
  return out[..., 0]


# --- pydicom's own files, one per transfer syntax. ---


@pytest.mark.parametrize(
  'name',
  [
    'MR_small.dcm',  # Explicit VR little endian.
    'MR_small_implicit.dcm',
    'MR_small_bigendian.dcm',
    'MR_small_RLE.dcm',
    'MR_small_jp2klossless.dcm',
    'MR_small_jpeg_ls_lossless.dcm',
  ],
)
def test_one_image_in_every_syntax_reads_the_same(name):
  reference = pydicom.dcmread(shipped('MR_small.dcm'))  # Window 600/1600, signed 16 bits.
  expected = linear_window(reference.pixel_array.astype(float), 600, 1600)
  np.testing.assert_array_equal(read(shipped(name)), expected)
  # Without its window: the range of 16 signed stored bits, then a robust per-image range.
  x = reference.pixel_array.astype(float)
  np.testing.assert_array_equal(read(shipped(name), 'full_range'), onto8(x, -32768, 32767))
  low, high = np.percentile(x, [0.5, 99.5])
  np.testing.assert_array_equal(read(shipped(name), 'percentile'), onto8(x, low, high))


def test_jpeg_2000_with_rescale_and_window():
  ds = pydicom.dcmread(shipped('693_J2KI.dcm'))  # Lossy; rescale -1024, window 40/100.
  hounsfield = ds.pixel_array * 1.0 - 1024
  np.testing.assert_array_equal(read(ds.filename), linear_window(hounsfield, 40, 100))
  fixed = read(ds.filename, 'fixed', (-1000.0, 1000.0))
  np.testing.assert_array_equal(fixed, onto8(hounsfield, -1000, 1000))


@pytest.mark.parametrize('name, bits', [('JPGExtended.dcm', 12), ('JPEGLSNearLossless_16.dcm', 16)])
def test_no_window_uses_the_stored_bits(name, bits):
  path = shipped(name)  # 12-bit JPEG extended (lossy), 16-bit JPEG-LS near-lossless.
  stored = pydicom.dcmread(path).pixel_array.astype(float)
  np.testing.assert_array_equal(read(path), onto8(stored, 0, 2**bits - 1))


def test_colour_is_read_as_rgb():
  lossless = pydicom.dcmread(shipped('SC_rgb_rle.dcm')).pixel_array
  # RLE, JPEG lossless (process 14), JPEG 2000: the same picture, exactly.
  for name in ('SC_rgb_rle.dcm', 'SC_rgb_jpeg_gdcm.dcm', 'SC_rgb_gdcm_KY.dcm'):
    np.testing.assert_array_equal(images.load_stored(shipped(name), None), lossless, err_msg=name)
  for name in ('SC_rgb_jpeg_dcmtk.dcm', 'SC_rgb_dcmtk_+eb+cy+np.dcm'):  # Baseline; YBR.
    out = images.load_stored(shipped(name), None)
    assert out.shape == (100, 100, 3), name
    assert np.abs(out.astype(int) - lossless).mean() < 4, name  # Lossy (4:2:2), same picture.


@pytest.mark.parametrize(
  'name, why',
  [
    ('MR_truncated.dcm', 'ValueError'),  # Less pixel data than the header says.
    ('JPEG2000-embedded-sequence-delimiter.dcm', 'RuntimeError'),  # Undecodable stream.
    ('no_meta.dcm', 'InvalidDicomError'),  # No preamble: not a DICOM file.
    ('examples_palette.dcm', 'is PALETTE COLOR'),
    ('SC_rgb_rle_16bit.dcm', '3 sample(s) of 16 bits'),
    ('SC_rgb_rle_2frame.dcm', 'has 2 frames'),
    ('rtdose.dcm', 'has 15 frames'),
    ('test-SR.dcm', 'holds no image (Comprehensive SR Storage'),
    ('waveform_ecg.dcm', 'holds no image (12-lead ECG Waveform Storage'),
    ('rtplan.dcm', 'holds no image (RT Plan Storage'),
  ],
)
def test_refused_files_name_the_file_and_why(name, why):
  path = shipped(name)
  with pytest.raises(DatasetError) as e:
    images.load_stored(path, None)
  assert repr(path) in str(e.value) and why in str(e.value)
  assert '\n' not in str(e.value)  # One line: the builder lists one per file.


# --- Files written here. ---


def test_colour_with_equal_channels_is_grey(tmp_path):
  rgb = np.stack([FILM // 16] * 3, axis=-1).astype(np.uint8)
  path = write(tmp_path / 'sc.dcm', rgb, 'RGB', bits=8)
  np.testing.assert_array_equal(images.load_stored(path, None), rgb[..., :1])
  rgb[0, 0] = (1, 2, 3)
  write(path, rgb, 'RGB', bits=8)
  np.testing.assert_array_equal(images.load_stored(path, None), rgb)


def test_window_centre_width(tmp_path):
  path = write(tmp_path / 'a.dcm', FILM, WindowCenter=2000, WindowWidth=1001)
  np.testing.assert_array_equal(read(path), linear_window(FILM.astype(float), 2000, 1001))
  # Every other rule ignores the file's window.
  np.testing.assert_array_equal(read(path, 'fixed', (1000, 3000)), onto8(FILM, 1000, 3000))
  np.testing.assert_array_equal(read(path, 'full_range'), onto8(FILM, 0, 65535))


def test_monochrome1_with_rescale(tmp_path):
  slope, intercept = 2.5, -300.0
  path = write(
    tmp_path / 'a.dcm', FILM, 'MONOCHROME1', RescaleSlope=slope, RescaleIntercept=intercept
  )
  values = FILM * slope + intercept  # Stored bits 0…4095, through the rescale.
  white = 4095 * slope + intercept
  np.testing.assert_array_equal(read(path), 255 - onto8(values, intercept, white))
  fixed = read(path, 'fixed', (0.0, 4999.0))  # No value lands on a rounding tie.
  np.testing.assert_array_equal(fixed, 255 - onto8(values, 0, 4999))


@pytest.mark.parametrize('depth, top', [(8, 255), (16, 4095)])
def test_voi_lut_sequence(tmp_path, depth, top):
  """A gamma curve over the 12 bits; its entries' range is what maps to 0–255 (a 16-bit LUT
  that only reaches 4095 still gives full contrast)."""
  lut = np.rint(top * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)
  item = Dataset()
  item.LUTDescriptor = [4096, 0, depth]
  item.add_new('LUTData', 'US', lut.tolist())  # Its VR may be US or OW: say which.
  path = write(tmp_path / 'a.dcm', FILM, VOILUTSequence=Sequence([item]))
  np.testing.assert_array_equal(read(path), onto8(lut[FILM], 0, top))


@pytest.mark.parametrize('syntax', [RLELossless, JPEG2000Lossless])
def test_lossless_compression_round_trips(tmp_path, syntax):
  path = write(tmp_path / 'a.dcm', FILM, syntax=syntax, WindowCenter=2000, WindowWidth=1001)
  assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
  np.testing.assert_array_equal(read(path), linear_window(FILM.astype(float), 2000, 1001))


def test_files_without_extension_are_found_by_content(tmp_path):
  folder = tmp_path / 'pacs'
  folder.mkdir()
  plain = write(folder / 'IM000001', FILM)
  uid = write(folder / '1.2.840.113619.2.55.3', FILM)  # A UID's digits look like an extension.
  (folder / 'NOTES').write_text('not an image')
  (folder / 'DICOMDIR.txt').write_bytes(b'\0' * 128 + b'DICX')
  assert images.is_candidate(plain) and images.is_candidate(uid)
  assert not images.is_candidate(folder / 'NOTES')
  assert not images.is_candidate(folder / 'DICOMDIR.txt')
  assert images.expand_inputs([str(folder)]) == [str(uid), str(plain)]
  np.testing.assert_array_equal(read(plain), onto8(FILM, 0, 4095))


def test_generated_broken_files(tmp_path):
  two = np.stack([FILM, FILM])
  multi = write(tmp_path / 'multi', two, NumberOfFrames=2)
  sr = Dataset()
  sr.file_meta = FileMetaDataset()
  sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  sr.SOPClassUID, sr.SOPInstanceUID, sr.Modality = ComprehensiveSRStorage, generate_uid(), 'SR'
  sr.save_as(tmp_path / 'report.dcm', enforce_file_format=True)
  # A transfer syntax that no installed plugin decodes (MPEG-2 video).
  video = pydicom.dcmread(write(tmp_path / 'video.dcm', FILM))
  video.file_meta.TransferSyntaxUID = MPEG2MPML
  video.PixelData = encapsulate([b'\0\0\1\xb3' + bytes(64)])
  video.save_as(tmp_path / 'video.dcm', enforce_file_format=True)
  (tmp_path / 'fake.dcm').write_bytes(b'not DICOM at all')
  cases = {
    multi: 'has 2 frames',
    tmp_path / 'report.dcm': 'holds no image (Comprehensive SR Storage: no Pixel Data)',
    tmp_path / 'video.dcm': '(MPEG2 Main Profile / Main Level): NotImplementedError',
    tmp_path / 'fake.dcm': 'InvalidDicomError',
  }
  for path, why in cases.items():
    with pytest.raises(DatasetError) as e:
      images.load_stored(path, None)
    assert repr(str(path)) in str(e.value) and why in str(e.value), str(e.value)


# --- The setting. ---


def test_grey_window_from_config():
  c = default.get_config().dataset
  assert GreyWindow.from_config(c) == GreyWindow('file', None)
  c.grey_window, c.grey_window_range = 'fixed', (100, 3000)
  assert GreyWindow.from_config(c) == GreyWindow('fixed', (100.0, 3000.0))


@pytest.mark.parametrize(
  'rule, given, message',
  [
    ('auto', None, r"dataset\.grey_window='auto': use one of \['file', 'percentile'"),
    ('fixed', None, r"grey_window='fixed' needs dataset\.grey_window_range=\(low, high\)"),
    ('fixed', (3000, 100), r'with low < high .* not \(3000, 100\)'),
    ('fixed', (0, 1, 2), r'not \(0, 1, 2\)'),
    ('percentile', (0, 1), r"grey_window_range=\(0, 1\) has no effect with .*'percentile'"),
  ],
)
def test_bad_grey_window_is_named(rule, given, message):
  config = default.get_config()
  config.dataset.source_dir = '/data/anything'
  config.dataset.grey_window, config.dataset.grey_window_range = rule, given
  with pytest.raises(ConfigError, match=message):
    validate.check(config)


# --- A class folder of DICOM files. ---


def test_dicom_class_folder_builds(tmp_path):
  src = tmp_path / 'src'
  films = {}
  for label, cls in enumerate(('effusion', 'normal')):
    (src / cls).mkdir(parents=True)
    for i in range(3):
      film = RNG.integers(0, 4096, (80, 80), dtype=np.uint16) // (1 + label)
      name = f'{cls}/{i}.dcm' if i else f'{cls}/IM{i:05d}'  # One without an extension.
      films[name] = write(src / name, film, WindowCenter=1500 + 100 * i, WindowWidth=2001)
  write(src / 'normal' / 'cine.dcm', np.stack([film, film]), NumberOfFrames=2)
  config = default.get_config().dataset
  config.source_dir, config.validation_fraction = str(src), 0.34
  with pytest.raises(DatasetError, match=r'(?s)1 unreadable image.*cine\.dcm.* has 2 frames'):
    folder_builder.build(config, str(tmp_path / 'data'), 16)
  config.skip_corrupt = True
  builder = folder_builder.build(config, str(tmp_path / 'data'), 16)
  assert builder.info.metadata['skipped_corrupt'] == ['normal/cine.dcm']
  assert folder_builder.stored_shape(builder) == (16, 16, 1)
  records = {}
  for split in ('train', 'validation'):
    ds = builder.as_data_source(split)
    records.update({ds[i]['filename'].decode(): ds[i]['image'] for i in range(len(ds))})
  assert sorted(records) == sorted(films)
  for name, image in records.items():
    np.testing.assert_array_equal(image, images.load_stored(src / name, 16), err_msg=name)
  config.grey_window = 'percentile'  # Another window is another build.
  other = folder_builder.build(config, str(tmp_path / 'data'), 16)
  assert other.data_path != builder.data_path
  record = other.as_data_source('train')[0]
  path = src / record['filename'].decode()
  window = GreyWindow('percentile')
  np.testing.assert_array_equal(record['image'], images.load_stored(path, 16, window=window))


def test_identifiers_read_from_the_header_only(tmp_path):
  path = write(
    tmp_path / 'IM0001',
    FILM,
    PatientID='P-042',
    StudyInstanceUID='1.2.3.4',
    SOPInstanceUID='1.2.3.4.5',
  )
  assert dicom.identifiers(path) == {
    'patient_id': 'P-042',
    'study_uid': '1.2.3.4',
    'sop_uid': '1.2.3.4.5',
  }
  bare = dicom.identifiers(write(tmp_path / 'bare.dcm', FILM))
  assert (bare['patient_id'], bare['study_uid']) == ('', '')  # Absent: empty, not missing.
  assert bare['sop_uid'] == str(
    pydicom.dcmread(tmp_path / 'bare.dcm').file_meta.MediaStorageSOPInstanceUID
  )
  png = tmp_path / 'a.png'
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
  assert dicom.identifiers(png) == {}
  (tmp_path / 'notes.dcm').write_text('not DICOM')
  assert dicom.identifiers(tmp_path / 'notes.dcm') == {}

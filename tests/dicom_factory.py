"""Ultrasound DICOM instances made from the phantom, for the tests (SYNTHETIC, no patient).

Realistic enough for a PACS and for highdicom: Ultrasound (Multi-frame) Image Storage,
patient/study/series modules, the scanner's burned-in text outside the image region,
SequenceOfUltrasoundRegions, colour as RGB or YBR, uncompressed or compressed (JPEG
baseline, RLE, JPEG-LS). The patient's identifiers are long and distinctive so that the
privacy tests can search logs and databases for them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from training import phantom

PATIENT = {
    "PatientName": "Quintessa^Jane^Marigold",
    "PatientID": "QX-8675309-TEST",
    "PatientBirthDate": "19710203",
    "PatientSex": "F",
}
# What must never reach a log or the audit database (PatientSex is too short to search).
SECRETS = ("Quintessa", "Marigold", "QX-8675309-TEST", "19710203")
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MARGIN = (24, 16, 8, 40)  # the scanner's frame around the image: top, left, bottom, right


def image(label: str = "malignant", seed: int = 0, size: int = 96) -> np.ndarray:
    """A phantom B-mode image (uint8 RGB) with a coloured caliper mark, as scanners draw."""
    rgb = phantom.make_image(label, np.random.default_rng(seed), size).copy()
    c = size // 2
    rgb[c, c - 6 : c + 7] = (255, 220, 0)
    rgb[c - 6 : c + 7, c] = (255, 220, 0)
    return rgb


def on_screen(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The image inside a scanner frame with burned-in text; and the image's region
    (x0, y0, x1, y1), inclusive, as SequenceOfUltrasoundRegions gives it."""
    top, left, bottom, right = MARGIN
    h, w = rgb.shape[:2]
    screen = np.zeros((top + h + bottom, left + w + right, 3), dtype=np.uint8)
    screen[top : top + h, left : left + w] = rgb
    screen[4:14, 4 : left + w - 10] = 235  # "patient name, date" banner
    screen[top + 10 : top + 60, left + w + 8 : left + w + 30] = 200  # depth ruler, settings
    return screen, (left, top, left + w - 1, top + h - 1)


def _region(bounds: tuple[int, int, int, int]) -> Dataset:
    x0, y0, x1, y1 = bounds
    item = Dataset()
    item.RegionSpatialFormat = 1  # 2D
    item.RegionDataType = 1  # tissue
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3  # cm
    item.PhysicalDeltaX = item.PhysicalDeltaY = 0.005
    item.ReferencePixelX0, item.ReferencePixelY0 = x0, y0
    return item


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92, subsampling=1)  # 4:2:2
    return buf.getvalue()


def ultrasound(
    frames: list[np.ndarray] | np.ndarray,
    *,
    photometric: str = "RGB",
    syntax: str = ExplicitVRLittleEndian,
    region: tuple[int, int, int, int] | None = None,
    study: str | None = None,
    **elements,
) -> Dataset:
    """An Ultrasound Image Storage instance (Multi-frame when several frames).

    photometric: RGB, YBR_FULL or MONOCHROME2 (channel 0, 8 bits); with syntax
    JPEGBaseline8Bit the frames are JPEG-coded as YBR_FULL_422, as scanners send them.
    """
    frames = [frames] if isinstance(frames, np.ndarray) else list(frames)
    many = len(frames) > 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = US_MULTIFRAME if many else US_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20260105", "093000"
    ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
    ds.ContentDate, ds.ContentTime = ds.StudyDate, "093012"
    ds.AccessionNumber = "ACC-QX-0042"
    ds.StudyID = "QX42"
    ds.ReferringPhysicianName = "Strange^Stephen"
    ds.StudyDescription = "US THYROID"
    ds.SeriesDescription = "Thyroid, right lobe, transverse"
    ds.Modality = "US"
    ds.BodyPartExamined = "NECK"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "Phantom Medical Systems"
    ds.ManufacturerModelName = "PX-1 (synthetic)"
    ds.InstitutionName = "St Quintessa Hospital"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "YES"
    ds.PatientOrientation = ""
    h, w = frames[0].shape[:2]
    ds.Rows, ds.Columns = h, w
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if many:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = (0x0018, 0x1063)
    if region is not None:
        ds.SequenceOfUltrasoundRegions = [_region(region)]
    if photometric == "MONOCHROME2":
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        pixels = np.stack([f[..., 0] for f in frames])
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = photometric
        pixels = np.stack(frames)
        if photometric == "YBR_FULL":
            pixels = convert_color_space(pixels, "RGB", "YBR_FULL")
    pixels = pixels if many else pixels[0]
    if syntax == JPEGBaseline8Bit:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([_jpeg(f) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    elif syntax in (RLELossless, JPEGLSLossless):
        ds.compress(syntax, pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def ct(study: str | None = None) -> Dataset:
    """A small CT Image Storage instance of the same patient (not for this model)."""
    ds = ultrasound(image(), photometric="MONOCHROME2", study=study)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.Modality = "CT"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """A DICOM Part 10 file (with its preamble, as a modality's C-STORE leaves it)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def jpeg_decoded(rgb: np.ndarray) -> np.ndarray:
    """What a JPEG baseline frame of `rgb` decodes to (Pillow), for comparisons."""
    return np.asarray(Image.open(io.BytesIO(_jpeg(rgb))).convert("RGB"))

"""Readers and writers for the formats a clinic has: DICOM NM, LabelMe JSON."""

"""Data: annotation readers and dataset layouts (`datasets`), synthetic crowds (`synthetic`)."""
from .datasets import (
    FORMATS,
    AnnotationError,
    DatasetFormat,
    ImageError,
    LayoutError,
    Sample,
    image_size,
    list_samples,
    read_jhu_txt,
    read_nwpu_json,
    read_points,
    read_shanghaitech_mat,
    read_ucf_mat,
)
from .synthetic import SyntheticCrowdDataset, SyntheticSample, render_crowd, synthetic_dataset

__all__ = [
    "FORMATS",
    "AnnotationError",
    "DatasetFormat",
    "ImageError",
    "LayoutError",
    "Sample",
    "image_size",
    "list_samples",
    "read_jhu_txt",
    "read_nwpu_json",
    "read_points",
    "read_shanghaitech_mat",
    "read_ucf_mat",
    "SyntheticCrowdDataset",
    "SyntheticSample",
    "render_crowd",
    "synthetic_dataset",
]

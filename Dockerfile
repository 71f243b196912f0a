# One image for training and evaluation. Pick the base for your accelerator:
#   NVIDIA:    docker build -t frcnn --build-arg BASE=pytorch/pytorch:2.4.1-cuda12.1-cudnn9-devel .
#   Cambricon: docker build -t frcnn --build-arg BASE=<Cambricon PyTorch image with torch_mlu 1.22+> .
#   CPU:       docker build -t frcnn --build-arg BASE=python:3.11-slim .
# The base image's torch (and torch_mlu) are kept: requirements.txt only asks for torch>=2.1.
ARG BASE=pytorch/pytorch:2.4.1-cuda12.1-cudnn9-devel
FROM ${BASE}
# A C++ compiler for the native ops (present in -devel and Cambricon images; slim images need it).
RUN command -v g++ >/dev/null || (apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*)
WORKDIR /workspace/frcnn
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
# Build the native NMS/ROIAlign extension now (CPU kernels, plus MLU kernels where torch_mlu is present),
# into a cache inside the image, so containers start without compiling.
ENV TORCH_EXTENSIONS_DIR=/workspace/torch_extensions
RUN python -c "import torch, ops; ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)"
CMD ["python", "train.py", "--config", "demo"]

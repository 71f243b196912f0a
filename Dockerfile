# One image for training and evaluation; the base image's torch (and torch_mlu) is kept. Pick the base:
#   NVIDIA:    docker build -t frcnn --build-arg BASE=pytorch/pytorch:2.4.1-cuda12.1-cudnn9-devel .
#   Cambricon: docker build -t frcnn --build-arg BASE=<Cambricon PyTorch image with torch_mlu 1.22+> .
#   CPU:       docker build -t frcnn --build-arg BASE=python:3.11-slim .
# Run (data, weights and output mounted; README "Docker" has the NVIDIA line):
#   docker run -it --ipc=host --privileged --device /dev/cambricon_ctl \
#       -v /data/coco:/workspace/frcnn/datasets/coco -v /data/weights:/workspace/frcnn/weights \
#       -v /data/output:/workspace/frcnn/output frcnn \
#       torchrun --nproc_per_node 8 train.py --config R-101-FPN device=mlu weights=weights/R-101.pkl
ARG BASE=pytorch/pytorch:2.4.1-cuda12.1-cudnn9-devel
FROM ${BASE}
# A C++ compiler for the native ops (present in -devel and Cambricon images; slim images need it).
RUN command -v g++ >/dev/null || (apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*)
WORKDIR /workspace/frcnn
# torch: the base's; a base without one (CPU) gets PyTorch's CPU build. torchvision: the release made for that
# torch, CPU build, without dependencies, so pip cannot replace the base's torch (Cambricon images ship none;
# torch_mlu's README installs it the same way). 2.x pairs with 0.(x+15): 2.1.2 -> 0.16.2, 2.4.1 -> 0.19.1.
ARG CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN python -c "import torch" 2>/dev/null || pip install --no-cache-dir --index-url ${CPU_INDEX} torch
RUN python -c "import torchvision" 2>/dev/null || pip install --no-cache-dir --isolated --no-deps \
    --index-url ${CPU_INDEX} "torchvision==$(python -c 'import re, torch; m, p = re.match(r"2\.(\d+)\.(\d+)", torch.__version__).groups(); print(f"0.{int(m) + 15}.{p}")')"
COPY requirements.txt requirements-onnx.txt ./
RUN pip install --no-cache-dir -r requirements.txt
# onnx and onnxruntime for export.py and evaluate.py on an .onnx file: optional, so a base whose Python has no
# onnxruntime wheel still builds (export.py then names the pip command)
RUN pip install --no-cache-dir -r requirements-onnx.txt || echo "onnx/onnxruntime not installed: export.py needs them"
COPY . .
# Build the native NMS/ROIAlign extension now (CPU kernels, plus MLU kernels where torch_mlu and its SDK are
# present), into a cache inside the image, so containers start without compiling. The MLU self-test runs at the
# first use on a card.
ENV TORCH_EXTENSIONS_DIR=/workspace/torch_extensions
RUN python -c "import torch, ops; ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)"
CMD ["python", "train.py", "--config", "demo"]

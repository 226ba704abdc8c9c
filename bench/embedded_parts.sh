#!/bin/bash
# The embedded model (94 MB) is larger than what one device call carries (64 MiB with the tree),
# so it travels in three parts, one a call, on one warm machine:
#   here:    bash bench/embedded_parts.sh K        (K = 1, 2, 3: puts part K in .embedded/, ignored)
#   device:  run "bash bench/device_call.sh embedded-part" with carry [".whl", ".embedded"]
# and, after the third, any mode that needs it (session6) finds it whole under /tmp/site.
set -euo pipefail
part=${1:?part 1, 2 or 3}
gguf=$(.venv/bin/python -c "from stepserve.models.source import embedded_model_path; print(embedded_model_path())")
rm -rf .embedded && mkdir -p .embedded
size=$(stat -c %s "$gguf")
chunk=$(( (size + 2) / 3 ))
dd if="$gguf" of=".embedded/part-$part" bs=1M iflag=skip_bytes,count_bytes skip=$(( (part - 1) * chunk )) count=$chunk status=none
sha256sum "$gguf" | cut -d' ' -f1 > .embedded/sha256
ls -l .embedded
